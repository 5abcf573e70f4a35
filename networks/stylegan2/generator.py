"""StyleGAN2 generator (rosinality/stylegan2-pytorch layout) with synthesis hooks.

Hook points are named after the module that owns them: ``"conv1.mod"``, ``"conv1.out"``,
``"convs.{k}.in"`` (the conv's input; for an up-sampling conv, the previous block's output after that
block's ToRGB has used it: DHR's feature is ``"convs.10.in"`` at 1024 px, i.e.
``Generator.next_block_input(128)``), ``"convs.{k}.mod"`` (modulated-conv output before
noise/bias/activation: where the ICCV'23 method replaces features) and ``"convs.{k}.out"`` (after the
activation; the block output ``"convs.{2j+1}.out"`` also feeds that block's ToRGB). ``synthesize`` can
return any of them and accepts a callable per point that replaces or blends the tensor.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .layers import ConstantInput, EqualLinear, PixelNorm, StyledConv, ToRGB, set_impl

FeatureEdit = Callable[[torch.Tensor], torch.Tensor]


def channel_table(size: int, channel_multiplier: float = 2, channel_max: int = 512) -> Dict[int, int]:
    """Channels per resolution: min(channel_max, 16384 * channel_multiplier / res) for res = 4..size.

    With the defaults this is rosinality's table (512 up to 32 px, then 256*cm, 128*cm, ...).
    """
    return {2 ** i: max(1, min(channel_max, int(16384 * channel_multiplier / 2 ** i)))
            for i in range(2, int(math.log2(size)) + 1)}


@dataclass
class SynthesisOutput:
    """Result of ``Generator.synthesize``: image (B, 3, size, size) and captured features by point."""

    image: torch.Tensor
    features: Dict[str, torch.Tensor] = field(default_factory=dict)


class Generator(nn.Module):
    """StyleGAN2 generator; parameter names match rosinality's ``Generator`` (and ``g_ema`` files).

    Args:
        size: output resolution (power of two >= 8).
        style_dim: dimension of z and w.
        n_mlp: mapping-network depth.
        channel_multiplier, channel_max: channel widths (see ``channel_table``); defaults fit
            ``stylegan2-ffhq-config-f.pt`` (channel_multiplier=2).
        blur_kernel: FIR taps for up-sampling.
        lr_mlp: learning-rate multiplier of the mapping network.
        impl: "fast" (default) or "ref" (rosinality's plain-PyTorch maths), see ``ops``.
    """

    def __init__(self, size: int, style_dim: int = 512, n_mlp: int = 8, channel_multiplier: float = 2,
                 blur_kernel: Sequence[int] = (1, 3, 3, 1), lr_mlp: float = 0.01, channel_max: int = 512,
                 impl: str = "fast"):
        super().__init__()
        log_size = int(math.log2(size))
        if 2 ** log_size != size or size < 8:
            raise ValueError(f"Generator size must be a power of two >= 8, got {size}")
        self.config = dict(size=size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=channel_multiplier,
                           blur_kernel=list(blur_kernel), lr_mlp=lr_mlp, channel_max=channel_max)
        self.size, self.style_dim, self.log_size = size, style_dim, log_size
        self.channels = channel_table(size, channel_multiplier, channel_max)

        self.style = nn.Sequential(PixelNorm(), *[
            EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu") for _ in range(n_mlp)])

        ch = self.channels
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(ch[4], style_dim, upsample=False)
        self.num_layers = (log_size - 2) * 2 + 1
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = (layer_idx + 5) // 2
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, 2 ** res, 2 ** res))
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        in_ch = ch[4]
        for i in range(3, log_size + 1):
            out_ch = ch[2 ** i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True, blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_ch, style_dim))
            in_ch = out_ch
        self.n_latent = log_size * 2 - 2
        self.set_impl(impl)

    # ----------------------------------------------------------------------------------------
    def set_impl(self, impl: str) -> "Generator":
        """Switch every layer to op implementation ``impl`` ("fast" | "ref"); returns self."""
        set_impl(self, impl)
        return self

    @staticmethod
    def block_output(res: int) -> str:
        """Hook point holding the post-activation output of the ``res`` block (e.g. 128 -> "convs.9.out")."""
        j = int(math.log2(res))
        return "conv1.out" if res == 4 else f"convs.{2 * (j - 3) + 1}.out"

    @staticmethod
    def next_block_input(res: int) -> str:
        """Hook point of the ``res`` block's output as the next block receives it, after the ``res`` ToRGB has used
        the unedited tensor (e.g. 128 -> "convs.10.in"; DHR's ``feature_idx`` 11 at 1024 px). Needs res < size."""
        j = int(math.log2(res))
        return f"convs.{2 * (j - 2)}.in"

    @staticmethod
    def upconv_modulated(res: int) -> str:
        """Hook point of the up-sampling conv producing ``res`` (before noise/bias/act), e.g. 32 -> "convs.4.mod"."""
        j = int(math.log2(res))
        return f"convs.{2 * (j - 3)}.mod"

    def hook_points(self) -> List[str]:
        """All valid hook point names in synthesis order."""
        names = ["conv1.mod", "conv1.out"]
        for k in range(len(self.convs)):
            names += [f"convs.{k}.in", f"convs.{k}.mod", f"convs.{k}.out"]
        return names

    def make_noise(self) -> List[torch.Tensor]:
        """Fresh N(0, 1) noise maps, one per noise layer: [(1, 1, r, r)]."""
        device = self.input.input.device
        noises = [torch.randn(1, 1, 4, 4, device=device)]
        for i in range(3, self.log_size + 1):
            noises += [torch.randn(1, 1, 2 ** i, 2 ** i, device=device) for _ in range(2)]
        return noises

    def stored_noise(self) -> List[torch.Tensor]:
        """The registered deterministic noise buffers ``noises.noise_{i}``."""
        return [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

    @torch.no_grad()
    def mean_latent(self, n_latent: int, seed: Optional[int] = None) -> torch.Tensor:
        """Mean of w over ``n_latent`` random z: (1, style_dim)."""
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        z = torch.randn(n_latent, self.style_dim, generator=gen).to(self.input.input.device)
        return self.style(z).mean(0, keepdim=True)

    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Mapping network: z (B, style_dim) -> w (B, style_dim)."""
        return self.style(z)

    # ----------------------------------------------------------------------------------------
    def forward(self, styles: Sequence[torch.Tensor], return_latents: bool = False,
                inject_index: Optional[int] = None, truncation: float = 1.0,
                truncation_latent: Optional[torch.Tensor] = None, input_is_latent: bool = False,
                noise: Optional[Sequence[Optional[torch.Tensor]]] = None, randomize_noise: bool = False):
        """rosinality-compatible call: list of z (B, D) or w (B, D) / W+ (B, n_latent, D) -> (image, latent|None).

        Noise is the stored buffers unless ``randomize_noise=True`` or ``noise`` is given.
        Two styles mix at ``inject_index`` (random when None).
        """
        latent = self.styles_to_latent(styles, inject_index, truncation, truncation_latent, input_is_latent)
        image = self.synthesize(latent, noise=noise, randomize_noise=randomize_noise).image
        return image, (latent if return_latents else None)

    def styles_to_latent(self, styles, inject_index=None, truncation=1.0, truncation_latent=None,
                         input_is_latent=False) -> torch.Tensor:
        """Map/truncate/mix a list of styles into a W+ tensor (B, n_latent, style_dim)."""
        if not input_is_latent:
            styles = [self.style(s) for s in styles]
        if truncation < 1:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent (e.g. Generator.mean_latent(4096))")
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        if len(styles) < 2:
            s = styles[0]
            return s if s.ndim == 3 else s.unsqueeze(1).repeat(1, self.n_latent, 1)
        if inject_index is None:
            inject_index = random.randint(1, self.n_latent - 1)
        a = styles[0] if styles[0].ndim == 3 else styles[0].unsqueeze(1).repeat(1, inject_index, 1)
        b = styles[1] if styles[1].ndim == 3 else styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)
        return torch.cat([a[:, :inject_index], b[:, : self.n_latent - inject_index]], 1)

    def synthesize(self, latent: torch.Tensor, noise: Optional[Sequence[Optional[torch.Tensor]]] = None,
                   randomize_noise: bool = False, edits: Optional[Mapping[str, FeatureEdit]] = None,
                   capture: Iterable[str] = ()) -> SynthesisOutput:
        """Run the synthesis network on W+ codes.

        Args:
            latent: (B, n_latent, style_dim) W+ codes.
            noise: list of ``num_layers`` maps (None entries draw random noise); default: stored buffers.
            randomize_noise: draw fresh noise for every layer instead of the stored buffers.
            edits: {hook point: fn(feature) -> feature} replacing/blending features during synthesis.
            capture: hook points whose (post-edit) tensors are returned in ``features``.
        Returns:
            SynthesisOutput(image (B, 3, size, size), features {point: tensor}).
        """
        if latent.ndim != 3 or latent.shape[1] < self.n_latent:
            raise ValueError(f"latent must be (B, {self.n_latent}, {self.style_dim}), got {tuple(latent.shape)}")
        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else self.stored_noise()
        edits = dict(edits or {})
        capture = set(capture)
        unknown = (set(edits) | capture) - set(self.hook_points())
        if unknown:
            raise KeyError(f"unknown hook point(s) {sorted(unknown)}; valid: {self.hook_points()}")
        features: Dict[str, torch.Tensor] = {}

        def hook_for(name):
            wanted = {p for p in ("in", "mod", "out") if f"{name}.{p}" in edits or f"{name}.{p}" in capture}
            if not wanted:
                return None

            def hook(point, tensor):
                key = f"{name}.{point}"
                if key in edits:
                    tensor = edits[key](tensor)
                if key in capture:
                    features[key] = tensor
                return tensor
            return hook

        out = self.input(latent.shape[0], channels_last=self.impl == "fast")
        out = self.conv1(out, latent[:, 0], noise=noise[0], hook=hook_for("conv1"))
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for k, to_rgb in enumerate(self.to_rgbs):
            out = self.convs[2 * k](out, latent[:, i], noise=noise[2 * k + 1], hook=hook_for(f"convs.{2 * k}"))
            out = self.convs[2 * k + 1](out, latent[:, i + 1], noise=noise[2 * k + 2],
                                        hook=hook_for(f"convs.{2 * k + 1}"))
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return SynthesisOutput(skip.contiguous(), features)
