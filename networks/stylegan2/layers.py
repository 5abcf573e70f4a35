"""StyleGAN2 layers with rosinality/stylegan2-pytorch parameter names and maths.

Parameters may be *per-sample*: when a parameter tensor carries one extra leading dimension of size
B (the batch), each sample uses its own copy. Layers detect this from ``tensor.ndim`` so a batch of
per-image tuned generators runs in one forward pass (see ``networks.stylegan2.per_sample``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import LRELU_GAIN, bias_leaky_relu, check_impl, conv_transpose2x, make_kernel, upfirdn2d


def _per_sample(t: torch.Tensor, base_ndim: int) -> bool:
    return t.ndim == base_ndim + 1


class ImplMixin:
    """Holds ``impl`` ("ref" | "fast"), the op implementation the layer uses."""

    impl = "fast"


def set_impl(module: nn.Module, impl: str) -> None:
    """Set ``impl`` on ``module`` and every ImplMixin layer inside it."""
    check_impl(impl)
    for m in module.modules():
        if isinstance(m, ImplMixin):
            m.impl = impl
    module.impl = impl


class PixelNorm(nn.Module):
    """Normalise each vector to unit second moment: (B, D) -> (B, D)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


class EqualLinear(ImplMixin, nn.Module):
    """Linear layer with equalised learning rate (weight (out, in) scaled by lr_mul / sqrt(in)).

    forward: (B, in) -> (B, out); with ``activation="fused_lrelu"`` the bias goes inside the
    leaky ReLU (gain sqrt 2).
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: Optional[str] = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init))) if bias else None
        self.activation = activation
        self.scale = (1 / math.sqrt(in_dim)) * lr_mul
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.scale
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if _per_sample(weight, 2):
            out = torch.einsum("bi,boi->bo", x, weight)
        else:
            out = F.linear(x, weight)
        if self.activation:
            return bias_leaky_relu(out, bias, impl=self.impl)
        return out + bias if bias is not None else out

    def extra_repr(self) -> str:
        return f"{self.weight.shape[-1]}, {self.weight.shape[-2]}, lr_mul={self.lr_mul}"


class EqualConv2d(nn.Module):
    """Conv2d with equalised learning rate: weight (out, in, k, k) scaled by 1/sqrt(in*k*k)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_ch * kernel_size ** 2)
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)


class FusedLeakyReLU(ImplMixin, nn.Module):
    """Per-channel bias + leaky ReLU (slope 0.2) x sqrt 2. (B, C, H, W) -> same."""

    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bias_leaky_relu(x, self.bias, impl=self.impl)


class Blur(ImplMixin, nn.Module):
    """FIR low-pass filter with padding (and kernel gain for up-sampling layers)."""

    def __init__(self, kernel: Sequence[int], pad: tuple, upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * upsample_factor ** 2
        self.register_buffer("kernel", k)
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad, impl=self.impl)


class Upsample(ImplMixin, nn.Module):
    """2x FIR up-sampling (ToRGB skip path): (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, kernel: Sequence[int], factor: int = 2):
        super().__init__()
        self.factor = factor
        self.register_buffer("kernel", make_kernel(kernel) * factor ** 2)
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad, impl=self.impl)


class ModulatedConv2d(ImplMixin, nn.Module):
    """Style-modulated (and optionally demodulated) convolution, optionally 2x up/down-sampling.

    Weight (1, out, in, k, k), or per-sample (B, 1, out, in, k, k). forward(x (B, in, H, W),
    style (B, style_dim)) -> (B, out, H', W'). The "ref" path is rosinality's grouped ("fused")
    convolution. The "fast" path with a shared weight scales the *activations* by the style and
    the output by the demodulation coefficients around one ordinary convolution, which is the same
    maths with larger, better-vectorised kernels; per-sample weights always use the grouped path.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False, downsample: bool = False, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.eps = 1e-8
        self.kernel_size, self.in_channel, self.out_channel = kernel_size, in_ch, out_ch
        self.upsample, self.downsample, self.demodulate = upsample, downsample, demodulate
        if upsample:
            factor = 2
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))
        self.scale = 1 / math.sqrt(in_ch * kernel_size ** 2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1)

    def extra_repr(self) -> str:
        return (f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, "
                f"upsample={self.upsample}, downsample={self.downsample}, demodulate={self.demodulate}")

    def forward(self, x: torch.Tensor, style: torch.Tensor, out_gain: float = 1.0,
                addend: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Return ``conv(x, style) * out_gain + addend``.

        ``out_gain`` is folded into the demodulation and ``addend`` (broadcastable, e.g. the
        (1, C, H, W) noise + bias term of StyledConv) is added in the same pass.
        """
        style = self.modulation(style)
        if self.impl == "fast" and not _per_sample(self.weight, 5):
            return self._forward_shared(x, style, out_gain, addend)
        out = self._forward_grouped(x, style, out_gain)
        return out if addend is None else out + addend

    def _forward_grouped(self, x, style, out_gain):
        batch, in_ch, h, w = x.shape
        k = self.kernel_size
        weight = self.weight[:, 0] if _per_sample(self.weight, 5) else self.weight  # (1|B, out, in, k, k)
        weight = self.scale * weight * style.view(batch, 1, in_ch, 1, 1)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps).view(batch, -1, 1, 1, 1)
        if out_gain != 1.0:
            weight = weight * out_gain
        if self.upsample:
            x = x.reshape(1, batch * in_ch, h, w)
            weight = weight.transpose(1, 2).reshape(batch * in_ch, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=batch)
            out = self.blur(out.view(batch, self.out_channel, out.shape[-2], out.shape[-1]))
        elif self.downsample:
            x = self.blur(x)
            x = x.reshape(1, batch * in_ch, x.shape[-2], x.shape[-1])
            out = F.conv2d(x, weight.reshape(batch * self.out_channel, in_ch, k, k), padding=0, stride=2, groups=batch)
        else:
            x = x.reshape(1, batch * in_ch, h, w)
            out = F.conv2d(x, weight.reshape(batch * self.out_channel, in_ch, k, k), padding=self.padding, groups=batch)
        return out.view(batch, self.out_channel, out.shape[-2], out.shape[-1])

    def _forward_shared(self, x, style, out_gain, addend):
        batch = x.shape[0]
        weight = self.scale * self.weight[0]  # (out, in, k, k)
        x = x * style.view(batch, -1, 1, 1)
        if self.upsample:
            out = self.blur(conv_transpose2x(x, weight))
        elif self.downsample:
            out = F.conv2d(self.blur(x), weight, padding=0, stride=2)
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # sum_{i,k} (w[o,i,k] * s[b,i])^2 as s^2 @ sum_k w^2, without materialising B weight copies
            coef = (torch.rsqrt(style.pow(2) @ weight.pow(2).sum([2, 3]).t() + self.eps) * out_gain).view(batch, -1, 1, 1)
        elif out_gain != 1.0:
            coef = out.new_tensor(out_gain)
        else:
            return out if addend is None else out + addend
        return out * coef if addend is None else torch.addcmul(addend, out, coef)


class NoiseInjection(nn.Module):
    """Add per-pixel noise scaled by a learned scalar: x (B, C, H, W) + weight * noise (B|1, 1, H, W)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def scaled_noise(self, size, like: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """Return weight * noise, (B|1, 1, H, W); draws N(0, 1) noise of ``size`` = (B, H, W) when None."""
        if noise is None:
            b, h, w = size
            noise = like.new_empty(b, 1, h, w).normal_()
        weight = self.weight.view(-1, 1, 1, 1) if _per_sample(self.weight, 1) else self.weight
        return weight * noise

    def forward(self, x: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, _, h, w = x.shape
        return x + self.scaled_noise((b, h, w), x, noise)


class ConstantInput(nn.Module):
    """Learned constant (1, C, 4, 4) repeated over the batch; per-sample (B, 1, C, 4, 4) allowed."""

    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, batch: int, channels_last: bool = False) -> torch.Tensor:
        out = self.input[:, 0] if _per_sample(self.input, 4) else self.input.repeat(batch, 1, 1, 1)
        # oneDNN convolutions and depthwise filters run faster on NHWC; every op downstream keeps it
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class StyledConv(ImplMixin, nn.Module):
    """Modulated conv -> noise injection -> biased leaky ReLU, with feature hook points.

    forward(x (B, in, H, W), style (B, style_dim), noise, hook) -> (B, out, H', W'). ``hook`` is
    an optional callable ``hook(point, tensor) -> tensor`` called with point "in" (the input x),
    "mod" (modulated conv output, before noise/bias/activation) and "out" (after the activation);
    it may return a replacement tensor.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, upsample: bool = False,
                 blur_kernel: Sequence[int] = (1, 3, 3, 1), demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel_size, style_dim, upsample=upsample,
                                    blur_kernel=blur_kernel, demodulate=demodulate)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x, style, noise=None, hook=None):
        if hook is not None:
            x = hook("in", x)
        per_sample_bias = _per_sample(self.activate.bias, 1)
        if self.impl == "fast" and hook is None:
            # gain folded into the demodulation, the small noise + bias term added in the same pass,
            # then an in-place activation: lrelu(z) * g == lrelu(z * g) for g > 0
            bias = self.activate.bias
            bias = bias.view(bias.shape[0], -1, 1, 1) if per_sample_bias else bias.view(1, -1, 1, 1)
            b, _, h, w = x.shape
            size = (b, 2 * h, 2 * w) if self.conv.upsample else (b, h, w)
            addend = (self.noise.scaled_noise(size, x, noise) + bias) * LRELU_GAIN
            out = self.conv(x, style, out_gain=LRELU_GAIN, addend=addend)
            return F.leaky_relu_(out, 0.2)
        out = self.conv(x, style)
        if hook is not None:
            out = hook("mod", out)
        out = self.noise(out, noise=noise)
        out = self.activate(out)
        if hook is not None:
            out = hook("out", out)
        return out


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB (no demodulation) + bias, plus the up-sampled skip image."""

    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.conv(x, style)
        bias = self.bias[:, 0] if _per_sample(self.bias, 4) else self.bias
        out = out + bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConvLayer(nn.Sequential):
    """Discriminator conv block: [Blur] -> EqualConv2d -> [FusedLeakyReLU] (rosinality key layout)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, downsample: bool = False,
                 blur_kernel: Sequence[int] = (1, 3, 3, 1), bias: bool = True, activate: bool = True):
        layers = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_ch, out_ch, kernel_size, padding=padding, stride=stride,
                                  bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_ch, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """Residual down-sampling block of the discriminator: (B, in, H, W) -> (B, out, H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int, blur_kernel: Sequence[int] = (1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_ch, out_ch, 1, downsample=True, activate=False, bias=False, blur_kernel=blur_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)
