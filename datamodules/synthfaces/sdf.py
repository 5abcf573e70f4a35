"""Signed-distance primitives and colour helpers shared by the SynthFaces renderer and corruptions.

All distance functions take coordinate tensors that broadcast against each other (typically
``(N, H, W)`` pixel coordinates and ``(N, 1, 1)`` per-image parameters) and return the signed
distance, negative inside the shape. Some are exact, some (ellipse, curve bands) are first-order
approximations; near the boundary all have a gradient of length ~1, which is all the anti-aliasing
ramp needs.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def coverage(d: Tensor, aa: Tensor | float) -> Tensor:
    """Anti-aliased coverage in [0, 1] of a shape with signed distance ``d``.

    ``aa`` is the number of pixels per distance unit (1 / pixel size in the units of ``d``), so the
    coverage ramps linearly from 1 to 0 over one pixel centred on the boundary; coverage >= 0.5
    exactly when the pixel centre lies inside (d <= 0).
    """
    return (0.5 - d * aa).clamp_(0.0, 1.0)


def length(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean norm sqrt(x^2 + y^2) (several times faster than ``torch.hypot`` on CPU)."""
    return torch.addcmul(x * x, y, y).sqrt_()


def circle(x: Tensor, y: Tensor, r: Tensor | float) -> Tensor:
    """Exact distance to a circle of radius ``r`` centred at the origin of (x, y)."""
    return length(x, y) - r


def ellipse(x: Tensor, y: Tensor, rx: Tensor | float, ry: Tensor | float) -> Tensor:
    """Approximate distance to the axis-aligned ellipse with semi-axes (rx, ry) at the origin.

    First-order distance to the level set of k(p) = (x/rx)^2 + (y/ry)^2: d = (k - 1) / |grad k|.
    Exact sign, unit gradient on the boundary; larger than the true distance far outside.
    """
    irx, iry = 1.0 / rx, 1.0 / ry
    a, b = x * irx, y * iry
    k = torch.addcmul(a * a, b, b)
    a.mul_(irx)
    b.mul_(iry)
    grad = length(a, b).mul_(2.0).add_(1e-6)
    return k.sub_(1.0).div_(grad)


def rounded_box(x: Tensor, y: Tensor, hx: Tensor | float, hy: Tensor | float,
                r: Tensor | float = 0.0) -> Tensor:
    """Exact distance to a box with half sizes (hx, hy) and corner radius ``r`` at the origin."""
    qx = x.abs() - hx + r
    qy = y.abs() - hy + r
    outside = length(qx.clamp(min=0.0), qy.clamp(min=0.0))
    inside = torch.maximum(qx, qy).clamp(max=0.0)
    return outside + inside - r


def capsule(x: Tensor, y: Tensor, ax: Tensor | float, ay: Tensor | float,
            bx: Tensor | float, by: Tensor | float, r: Tensor | float) -> Tensor:
    """Exact distance to the segment (ax, ay)-(bx, by) thickened by radius ``r``."""
    pax, pay = x - ax, y - ay
    bax, bay = bx - ax, by - ay
    inv = 1.0 / (bax * bax + bay * bay + 1e-12)
    h = ((pax * bax + pay * bay) * inv).clamp_(0.0, 1.0)
    return length(pax - bax * h, pay - bay * h) - r


def rotate(x: Tensor, y: Tensor, angle: Tensor | float) -> tuple[Tensor, Tensor]:
    """Rotate coordinates by ``-angle`` (radians), i.e. express them in a frame rotated by ``angle``."""
    c, s = torch.cos(torch.as_tensor(angle)), torch.sin(torch.as_tensor(angle))
    return c * x + s * y, c * y - s * x


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Convert hue/saturation/value tensors of shape (N,) in [0, 1] to RGB colours (N, 3)."""
    h = h.remainder(1.0)
    k = torch.stack([(5.0 + h * 6.0), (3.0 + h * 6.0), (1.0 + h * 6.0)], dim=1).remainder(6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return v[:, None] - v[:, None] * s[:, None] * ramp


def palette_lookup(palette: Tensor, t: Tensor) -> Tensor:
    """Piecewise-linear colour ramp: ``palette`` (K, 3), ``t`` (N,) in [0, 1] -> colours (N, 3)."""
    k = palette.shape[0] - 1
    pos = (t.clamp(0.0, 1.0) * k)
    i0 = pos.floor().long().clamp(max=k - 1)
    w = (pos - i0.to(pos.dtype))[:, None]
    return palette[i0] * (1.0 - w) + palette[i0 + 1] * w
