"""Pattern-like OOD families: text, stickers / face paint, textured backgrounds (see ``corrupt.py``).

Each function takes a ``corrupt.Ctx`` and returns layers (alpha (N, H, W), colour) to composite in
order. Patterns have periods of a few pixels, i.e. far higher frequencies than anything in the
clean renderer.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .parts import PART_INDEX
from .sdf import hsv_to_rgb, length, rotate

Tensor = torch.Tensor

_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789!?#@"
_TEXT_LINES, _TEXT_CHARS = 3, 8
_TEXT_COLORS = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.92, 0.1], [1.0, 0.15, 0.15], [0.1, 0.95, 1.0],
                             [1.0, 0.2, 0.9], [0.3, 1.0, 0.2]])


def _vivid(h: Tensor, s: float = 0.85, v: float = 0.95) -> Tensor:
    h = h.reshape(-1)
    return hsv_to_rgb(h, torch.full_like(h, s), torch.full_like(h, v)).view(-1, 3, 1, 1)


@lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``px`` pixels (bundled with Pillow; nothing is downloaded)."""
    return ImageFont.load_default(size=px)


def text(c) -> List:
    """Up to three lines of outlined random letters/digits (caption or meme style). Severity sets
    how many characters appear (a prefix of the same drawn string), i.e. the covered area."""
    n, size = c.sev.shape[0], c.size
    chars = torch.randint(0, len(_ALPHABET), (n, _TEXT_LINES * _TEXT_CHARS), generator=c.generator)
    U = c.uniforms.cpu()
    sev = c.sev.view(-1).cpu()
    fill = np.zeros((n, size, size), np.float32)
    stroke = np.zeros((n, size, size), np.float32)
    for i in range(n):
        fpx = max(7, round(size * (0.15 + 0.07 * float(U[i, 0]))))
        font = _font(fpx)
        shown = max(1, math.ceil(float(sev[i]) * _TEXT_LINES * _TEXT_CHARS))
        fimg, simg = Image.new("L", (size, size)), Image.new("L", (size, size))
        fd, sd = ImageDraw.Draw(fimg), ImageDraw.Draw(simg)
        sw = max(1, fpx // 9)
        y = size * (0.05 + 0.25 * float(U[i, 1]))
        for line in range(_TEXT_LINES):
            k = min(_TEXT_CHARS, shown - line * _TEXT_CHARS)
            if k <= 0:
                break
            s = "".join(_ALPHABET[j] for j in chars[i, line * _TEXT_CHARS:line * _TEXT_CHARS + k].tolist())
            x = size * 0.45 * float(U[i, 2 + line])
            sd.text((x, y), s, font=font, fill=255, stroke_width=sw, stroke_fill=255)
            fd.text((x, y), s, font=font, fill=255)
            y += fpx * 1.25 + size * 0.12 * float(U[i, 5 + line])
        fill[i], stroke[i] = np.asarray(fimg, np.float32) / 255.0, np.asarray(simg, np.float32) / 255.0
    dev = c.X.device
    color = _TEXT_COLORS[(U[:, 8] * len(_TEXT_COLORS)).long().clamp(max=len(_TEXT_COLORS) - 1)]
    outline = torch.where(color.sum(1, keepdim=True) > 1.8, 0.0, 1.0).expand(-1, 3)
    return [(torch.from_numpy(stroke).to(dev), outline.view(n, 3, 1, 1).to(dev)),
            (torch.from_numpy(fill).to(dev), color.view(n, 3, 1, 1).to(dev))]


def _two_tone(c, pat: Tensor, h1: int, h2: int) -> Tensor:
    """Colour (N, 3, H, W) mixing two drawn vivid colours by ``pat`` in [0, 1]."""
    c1, c2 = _vivid(c.u(h1)), _vivid(c.u(h1) + 0.33 + 0.34 * c.u(h2), 0.9, 0.6)
    return c1 + (c2 - c1) * pat.unsqueeze(1)


def sticker(c) -> List:
    """A star- or disc-shaped sticker with a white rim and a checker or stripe pattern of period
    ~3 pixels on the face, or (a third of the time) face-paint zigzag stripes across the cheeks."""
    L = c.layout
    kind = (c.u(0) * 3.0).floor()
    sx = L["cx"] + (c.u(1) - 0.5) * 1.1 * L["fw"]
    sy = L["cy"] + (c.u(2) - 0.5) * 0.9 * L["fh"]
    R = L["fw"] * (0.16 + 0.34 * c.sev)
    dx, dy = c.X - sx, c.Y - sy
    rad = length(dx, dy)
    star_r = R * (0.72 + 0.28 * torch.cos(5.0 * torch.atan2(dy, dx) + 6.283 * c.u(3)))
    d = torch.where(kind == 0, (rad - star_r) * 0.8, rad - R)
    period = max(3.0, c.size / 24.0) * c.px
    xr, yr = rotate(dx, dy, c.u(4) * math.pi)
    checker = torch.sin(xr * (math.pi / period)) * torch.sin(yr * (math.pi / period))
    stripes = torch.sin(xr * (math.pi / period))
    pat = (0.5 + 2.0 * torch.where(c.u(5) < 0.5, checker, stripes)).clamp(0.0, 1.0)
    rim = 1.2 * c.px
    is_sticker = (kind < 2).float()
    white = torch.ones(1, 3, 1, 1, device=dx.device)
    layers = [(c.cov(d) * is_sticker, white), (c.cov(d + rim) * is_sticker, _two_tone(c, pat, 6, 7))]

    # Face paint: zigzag bands under the eyes, on skin only.
    skin = ((c.parts == PART_INDEX["skin"]) | (c.parts == PART_INDEX["nose"])).float()
    zig = 0.05 * L["fh"] * torch.sin(c.X * (math.pi / (3.0 * period)))
    band_y = L["eye_y"] + (0.25 + 0.1 * c.u(8)) * L["fh"]
    d_band = (c.Y - band_y - zig).abs() - L["fh"] * (0.03 + 0.15 * c.sev)
    stripes_x = (0.5 + 2.0 * torch.sin(c.X * (math.pi / period))).clamp(0.0, 1.0).expand_as(d_band)
    layers.append((c.cov(d_band) * skin * (1.0 - is_sticker) * 0.9, _two_tone(c, stripes_x, 9, 10)))
    return layers


def texture_bg(c) -> List:
    """Replace the background (part 0) by a high-frequency texture (stripes, checks, bricks, dots or
    waves) inside a half-plane that sweeps across the image as severity grows (all of it at 1)."""
    kind = (c.u(0) * 5.0).floor()
    period = (3.0 + 3.0 * c.u(1)) * (c.size / 64.0) ** 0.5 * c.px
    xr, yr = rotate(c.X, c.Y, c.u(2) * math.pi)
    fx, fy = xr / period, yr / period
    stripes = torch.sin(2 * math.pi * fx)
    checks = torch.sin(math.pi * fx) * torch.sin(math.pi * fy)
    row = torch.floor(fy * 0.5)
    bx = torch.remainder(fx * 0.5 + 0.5 * torch.remainder(row, 2.0), 1.0)
    by = torch.remainder(fy * 0.5, 1.0)
    bricks = torch.where((by < 0.2) | (bx < 0.1), -1.0, 1.0)
    dots = 0.3 - length(torch.remainder(fx, 1.0) - 0.5, torch.remainder(fy, 1.0) - 0.5)
    waves = torch.sin(2 * math.pi * fx + 2.5 * torch.sin(2 * math.pi * fy / 3.0))
    pat = torch.where(kind == 0, stripes, torch.where(kind == 1, checks, torch.where(
        kind == 2, bricks, torch.where(kind == 3, dots * 8.0, waves))))
    pat = (0.5 + 2.0 * pat).clamp(0.0, 1.0)
    beta = c.u(3) * (2 * math.pi)
    s = c.X * torch.cos(beta) + c.Y * torch.sin(beta)
    d_sweep = (1.45 - 2.9 * c.sev) - s
    background = (c.parts == PART_INDEX["background"]).float()
    return [(c.cov(d_sweep) * background, _two_tone(c, pat, 4, 5))]
