"""Low-level StyleGAN2 operations: FIR up/down-sampling and the biased leaky ReLU.

Every op has two implementations with identical maths (NVlabs' ``impl='ref'`` pattern, without any
compiled kernel):

* ``"ref"`` mirrors the plain-PyTorch path of rosinality's ``op/upfirdn2d.py`` (``upfirdn2d_native``)
  and the CPU branch of ``op/fused_act.py``. It is the readable definition and the speed baseline of
  ``experiments/benchmark_generator.py``.
* ``"fast"`` computes the same result with fewer, larger kernels: the 2-D FIR filter as a depthwise
  convolution over ``(N, C, H, W)`` instead of a single-channel convolution over ``(N*C, 1, H, W)``,
  and zero-insertion up-sampling as a strided depthwise transposed convolution.

Tests assert that both agree to float32 round-off.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

IMPLS = ("ref", "fast")
LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)


def make_kernel(taps: Sequence[float]) -> torch.Tensor:
    """Return the normalised 2-D FIR kernel (k, k) built as the outer product of 1-D ``taps``."""
    k = torch.tensor(list(taps), dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def check_impl(impl: str) -> None:
    """Raise ValueError unless ``impl`` is one of IMPLS."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: Tuple[int, int] = (0, 0), impl: str = "fast") -> torch.Tensor:
    """Upsample by zero insertion, pad, filter with ``kernel`` (true convolution), downsample.

    Args:
        x: (N, C, H, W) input.
        kernel: (kh, kw) FIR filter.
        up, down: integer factors applied to both axes.
        pad: (before, after) padding applied to both axes after up-sampling; negative values crop.
        impl: "ref" or "fast".
    Returns:
        (N, C, (H*up + pad0 + pad1 - kh) // down + 1, same for W).
    """
    check_impl(impl)
    if impl == "ref":
        return _upfirdn2d_ref(x, kernel, up, down, pad)
    return _upfirdn2d_fast(x, kernel, up, down, pad)


def _pad_or_crop(x: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
    x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    h, w = x.shape[-2:]
    return x[..., max(-p0, 0): h - max(-p1, 0), max(-p0, 0): w - max(-p1, 0)]


def _upfirdn2d_ref(x, kernel, up, down, pad):
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    out = x.reshape(n * c, 1, h, 1, w, 1)
    out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1])
    out = out.reshape(n * c, 1, h * up, w * up)
    out = _pad_or_crop(out, pad[0], pad[1])
    weight = torch.flip(kernel, [0, 1]).view(1, 1, kh, kw).to(out.dtype)
    out = F.conv2d(out, weight)
    out = out[:, :, ::down, ::down]
    return out.reshape(n, c, out.shape[-2], out.shape[-1])


def _upfirdn2d_fast(x, kernel, up, down, pad):
    c = x.shape[1]
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).to(x.dtype)
    if up == 1:
        if pad[0] == pad[1] >= 0:  # let the convolution pad: saves a full copy of the input
            return F.conv2d(x, weight.expand(c, 1, kh, kw), stride=down, padding=pad[0], groups=c)
        x = _pad_or_crop(x, pad[0], pad[1])
        return F.conv2d(x, weight.expand(c, 1, kh, kw), stride=down, groups=c)
    # Zero insertion followed by a convolution is a transposed convolution with stride `up`:
    # y[o] = sum_i x[i] k[k - 1 - pad0 + o - up*i], i.e. padding P = k - 1 - pad0; the trailing side
    # differs from upfirdn's by `extra` samples, produced with output_padding or cropped.
    p = kh - 1 - pad[0]
    extra = pad[1] - pad[0] + up - 1
    if p < 0 or kh != kw or extra >= up:
        return _upfirdn2d_ref(x, kernel, up, down, pad)
    out = F.conv_transpose2d(x, kernel.to(x.dtype).expand(c, 1, kh, kw), stride=up, padding=p,
                             output_padding=max(extra, 0), groups=c)
    if extra < 0:
        out = out[..., : out.shape[-2] + extra, : out.shape[-1] + extra]
    if down > 1:
        out = out[:, :, ::down, ::down]
    return out


def conv_transpose2x(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Stride-2 transposed convolution (no padding) computed as four ordinary convolutions.

    Equals ``F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)``. PyTorch's CPU transposed
    convolution takes a slow non-oneDNN path (2-3x slower than an ordinary convolution of the same
    FLOPs here), so each output phase (row parity, column parity) is computed as its own
    convolution with the matching taps of ``weight`` and the phases are interleaved. Same FLOPs.

    Args:
        x: (B, in, H, W).
        weight: (out, in, k, k).
    Returns:
        (B, out, 2H + k - 2, 2W + k - 2).
    """
    b, _, h, w = x.shape
    out_ch, _, k, _ = weight.shape
    out = torch.empty(b, out_ch, 2 * h + k - 2, 2 * w + k - 2, dtype=x.dtype, device=x.device,
                      memory_format=_memory_format(x))
    for ry in range(min(2, k)):
        for rx in range(min(2, k)):
            taps = weight[:, :, ry::2, rx::2].flip([2, 3])
            ny, nx = taps.shape[-2:]
            phase = F.conv2d(x, taps, padding=(ny - 1, nx - 1))
            out[:, :, ry::2, rx::2] = phase
    return out


def _memory_format(x: torch.Tensor):
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else torch.contiguous_format


def bias_leaky_relu(x: torch.Tensor, bias: torch.Tensor | None, slope: float = LRELU_SLOPE,
                    gain: float = LRELU_GAIN, impl: str = "fast") -> torch.Tensor:
    """Return ``leaky_relu(x + bias) * gain`` (rosinality's ``fused_leaky_relu``).

    Args:
        x: (N, C, ...) activations.
        bias: (C,) shared bias or (N, C) per-sample bias, or None.
    """
    check_impl(impl)
    if bias is not None:
        shape = (bias.shape[0], -1) if bias.ndim == 2 else (1, -1)
        x = x + bias.view(*shape, *([1] * (x.ndim - 2)))
    if impl == "ref":
        return F.leaky_relu(x, negative_slope=slope) * gain
    # leaky_relu is positively homogeneous: lrelu(x) * g == lrelu(x * g) for g > 0; the in-place
    # activation saves one full-size tensor. `x` is a fresh temporary here unless bias is None.
    if bias is None:
        x = x * gain
    else:
        x.mul_(gain)
    return F.leaky_relu_(x, negative_slope=slope)
