"""Generic out-of-domain patches pasted onto training images (a stage-2 augmentation).

The ICCV method learns its invertibility mask without mask labels, from the reconstruction losses and
the area hinge alone; on FFHQ the training images themselves hold content the generator cannot make
(hands, hats, text, busy backgrounds). Rendered SynthFaces training images hold none, so there the
mask has nothing to find and settles into a diffuse, image-independent pattern. This augmentation
stands in for FFHQ's natural OOD content: random ellipses and rectangles filled with random-colour
noise fields. It is deliberately generic and shares no family with the evaluation corruptions of
``datamodules.synthfaces.corrupt`` (hand, microphone, text, sticker, hat, textured background), so the
evaluation still measures masks on OOD content never seen in training. No mask label reaches the loss.

No library offers "paste random noise shapes with their exact masks" on a GPU batch (albumentations'
CoarseDropout draws axis-aligned solid holes on one numpy image at a time), hence this small module.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _uniform(shape, low: float, high: float, generator: Optional[torch.Generator], device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def _noise_fill(n: int, size: int, generator: Optional[torch.Generator], device) -> Tensor:
    """(n, 3, size, size) colour fields in [-1, 1]: a smooth random field at a random scale plus fine noise."""
    fills = []
    for cells in (2, 4, 8, 16):
        low = _uniform((n, 3, cells, cells), -1.0, 1.0, generator, device)
        fills.append(F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False))
    pick = torch.randint(0, len(fills), (n,), generator=generator, device=device)
    field = torch.stack(fills, 1)[torch.arange(n, device=device), pick]
    grain = _uniform((n, 1, 1, 1), 0.0, 0.5, generator, device)
    field = field + grain * _uniform((n, 3, size, size), -1.0, 1.0, generator, device)
    return field.clamp_(-1.0, 1.0)


def random_patch_masks(n: int, size: int, area: Tuple[float, float] = (0.03, 0.15),
                       generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """Binary masks (n, 1, size, size) of one random rotated ellipse or rectangle each.

    ``area`` bounds the shape's area as a fraction of the image (before clipping at the border).
    """
    lo, hi = area
    if not 0.0 < lo <= hi < 1.0:
        raise ValueError(f"random_patch_masks: area must satisfy 0 < low <= high < 1, got {area}")
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    Y, X = coords.view(1, size, 1), coords.view(1, 1, size)
    u = lambda lo_, hi_: _uniform((n, 1, 1), lo_, hi_, generator, device)  # noqa: E731
    frac, aspect = u(lo, hi), torch.exp(u(-0.7, 0.7))
    cx, cy, theta = u(-0.75, 0.75), u(-0.75, 0.75), u(0.0, math.pi)
    rect = torch.rand((n, 1, 1), generator=generator, device=device) < 0.5
    # ellipse area pi*rx*ry, rectangle 4*rx*ry, in a [-1, 1]^2 image of area 4
    prod = torch.where(rect, frac, frac * 4 / math.pi)
    rx, ry = torch.sqrt(prod * aspect), torch.sqrt(prod / aspect)
    dx, dy = X - cx, Y - cy
    a = dx * torch.cos(theta) + dy * torch.sin(theta)
    b = -dx * torch.sin(theta) + dy * torch.cos(theta)
    inside = torch.where(rect, torch.maximum((a / rx).abs(), (b / ry).abs()) <= 1,
                         (a / rx) ** 2 + (b / ry) ** 2 <= 1)
    return inside.unsqueeze(1).float()


def paste_random_patches(images: Tensor, p: float = 0.5, max_patches: int = 2, area: Tuple[float, float] = (0.03, 0.15),
                         generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Paste 1..``max_patches`` noise-filled shapes onto each image with probability ``p``.

    Args:
        images: (B, 3, H, W) in [-1, 1] with H == W.
        p: probability that an image gets patches (the rest stay clean, so the mask also learns "nothing").
        max_patches: upper bound of patches per chosen image.
        area: per-patch area range, fraction of the image.
        generator: torch.Generator on the images' device (default: the global RNG).
    Returns:
        (patched images (B, 3, H, W), exact masks (B, 1, H, W) in {0, 1}: 1 where a pixel was replaced).
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"paste_random_patches: images must be (B, 3, S, S), got {tuple(images.shape)}")
    if not 0.0 <= p <= 1.0 or max_patches < 1:
        raise ValueError(f"paste_random_patches: need 0 <= p <= 1 and max_patches >= 1, got p={p}, "
                         f"max_patches={max_patches}")
    b, _, size, _ = images.shape
    device = images.device
    chosen = torch.rand((b,), generator=generator, device=device) < p
    count = torch.randint(1, max_patches + 1, (b,), generator=generator, device=device) * chosen
    out, mask = images.clone(), images.new_zeros(b, 1, size, size)
    for k in range(max_patches):
        shape = random_patch_masks(b, size, area, generator, device).to(images.dtype)
        shape = shape * (count > k).view(b, 1, 1, 1).to(images.dtype)
        fill = _noise_fill(b, size, generator, device).to(images.dtype)
        out = torch.lerp(out, fill, shape)
        mask = torch.maximum(mask, shape)
    return out, mask
