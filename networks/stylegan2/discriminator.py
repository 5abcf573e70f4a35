"""StyleGAN2 residual discriminator with rosinality parameter names."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .generator import channel_table
from .layers import ConvLayer, EqualLinear, ResBlock, set_impl


class Discriminator(nn.Module):
    """Residual discriminator: image (B, 3, size, size) -> realness logits (B, 1).

    Args mirror rosinality's ``Discriminator``; ``channel_max`` shrinks widths for small models.
    Minibatch-stddev uses groups of ``min(B, 4)``; B must be divisible by that group size.
    """

    def __init__(self, size: int, channel_multiplier: float = 2, blur_kernel: Sequence[int] = (1, 3, 3, 1),
                 channel_max: int = 512, impl: str = "fast"):
        super().__init__()
        self.config = dict(size=size, channel_multiplier=channel_multiplier, blur_kernel=list(blur_kernel),
                           channel_max=channel_max)
        ch = channel_table(size, channel_multiplier, channel_max)
        log_size = int(math.log2(size))
        convs = [ConvLayer(3, ch[size], 1)]
        in_ch = ch[size]
        for i in range(log_size, 2, -1):
            out_ch = ch[2 ** (i - 1)]
            convs.append(ResBlock(in_ch, out_ch, blur_kernel))
            in_ch = out_ch
        self.convs = nn.Sequential(*convs)
        self.stddev_group, self.stddev_feat = 4, 1
        self.final_conv = ConvLayer(in_ch + 1, ch[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 4 * 4, ch[4], activation="fused_lrelu"),
                                          EqualLinear(ch[4], 1))
        self.set_impl(impl)

    def set_impl(self, impl: str) -> "Discriminator":
        """Switch op implementation ("fast" | "ref"); returns self."""
        set_impl(self, impl)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "fast":
            x = x.contiguous(memory_format=torch.channels_last)  # faster oneDNN convolutions
        out = self.convs(x)
        batch, channel, h, w = out.shape
        group = min(batch, self.stddev_group)
        if batch % group:
            raise ValueError(f"Discriminator batch {batch} must be divisible by the stddev group {group}")
        stddev = out.reshape(group, -1, self.stddev_feat, channel // self.stddev_feat, h, w)
        stddev = torch.sqrt(stddev.var(0, unbiased=False) + 1e-8)
        stddev = stddev.mean([2, 3, 4], keepdim=True).squeeze(2)
        stddev = stddev.repeat(group, 1, h, w)
        out = self.final_conv(torch.cat([out, stddev], 1))
        return self.final_linear(out.reshape(batch, -1))
