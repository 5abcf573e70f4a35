"""Object-like OOD families: hand, microphone and headwear (see ``corrupt.py``).

Each function takes a ``corrupt.Ctx`` and returns layers (alpha (N, H, W), colour) to composite
in order. Objects are scaled about an anchor drawn independently of severity, so a larger
severity gives a larger object at the same place.
"""
from __future__ import annotations

import math
from typing import List

import torch

from .params import SKIN_RAMP
from .sdf import capsule, ellipse, hsv_to_rgb, length, palette_lookup, rotate, rounded_box

Tensor = torch.Tensor

# Fingers: (base x, length) in hand units; fingertips fan out by a drawn amount.
_FINGERS = ((-0.3, 0.72), (-0.1, 0.86), (0.1, 0.8), (0.3, 0.62))


def _rgb(c: Tensor) -> Tensor:
    return c.view(-1, 3, 1, 1)


def _vivid(h: Tensor, s: float = 0.8, v: float = 0.85) -> Tensor:
    """Saturated colours (N, 3, 1, 1) from hues (N, 1, 1)."""
    h = h.reshape(-1)
    return _rgb(hsv_to_rgb(h, torch.full_like(h, s), torch.full_like(h, v)))


def hand(c) -> List:
    """A hand raised in front of the lower face: palm, four fanned fingers, thumb, forearm to the
    image edge. Skin tone drawn independently of the face; edge shading separates the fingers."""
    L = c.layout
    ax = L["mouth_x"] + (c.u(0) - 0.5) * L["fw"]
    ay = L["mouth_y"] + (c.u(1) - 0.2) * 0.5 * L["fh"]
    h = L["fw"] * (0.3 + 0.75 * c.sev)
    a, b = rotate(c.X - ax, c.Y - ay, (c.u(2) - 0.5) * 1.2)
    a = a * torch.where(c.u(3) < 0.5, -1.0, 1.0) / h   # left or right hand
    b = b / h
    fan = 0.2 + 0.5 * c.u(4)
    d = rounded_box(a, b, 0.42, 0.42, 0.2)
    for x0, ln in _FINGERS:
        d = torch.minimum(d, capsule(a, b, x0, -0.25, x0 * (1.0 + fan), -0.25 - ln, 0.095))
    d = torch.minimum(d, capsule(a, b, 0.3, 0.15, 0.72 + 0.2 * c.u(5), -0.25, 0.11))
    d = torch.minimum(d, capsule(a, b, 0.0, 0.3, 0.0, 8.0, 0.36))
    skin = _rgb(palette_lookup(SKIN_RAMP.to(a.device), c.u(6).reshape(-1)))
    shade = (0.72 + 0.28 * (-d * 6.0).clamp(0.0, 1.0)).unsqueeze(1)
    return [(c.cov(d * h), skin * shade)]


def microphone(c) -> List:
    """A handheld microphone below the mouth: glossy dark handle to the image edge, coloured band,
    and a grey mesh ball with spherical shading."""
    L = c.layout
    mx = L["mouth_x"] + (c.u(0) - 0.5) * 0.6 * L["fw"]
    my = L["mouth_y"] + (0.15 + 0.35 * c.u(1)) * L["fh"]
    r = L["fw"] * (0.14 + 0.28 * c.sev)
    psi = (c.u(2) - 0.5) * 1.2
    ux, uy = torch.sin(psi), torch.cos(psi)
    dx, dy = c.X - mx, c.Y - my
    across = (dx * uy - dy * ux) / (0.42 * r)
    d_handle = capsule(dx, dy, 0.0, 0.0, ux * 8.0, uy * 8.0, 0.42 * r)
    gloss = (0.08 + 0.3 * torch.exp(-((across - 0.35) / 0.3) ** 2)).unsqueeze(1)
    d_band = capsule(dx, dy, ux * 0.85 * r, uy * 0.85 * r, ux * 1.35 * r, uy * 1.35 * r, 0.55 * r)
    band = _vivid(c.u(3), 0.75, 0.8) * (0.7 + 0.3 * (1.0 - (across / 1.3).clamp(-1, 1) ** 2)).unsqueeze(1)
    d_ball = length(dx, dy) - r
    k = 7.0 * math.pi
    mesh = torch.maximum((torch.sin(k * dx / r).abs() - 0.55) * 3.0, (torch.sin(k * dy / r).abs() - 0.55) * 3.0)
    sphere = (1.0 - length(dx + 0.35 * r, dy + 0.35 * r) / (1.7 * r)).clamp(0.0, 1.0)
    ball = ((0.3 + 0.35 * mesh.clamp(0.0, 1.0)) * (0.55 + 0.7 * sphere)).clamp(0.0, 1.0).unsqueeze(1)
    return [(c.cov(d_handle), gloss.expand(-1, 3, -1, -1)), (c.cov(d_band), band),
            (c.cov(d_ball), ball.expand(-1, 3, -1, -1))]


def headwear(c) -> List:
    """Headwear on top of the head, one of: baseball cap with logo, top hat with a band, striped
    beanie with a pompom, headphones. Size and how low it sits grow with severity."""
    L = c.layout
    n = c.sev.shape[0]
    kind = (c.u(0) * 4.0).floor().clamp(max=3.0)
    fh, hw = L["fh"], L["fw"] * 1.15
    hx = L["cx"]
    yb = L["top"] + fh * (0.12 + 0.3 * c.sev)          # bottom edge of the hat
    H = fh * (0.4 + 0.5 * c.sev)                         # crown height
    wc = hw * (1.05 + 0.2 * c.sev)
    x, y = rotate(c.X - hx, c.Y - yb, (c.u(1) - 0.5) * 0.4)  # frame at the hat's base centre
    c1, c2 = _vivid(c.u(2)), _vivid(c.u(3), 0.6, 0.95)
    big = torch.full_like(x, 9.0)

    # Cap: dome + visor below the base line + logo disc.
    dome = torch.maximum(ellipse(x, y, wc, H * 0.8), y)
    visor = torch.maximum(ellipse(x, y, wc * 1.05, 0.22 * H), -y)
    logo = length(x, y + 0.4 * H) - 0.18 * wc
    # Top hat: tall crown, wide flat brim, coloured band.
    crown = rounded_box(x, y + 0.75 * H, 0.72 * wc, 0.75 * H, 0.02)
    brim = ellipse(x, y, 1.35 * wc, 0.09 * fh + 0.05 * H)
    band = torch.maximum(crown, (y + 0.2 * H).abs() - 0.12 * H)
    # Beanie: dome with stripes, folded cuff, pompom.
    bdome = torch.maximum(ellipse(x, y + 0.05 * H, wc * 1.02, H), y + 0.05 * H)
    cuff = rounded_box(x, y, wc * 1.04, 0.14 * H, 0.05 * H)
    pom = length(x, y + 1.05 * H) - 0.2 * wc
    # Headphones: arc over the head from ear to ear, cups on the sides.
    ey = L["eye_y"] - yb + 0.15 * fh
    ring = ellipse(x, y - ey, hw * 1.12, ey + H * 0.45)
    arc = torch.maximum(ring.abs() - (0.03 + 0.05 * c.sev) * fh, y - ey)
    cup_w, cup_h = hw * (0.1 + 0.1 * c.sev), fh * (0.16 + 0.14 * c.sev)
    cups = rounded_box(x.abs() - hw * 1.12, y - ey, cup_w, cup_h, 0.06 * fh)

    def pick(*ds: Tensor) -> Tensor:  # choose per image by kind; kinds given None draw nothing
        out = big
        for k, d in enumerate(ds):
            if d is not None:
                out = torch.where(kind == k, d, out)
        return out

    is_cap = (kind == 0).float().view(n, 1, 1, 1)
    is_beanie = (kind == 2).view(n, 1, 1, 1)
    stripes = (torch.sin(y * (math.pi / (0.12 * H))) > 0).float().unsqueeze(1)
    base_col = torch.where(is_beanie, c1 + (c2 - c1) * stripes, c1.expand(-1, -1, *x.shape[-2:]))
    trim_col = c2 * (1.0 - 0.2 * is_cap)                        # visor / hat band / cuff
    dot_col = is_cap * (1.0 - c1) + (1.0 - is_cap) * c2         # cap logo / pompom
    return [(c.cov(pick(None, brim, None, None)), c1 * 0.35),
            (c.cov(pick(dome, crown, bdome, None)), base_col),
            (c.cov(pick(visor, band, cuff, None)), trim_col),
            (c.cov(pick(logo, None, pom, None)), dot_col),
            (c.cov(pick(None, None, None, arc)), c1 * 0.3 + 0.05),
            (c.cov(pick(None, None, None, cups)), c1)]
