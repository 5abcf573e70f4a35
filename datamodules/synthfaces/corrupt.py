"""Out-of-domain (OOD) corruptions of SynthFaces evaluation images, each with its exact pixel mask.

``corrupt_batch(images, parts, family, severity, generator)`` draws objects or patterns the
renderer never produces for training and composites them onto copies of the images. Placement
comes from the clean part maps (face box, eyes, mouth, background). Families:

=============  ==============================================================================
hand           a hand (palm, four fingers, thumb, forearm) over the mouth / cheek / chin
microphone     a handheld microphone (mesh ball, coloured band, glossy handle) below the mouth
text           outlined random letters and digits (Pillow's built-in font, no download)
sticker        high-frequency checker / stripe stickers (star or disc), or face-paint stripes
hat            headwear the renderer never draws: cap, top hat, striped beanie, headphones
texture_bg     a textured background (stripes, checks, bricks, dots, waves) sweeping in
=============  ==============================================================================

Severity in (0, 1] sets object size / text length / covered area; the random draws do not depend
on it, so for one generator state a higher severity covers a superset of (almost always) the same
pixels. The returned mask is exactly the set of pixels whose value changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from .factors import as_generator
from .parts import PART_INDEX

Tensor = torch.Tensor
Layer = Tuple[Tensor, Tensor]  # alpha (N, H, W) in [0, 1], colour (N, 3, 1, 1) or (N, 3, H, W) in [0, 1]
N_UNIFORMS = 16

_FACE_CLASSES = ("skin", "eye", "brow", "nose", "lips", "mouth")


@dataclass
class Ctx:
    """What a family function needs: pixel-centre coordinates X (1, 1, W), Y (1, H, 1) in [-1, 1],
    pixel size ``px``, per-image severity (N, 1, 1), uniforms (N, N_UNIFORMS), face layout from
    ``layout`` ((N, 1, 1) tensors), clean ``parts`` (N, H, W), and the generator for extra draws."""

    X: Tensor
    Y: Tensor
    px: float
    size: int
    sev: Tensor
    uniforms: Tensor
    layout: Dict[str, Tensor]
    parts: Tensor
    generator: torch.Generator

    def u(self, k: int) -> Tensor:
        """Column k of the uniforms as (N, 1, 1)."""
        return self.uniforms[:, k].view(-1, 1, 1)

    def cov(self, d: Tensor) -> Tensor:
        """Anti-aliased coverage of a shape with signed distance ``d`` in image units."""
        return (0.5 - d / self.px).clamp_(0.0, 1.0)


def layout(parts: Tensor) -> Dict[str, Tensor]:
    """Face geometry from part maps (N, H, W), in image coordinates [-1, 1] (y down).

    Returns (N, 1, 1) tensors: cx, cy (face centroid), fw, fh (face half width / height), top (top
    of the face skin), eye_y, mouth_x, mouth_y. Images without face pixels get a centred default.
    """
    n, h, w = parts.shape
    dev = parts.device
    X = ((torch.arange(w, device=dev) + 0.5) * (2.0 / w) - 1.0).view(1, 1, w)
    Y = ((torch.arange(h, device=dev) + 0.5) * (2.0 / h) - 1.0).view(1, h, 1)
    face = torch.zeros_like(parts, dtype=torch.bool)
    for name in _FACE_CLASSES:
        face |= parts == PART_INDEX[name]
    mouth = (parts == PART_INDEX["lips"]) | (parts == PART_INDEX["mouth"])
    eye = parts == PART_INDEX["eye"]

    def mean(mask: Tensor, coord: Tensor, default: Tensor | float) -> Tensor:
        cnt = mask.sum((1, 2))
        m = (mask * coord).sum((1, 2)) / cnt.clamp(min=1)
        return torch.where(cnt > 0, m, torch.as_tensor(default, device=dev).expand_as(m))

    inf = torch.tensor(float("inf"), device=dev)
    has = face.flatten(1).any(1)
    x0 = torch.where(has, torch.where(face, X, inf).amin((1, 2)), torch.full((n,), -0.5, device=dev))
    x1 = torch.where(has, torch.where(face, X, -inf).amax((1, 2)), torch.full((n,), 0.5, device=dev))
    y0 = torch.where(has, torch.where(face, Y, inf).amin((1, 2)), torch.full((n,), -0.6, device=dev))
    y1 = torch.where(has, torch.where(face, Y, -inf).amax((1, 2)), torch.full((n,), 0.7, device=dev))
    min_half = 2.0 / min(h, w)  # keeps sizes derived from tiny faces at >= 1 pixel
    out = {"cx": (x0 + x1) / 2, "cy": (y0 + y1) / 2, "fw": ((x1 - x0) / 2).clamp(min=min_half),
           "fh": ((y1 - y0) / 2).clamp(min=min_half), "top": y0}
    out["eye_y"] = mean(eye, Y, out["cy"] - 0.2 * out["fh"])
    out["mouth_x"] = mean(mouth, X, out["cx"])
    out["mouth_y"] = mean(mouth, Y, out["cy"] + 0.5 * out["fh"])
    return {k: v.view(n, 1, 1).float() for k, v in out.items()}


def _families() -> Dict[str, Callable[[Ctx], List[Layer]]]:
    from .occluders import hand, headwear, microphone
    from .patterns import sticker, text, texture_bg
    return {"hand": hand, "microphone": microphone, "text": text, "sticker": sticker,
            "hat": headwear, "texture_bg": texture_bg}


OOD_FAMILIES: tuple[str, ...] = ("hand", "microphone", "text", "sticker", "hat", "texture_bg")


def corrupt_batch(images: Tensor, parts: Tensor, family: str, severity: float | Tensor = 1.0,
                  generator: int | torch.Generator | None = None) -> Tuple[Tensor, Tensor]:
    """Apply OOD corruption ``family`` (one of ``OOD_FAMILIES``) to copies of ``images``.

    Args:
        images: (N, 3, H, W) uint8, or float in [0, 1]; not modified.
        parts: (N, H, W) clean part maps of the same images (placement and background).
        severity: float or (N,) tensor in (0, 1]: object size / amount of text / covered area.
        generator: seed or ``torch.Generator`` (None: seed 0). The draws do not depend on severity.
    Returns:
        (corrupted images with the dtype of ``images``, ood_mask (N, H, W) bool), where the mask
        is True exactly where a pixel value changed.
    """
    fams = _families()
    if family not in fams:
        raise ValueError(f"unknown OOD family {family!r}; expected one of {OOD_FAMILIES}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    if tuple(parts.shape) != (n, h, w):
        raise ValueError(f"parts must be (N, H, W) = {(n, h, w)}, got {tuple(parts.shape)}")
    if h != w:
        raise ValueError(f"images must be square, got {h}x{w}")
    sev = torch.as_tensor(severity, dtype=torch.float32, device=images.device).expand(n).contiguous()
    if not bool(((sev > 0) & (sev <= 1)).all()):
        raise ValueError(f"severity must lie in (0, 1], got {severity!r}")
    g = as_generator(0 if generator is None else generator)
    uniforms = torch.rand(n, N_UNIFORMS, generator=g).to(images.device)
    is_uint8 = images.dtype == torch.uint8
    clean = images.float() / 255.0 if is_uint8 else images.float()
    px = 2.0 / w
    coords = (torch.arange(w, device=images.device) + 0.5) * px - 1.0
    ctx = Ctx(coords.view(1, 1, w), coords.view(1, h, 1), px, w, sev.view(n, 1, 1), uniforms,
              layout(parts), parts, g)
    out = clean.clone()
    for alpha, color in fams[family](ctx):
        out.lerp_(color.expand_as(out), alpha.unsqueeze(1))
    if is_uint8:
        out = out.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        mask = (out != images).any(1)
    else:
        out = out.to(images.dtype)
        mask = (out != images).any(1)
    return out, mask
