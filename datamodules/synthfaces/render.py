"""Vectorised, anti-aliased SynthFaces renderer.

Faces are built from signed-distance shapes in a per-image head frame (translated, scaled, rolled),
painted back to front with a one-pixel coverage ramp, shaded by a directional light on an ellipsoid
normal field, and composited over a two-colour gradient background. Work is done on chunks of
images with whole-tensor ops (no per-pixel or per-image Python loops). Chunks keep temporaries
small (on CPU much faster than one huge batch), small features are drawn only inside a pixel window
that bounds them in every image of the chunk, and chunks are grouped by hair style so that layers
no face in a chunk has are skipped. None of this changes any pixel: each image is computed by the
same elementwise maths wherever it lands.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .factors import as_generator, check_factors, sample_factors
from .params import EYE_V, MOUTH_V, face_params
from .parts import PART_INDEX
from .sdf import circle, ellipse, length, rounded_box

Tensor = torch.Tensor
SIZES = (32, 64, 128, 256)
DEFAULT_SIZE = 64

# Local-frame boxes (u0, u1, v0, v1) bounding a layer group for every factor value.
_EYE_BOX = (-0.56, 0.56, -0.35, 0.07)
_MOUTH_BOX = (-0.31, 0.31, -0.03, 0.58)
_CLOTHES_BOX = (-1.01, 1.01, 0.77, 1.8)
_NECK_BOX = (-0.23, 0.23, 0.29, 1.31)
_EAR_BOX = (-0.66, 0.66, -0.1, 0.14)
_BOXES = (_EYE_BOX, _MOUTH_BOX, _CLOTHES_BOX, _NECK_BOX, _EAR_BOX)
# Followed by three per-image boxes from params.face_params: head, front hair, back hair.
_USE_WINDOWS = True  # tests switch this off to check that windows never clip a shape


def check_size(size: int) -> int:
    """Return ``size`` if it is a supported image size (a power of two in 32..256), else raise."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES} (a power of two from 32 to 256), got {size!r}")
    return size


class _Canvas:
    """Back-to-front compositor: foreground colour over black plus background transmittance, so the
    light's shading can be applied to the foreground alone at the end."""

    def __init__(self, n: int, size: int, device: torch.device):
        self.rgb = torch.zeros(n, 3, size, size, device=device)
        self.trans = torch.ones(n, 1, size, size, device=device)
        self.parts = torch.zeros(n, size, size, dtype=torch.uint8, device=device)

    def paint(self, alpha: Tensor, color: Tensor, part: Optional[str] = None,
              part_alpha: Optional[Tensor] = None, win: Optional[tuple] = None,
              inside: bool = False) -> None:
        """Paint ``color`` ((n, 3, 1, 1) or (n, 3, h, w)) with coverage ``alpha`` (n, h, w) inside
        window ``win`` (default: whole image); pixels whose ``part_alpha`` (default ``alpha``) is
        >= 0.5 get class ``part``. ``inside=True`` promises the shape lies where the foreground is
        already opaque (features on the face), so the transmittance needs no update."""
        y0, y1, x0, x1 = win if win is not None else (0, None, 0, None)
        a = alpha.unsqueeze(1)
        self.rgb[:, :, y0:y1, x0:x1].lerp_(color, a)
        if not inside:
            trans = self.trans[:, :, y0:y1, x0:x1]
            trans.addcmul_(trans, a, value=-1.0)
        if part is not None:
            pa = alpha if part_alpha is None else part_alpha
            self.parts[:, y0:y1, x0:x1].masked_fill_(pa >= 0.5, PART_INDEX[part])


class _Frame:
    """Per-image head frame evaluated on the pixel grid or a window of it."""

    def __init__(self, P: Dict[str, Tensor], size: int):
        self.P, self.size, self.px = P, size, 2.0 / size
        lin = (torch.arange(size, device=P["s"].device, dtype=torch.float32) + 0.5) * self.px - 1.0
        self.gx, self.gy = lin.view(1, 1, size), lin.view(1, size, 1)
        self.neg_aa = P["s"] * (-1.0 / self.px)

    def cov(self, d: Tensor) -> Tensor:
        """Anti-aliased coverage of a shape with local signed distance ``d`` (1-pixel ramp)."""
        return torch.addcmul(torch.full_like(d, 0.5), d, self.neg_aa).clamp_(0.0, 1.0)

    def uv(self, win: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
        """Local coordinates (u, v), each (n, h, w), of the pixel centres in ``win`` (or all)."""
        y0, y1, x0, x1 = win if win is not None else (0, None, 0, None)
        P = self.P
        dx, dy = self.gx[..., x0:x1] - P["cx"], self.gy[:, y0:y1] - P["cy"]
        return torch.addcmul(P["cr"] * dx, P["sr"], dy), torch.addcmul(P["cr"] * dy, P["sr"], -dx)

    def windows(self) -> list:
        """Pixel windows (y0, y1, x0, x1) covering each local box (``_BOXES``, then the per-image
        boxes ``P["boxes"]``) in every image of the chunk, with a margin for the anti-aliasing
        ramp; Nones when windows are disabled."""
        P = self.P
        n = P["s"].shape[0]
        box = torch.cat([torch.tensor(_BOXES, device=self.gx.device).expand(n, -1, -1), P["boxes"]], 1)
        nb = box.shape[1]
        if not _USE_WINDOWS:
            return [None] * nb
        cu = box[..., [0, 1, 0, 1]].reshape(n, -1)                     # (n, 4 * nb) corners
        cv = box[..., [2, 2, 3, 3]].reshape(n, -1)
        s, c, sn = P["s"].view(-1, 1), P["cos"].view(-1, 1), P["sin"].view(-1, 1)
        x = (P["cx"].view(-1, 1) + s * (c * cu - sn * cv)).view(-1, nb, 4)
        y = (P["cy"].view(-1, 1) + s * (sn * cu + c * cv)).view(-1, nb, 4)
        ext = torch.stack([y.amin((0, 2)), y.amax((0, 2)), x.amin((0, 2)), x.amax((0, 2))], 1)
        idx = (ext + 1.0) / self.px - 0.5
        idx = torch.cat([idx[:, 0:1].floor() - 1, idx[:, 1:2].ceil() + 2,
                         idx[:, 2:3].floor() - 1, idx[:, 3:4].ceil() + 2], 1)
        out = []
        for y0, y1, x0, x1 in idx.clamp(0, self.size).long().tolist():
            out.append((y0, max(y1, y0 + 1), x0, max(x1, x0 + 1)))
        return out


def _draw_chunk(P: Dict[str, Tensor], size: int) -> tuple[Tensor, Tensor]:
    """Render one chunk of parameters to RGB (n, 3, H, W) float in [0, 255] and parts (n, H, W)."""
    n = P["s"].shape[0]
    fr = _Frame(P, size)
    cov = fr.cov
    canvas = _Canvas(n, size, P["s"].device)
    w_eye, w_mouth, w_clothes, w_neck, w_ear, w_head, w_front, w_back = fr.windows()
    has_front, has_back = bool(P["front_on"].any()), bool(P["back_on"].any())

    def hair_rgb(u: Tensor, v: Tensor) -> Tensor:  # soft strands radiating from above the crown
        slope = u / (v + P["strand_c"]).clamp_(min=0.01)  # the pole lies just above any hair
        strands = torch.sin(slope * 23.0).add_(torch.sin(slope * 41.0 + 1.3), alpha=0.6)
        return P["hair_rgb"] * strands.mul_(0.05).add_(0.93).unsqueeze(1)

    # Clothes, with a round neckline.
    u, v = fr.uv(w_clothes)
    d = torch.maximum(ellipse(u, v - P["clothes_v"], 1.0, 0.42), -ellipse(u, v - P["neckline_v"], 0.17, 0.17))
    canvas.paint(cov(d), P["shirt_rgb"], "clothes", win=w_clothes)

    if has_back:  # margin around the head (+ bumps for afro) and a hanging part for bob / long
        u, v = fr.uv(w_back)
        vb = v - P["back_cy"]
        d = ellipse(u, vb, P["back_rx"], P["back_ry"])
        if bool(P["bumps"].any()):
            d = d - P["bumps"] * torch.cos(14.0 * torch.atan2(u, vb))
        if bool((P["box_bottom"] > 0).any()):
            box = rounded_box(u, v - P["box_hh"], P["box_hw"], P["box_hh"], 0.1)
            d = torch.minimum(d, torch.where(P["box_bottom"] > 0, box, torch.full_like(box, 9.0)))
        canvas.paint(cov(d).mul_(P["back_on"]), hair_rgb(u, v), "hair", win=w_back)

    # Neck, ears, head.
    un, vn = fr.uv(w_neck)
    canvas.paint(cov(rounded_box(un, vn - 0.8, P["neck_hw"], 0.5, 0.06)), P["neck_rgb"], "neck", win=w_neck)
    un, vn = fr.uv(w_ear)
    d = ellipse((un + P["ear_shift"]).abs_() - P["ear_u"], vn - 0.02, 0.065, 0.11)
    canvas.paint(cov(d).mul_(P["ears_on"]), P["ear_rgb"], "ear", win=w_ear)
    u, v = fr.uv(w_head)
    vt = (v * P["inv_ry"]).clamp_(0.0, 1.0)
    taper = 1.0 - P["jaw"] * vt * vt
    canvas.paint(cov(ellipse(u / taper, v, P["rx"], P["ry"])), P["skin_rgb"], "skin", win=w_head)

    # Nose and mouth.
    um, vm = fr.uv(w_mouth)
    nu = um - 1.5 * P["fx"]
    canvas.paint(cov(ellipse(nu, vm - 0.1, 0.05, 0.09)), P["nose_rgb"], "nose", win=w_mouth, inside=True)
    canvas.paint(cov(ellipse(nu, vm - 0.185, 0.05, 0.014)), P["nose_tip_rgb"], "nose", win=w_mouth, inside=True)
    d = circle(nu.abs_() - 0.026, vm - 0.168, 0.013)
    canvas.paint(cov(d), P["nostril_rgb"], "nose", win=w_mouth, inside=True)
    _mouth(canvas, P, cov, um - 1.1 * P["fx"], vm, w_mouth)

    # Eyes and brows, mirrored about the face midline; the far eye (yaw side) is narrower.
    ue, ve = fr.uv(w_eye)
    ue = ue - P["fx"]
    ve = ve - EYE_V
    side = torch.sign(ue)
    mw = (ue.abs() - P["eye_es"]) / (1.0 - P["eye_squash"] * side)
    d_eye = ellipse(mw, ve, P["eye_rx"], P["eye_ry"])
    canvas.paint(cov(d_eye), P["eye_white_rgb"], "eye", win=w_eye, inside=True)
    d_iris = length(mw - P["gaze"] * side, ve)
    canvas.paint(cov(torch.maximum(d_iris - P["iris_r"], d_eye)), P["iris_rgb"], "eye", win=w_eye, inside=True)
    canvas.paint(cov(torch.maximum(d_iris - P["pupil_r"], d_eye)), P["pupil_rgb"], "eye", win=w_eye, inside=True)
    canvas.paint(cov(torch.maximum(d_eye.abs() - 0.011, ve)), P["lid_rgb"], "eye", win=w_eye, inside=True)
    bt = mw * (1.0 / 0.105)
    centre = (bt * bt - 1.0) * 0.025 + P["brow_tilt"] * bt
    thick = P["brow_th"] * (1.15 - 0.3 * bt)
    d = torch.maximum((ve + P["brow_v"] - centre).abs_() - thick, mw.abs() - 0.105)
    canvas.paint(cov(d), P["brow_rgb"], "brow", win=w_eye, inside=True)
    glasses = _glasses(P, cov, ue + P["fx"], mw, ve)

    # Front hair: a cap above a slanted hairline, side strands, and a bun.
    if has_front:
        u, v = fr.uv(w_front)
        d_mass = ellipse(u, v, P["mass_rx"], P["mass_ry"])
        hairline = P["hairline"] + (P["part_slope"] + 0.7 * u) * u
        d = torch.minimum(torch.maximum(d_mass, v - hairline),
                          torch.maximum(torch.maximum(d_mass, P["side_in"] - u.abs()), v - P["side_len"]))
        if bool((P["bun_r"] > 0).any()):
            d = torch.minimum(d, circle(u, v - P["bun_v"], P["bun_r"]))
        canvas.paint(cov(d).mul_(P["front_on"]), hair_rgb(u, v), "hair", win=w_front)
    for alpha, color, part_alpha in glasses:
        canvas.paint(alpha, color, "glasses", part_alpha, win=w_eye)
    shade = _shade(P, size)

    # Background: two-colour linear gradient; then colour temperature, exposure and 255 scaling.
    g = (0.5 + P["bg_gx"] * fr.gx + P["bg_gy"] * fr.gy).unsqueeze(1)
    rgb = canvas.rgb.mul_(shade).addcmul_(canvas.trans, torch.addcmul(P["bg_rgb"], P["bg_delta_rgb"], g))
    return rgb.mul_(P["out_scale_rgb"]).clamp_(0.0, 255.0), canvas.parts


def _shade(P: Dict[str, Tensor], size: int) -> Tensor:
    """Lambertian shading (n, 1, size, size) of an ellipsoid around the head, evaluated on a
    quarter-resolution grid and upsampled bilinearly (it is smooth, and this is 16x cheaper)."""
    coarse = max(8, size // 4)
    fr = _Frame(P, coarse)
    u, v = fr.uv()
    nx, ny = u * P["n_iu"], (v + 0.05) * P["n_iv"]
    nz = (1.0 - nx * nx - ny * ny).clamp_(min=0.0).sqrt_()
    lambert = (nx * P["lx"]).addcmul_(ny, P["ly"]).addcmul_(nz, P["lz"]).clamp_(0.0, 1.0)
    shade = torch.addcmul(P["ambient"], P["diffuse"], lambert).unsqueeze(1)
    return F.interpolate(shade, size=(size, size), mode="bilinear", align_corners=False)


def _mouth(canvas: _Canvas, P: Dict[str, Tensor], cov, mu: Tensor, v: Tensor, win) -> None:
    """Paint lips, mouth interior and teeth; ``mu`` is u relative to the mouth centre."""
    t = mu / P["mouth_w"]
    q = (1.0 - t * t).clamp_(min=0.0)
    sq = q.sqrt()
    line = MOUTH_V + P["lift"] * (q - 0.6)  # corners (q=0) rise with smile, centre (q=1) drops
    top_o = line - P["gap_top"] * sq
    bot_o = line + P["gap_bot"] * q
    side_d = mu.abs() - P["mouth_w"]
    d_lips = torch.maximum(torch.maximum(top_o - 0.026 * sq - 0.003 - v, v - bot_o - 0.032 * sq - 0.003), side_d)
    canvas.paint(cov(d_lips), P["lips_rgb"], "lips", win=win, inside=True)
    d_open = torch.maximum(torch.maximum(top_o - v, v - bot_o), side_d)
    canvas.paint(cov(d_open), P["mouth_in_rgb"], "mouth", win=win, inside=True)
    d_teeth = torch.maximum(d_open, v - top_o - 0.45 * (bot_o - top_o).clamp(max=0.05))
    canvas.paint(cov(d_teeth).mul_(P["teeth_on"]), P["teeth_rgb"], "mouth", win=win, inside=True)


def _glasses(P: Dict[str, Tensor], cov, u: Tensor, mw: Tensor, ve: Tensor) -> list:
    """Layers (alpha, colour, part_alpha) of the glasses: tinted lenses (opaque for sunglasses, which
    alone count as part ``glasses``), then frames, bridge and temples."""
    hx = P["lens_hx"]
    d_rect = rounded_box(mw, ve, hx, P["lens_hy"], P["lens_r"])
    d_lens = d_rect + P["lens_round"] * (circle(mw, ve, hx) - d_rect)
    a_lens = cov(d_lens).mul_(P["glasses_on"])
    fth = 0.011
    d_frame = d_lens.abs() - fth
    d_bridge = torch.maximum((ve + 0.02).abs_() - fth, mw + hx - 0.01)
    d_temple = torch.maximum(torch.maximum((ve + 0.03).abs_() - 0.8 * fth, hx - 0.01 - mw), u.abs() - P["temple_u"])
    d = torch.minimum(torch.minimum(d_frame, d_bridge), d_temple)
    return [(a_lens * P["lens_opacity"], P["lens_rgb"], a_lens * P["lens_part"]),
            (cov(d).mul_(P["glasses_on"]), P["frame_rgb"], None)]


def render_factors(factors: Dict[str, Tensor], size: int = DEFAULT_SIZE, *, device=None,
                   return_float: bool = False, chunk: Optional[int] = None) -> Dict[str, object]:
    """Render faces described by ``factors`` (see ``factors.FACTORS``; each an (N,) tensor).

    Returns ``{"images": (N, 3, size, size) uint8 (or float32 in [0, 1] if return_float),
    "parts": (N, size, size) int64 class indices (see ``parts.PART_CLASSES``), "labels": factors}``.
    ``chunk`` is the number of images rendered per vectorised step (default: ~100k pixels, which
    keeps temporaries small enough to stay in cache and be reused by the CPU allocator).
    """
    check_size(size)
    n = check_factors(factors)
    device = torch.device(device) if device is not None else torch.device("cpu")
    chunk = chunk or max(1, (24 * 64 * 64) // (size * size))
    order = torch.argsort(factors["hair_style"].cpu(), stable=True)
    P = face_params({k: factors[k].cpu()[order] for k in factors}, device)
    order = order.to(device)
    images = torch.empty(n, 3, size, size, dtype=torch.float32 if return_float else torch.uint8, device=device)
    parts = torch.empty(n, size, size, dtype=torch.uint8, device=device)
    for i in range(0, n, chunk):
        rgb, prt = _draw_chunk({k: v[i:i + chunk] for k, v in P.items()}, size)
        # float -> uint8 truncates, so +0.5 rounds (values are clamped to [0, 255]).
        images[i:i + chunk] = rgb.div_(255.0) if return_float else rgb.add_(0.5)
        parts[i:i + chunk] = prt
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=device)
    return {"images": images[inverse], "parts": parts[inverse].long(), "labels": factors}


def render_batch(seed_or_generator: int | torch.Generator, n: int, size: int = DEFAULT_SIZE, *,
                 device=None, return_float: bool = False) -> Dict[str, object]:
    """Sample ``n`` faces' factors from a seed or ``torch.Generator`` and render them.

    Same seed -> same images; the first m images of a batch of n equal a batch of m. Returns the
    dict of ``render_factors``: images (N, 3, H, W) uint8 (float32 in [0, 1] if ``return_float``),
    parts (N, H, W) int64, labels dict name -> (N,) tensor.
    """
    check_size(size)
    return render_factors(sample_factors(as_generator(seed_or_generator), n), size, device=device,
                          return_float=return_float)
