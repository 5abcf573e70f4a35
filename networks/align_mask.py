"""Joint spatial alignment + invertibility mask (stage two of the ICCV 2023 OOD GAN inversion method).

methods.md §2.3-§2.6: at a few generator resolutions r (default 32..256 for a 1024 px G) the pre-activation
output of the up-sampling conv, F_r (B, C, r, r), is replaced by an aligned feature. A small network
(``AlignNet``) compares F_r with an encoder feature E_r at the same resolution and predicts a flow
(dx, dy) and a mask alpha; F_r is warped by the flow where alpha is high. The per-level alphas are fused
into one full-resolution mask A and the output is ``A * x + (1 - A) * G_out``.

Mask polarity (used everywhere in this module): **alpha = 1 means "not invertible / out of domain: copy the
pixel from the input image"**; alpha = 0 means "in domain: keep the generator's pixel". The same alpha also
gates the feature warp (the warp only acts where alpha > 0), as in the official code.

Three resampling choices are options of ``AlignMaskNet`` (official values are the defaults; official weights were
trained for the official function and must run with it):
- ``blur_padding``: "zeros" (official: the [1,3,3,1] blur of the (dx, dy, alpha) maps pads with zeros, which pulls
  the top/left border towards 0) or "replicate" (ours: no attenuation of masks that touch the border);
- ``warp_grid``: "linspace" (official: ``torch.linspace(-1, 1)`` nodes sampled by ``grid_sample(align_corners=False)``,
  so a zero flow still shrinks the map by one pixel's worth) or "identity" (ours: pixel-centre grid, a zero flow is
  an exact identity);
- ``gate_interpolation``: how the coarser level's alpha is resized before it gates a finer level: "bicubic" (official,
  align_corners=True) or "bilinear" (ours, align_corners=False; the same resampling as the mask fusion).
``inference_noise``: the generator noise of a forward that is given none: "random" (official: the generator draws
fresh noise maps, so outputs vary from run to run) or "stored" (ours: G's stored noise buffers, reproducible).
Files written before these options existed (the shipped SynthFaces hand-off) were trained with the "replicate",
"identity", "bilinear" variants and evaluated with the stored noise; ``load_align_mask`` runs them so
(``LEGACY_MATHS``).

Other differences from the official implementation (engineering, no maths change):
- features are replaced through ``Generator.synthesize(edits=...)`` instead of hijacking NoiseInjection (the
  official callback divides by the noise strength);
- encoder taps of the wrong size are resized bilinearly with antialiasing (the official taps always fit);
- flows are clamped to [-warp_scale, warp_scale] after every cycle (the official code clamps only from the
  second cycle on; mathematically the first clamp is a no-op, it only removes float round-off).
Official checkpoints (``net_g_*.pth``) are converted by ``networks.convert_ood_official``; ``load_align_mask``
reads them directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from networks.checkpoints import CheckpointError, load_strict, plain_containers, safe_load, save_atomic
from networks.resolution import is_power_of_two
from networks.stylegan2.layers import Blur

TAP_STRIDES = {"f0": 1, "f1": 2, "f2": 4, "f3": 8, "f4": 16}
BLUR_PADDINGS = ("zeros", "replicate")
WARP_GRIDS = ("linspace", "identity")
GATE_INTERPOLATIONS = ("bicubic", "bilinear")
INFERENCE_NOISES = ("random", "stored")
# the published function (defaults of every constructor here)
OFFICIAL_MATHS = {"blur_padding": "zeros", "warp_grid": "linspace", "gate_interpolation": "bicubic",
                  "inference_noise": "random"}
# what hand-offs written before these options existed were trained with (the shipped SynthFaces align_mask.pt)
LEGACY_MATHS = {"blur_padding": "replicate", "warp_grid": "identity", "gate_interpolation": "bilinear",
                "inference_noise": "stored"}


# ----------------------------------------------------------------------------------------------- helpers
def default_levels(size: int) -> list:
    """Resolutions r (powers of two) with ``max(8, size // 32) <= r <= size // 4``.

    1024 -> [32, 64, 128, 256]; 256 -> [8, 16, 32, 64]; 64 -> [8, 16]. ValueError when ``size`` is not a
    power of two or is too small (< 32) to have a level.
    """
    if not is_power_of_two(size):
        raise ValueError(f"default_levels: size must be a power of two, got {size!r}")
    lo, hi = max(8, size // 32), size // 4
    levels = [2 ** i for i in range(3, int(math.log2(size)) + 1) if lo <= 2 ** i <= hi]
    if not levels:
        raise ValueError(f"default_levels: generator size {size} is too small for any alignment level (need >= 32)")
    return levels


def tap_for_level(r: int, encoder_input_size: int) -> str:
    """Name of the encoder tap ("f0".."f4", strides 1/2/4/8/16 of the encoder input) that feeds level ``r``.

    The tap whose side is exactly ``r``; otherwise the smallest tap larger than ``r`` (the level then
    downsizes it, bilinear with antialiasing). E.g. 1024 px G + 256 px encoder: 32 -> f3, 64 -> f2,
    128 -> f1, 256 -> f0. ValueError naming both sizes when every tap is smaller than ``r``.
    """
    if not is_power_of_two(encoder_input_size):
        raise ValueError(f"tap_for_level: encoder_input_size must be a power of two, got {encoder_input_size!r}")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"tap_for_level: level resolution must be a positive int, got {r!r}")
    sides = {name: encoder_input_size // s for name, s in TAP_STRIDES.items() if encoder_input_size // s >= 1}
    for name, side in sides.items():
        if side == r:
            return name
    larger = [(side, name) for name, side in sides.items() if side > r]
    if not larger:
        raise ValueError(f"no encoder tap can feed alignment level {r}: encoder_input_size={encoder_input_size} "
                         f"gives taps of at most {encoder_input_size} px (need >= {r}); use a larger encoder "
                         f"input or drop level {r}")
    return min(larger)[1]


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of (B, C, h, w) to (size, size); antialiased when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=x.shape[-1] > size or x.shape[-2] > size)


def _check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")


def warp(feature: torch.Tensor, flow: torch.Tensor, grid: str = "linspace") -> torch.Tensor:
    """Backward-warp ``feature`` (B, C, H, W) by ``flow`` (B, 2, H, W) -> (B, C, H, W).

    ``flow`` is in normalised grid units ([-1, 1] spans the map; channel 0 = x / width, channel 1 = y /
    height): output(y, x) samples feature at (x + flow_x, y + flow_y). Bilinear, zeros padding,
    align_corners=False. ``grid``: "linspace" (official: base grid ``linspace(-1, 1, n)``, whose nodes are the
    align_corners=True positions, so with a zero flow the output is the map shrunk by (n - 1) / n about its centre,
    its outermost pixels half zero padding) or
    "identity" (pixel centres ``linspace(-1 + 1/n, 1 - 1/n, n)``: a zero flow returns ``feature`` unchanged).
    """
    _check_choice("warp", "grid", grid, WARP_GRIDS)
    if feature.ndim != 4 or flow.ndim != 4 or flow.shape[1] != 2 or flow.shape[0] != feature.shape[0] \
            or flow.shape[-2:] != feature.shape[-2:]:
        raise ValueError(f"warp: feature (B, C, H, W) and flow (B, 2, H, W) must agree, got "
                         f"{tuple(feature.shape)} and {tuple(flow.shape)}")
    h, w = feature.shape[-2:]
    if grid == "identity":  # pixel centres in grid_sample(align_corners=False) coordinates
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=flow.device, dtype=flow.dtype)
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=flow.device, dtype=flow.dtype)
    else:
        ys = torch.linspace(-1, 1, h, device=flow.device, dtype=flow.dtype)
        xs = torch.linspace(-1, 1, w, device=flow.device, dtype=flow.dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    grid_xy = torch.stack([gx, gy], dim=-1).unsqueeze(0) + flow.permute(0, 2, 3, 1)
    return F.grid_sample(feature, grid_xy.to(feature.dtype), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def gate(alpha: torch.Tensor, coarse: torch.Tensor, interpolation: str = "bicubic") -> torch.Tensor:
    """Official "PRM" update ``clip(alpha * U + U * (1 - U), 0, 1)`` with U = ``coarse`` resized to alpha's size.

    alpha (B, 1, H, W), coarse (B, 1, h, w), both in [0, 1] (1 = copy from input). Where U = 0 the result
    is 0 (a finer level can only mark pixels inside the coarse OOD region), where U = 1 it is ``alpha``;
    in between it is ``U * (alpha + 1 - U)``, i.e. partly-uncertain coarse pixels keep some mask on their own.
    ``interpolation``: "bicubic" (official, align_corners=True; may overshoot [0, 1] next to steps before the
    final clip) or "bilinear" (align_corners=False, antialiased when shrinking).
    """
    _check_choice("gate", "interpolation", interpolation, GATE_INTERPOLATIONS)
    if coarse.shape[-2:] == alpha.shape[-2:]:
        u = coarse
    elif interpolation == "bicubic":
        u = F.interpolate(coarse, size=alpha.shape[-2:], mode="bicubic", align_corners=True)
    else:
        u = _resize(coarse, alpha.shape[-1])
    return torch.clamp(alpha * u + u * (1 - u), 0.0, 1.0)


def fuse_masks(alphas: Mapping[int, torch.Tensor], size: int) -> torch.Tensor:
    """Official mask fusion: per-level alphas {r: (B, 1, r, r)} -> one mask (B, 1, size, size) in [0, 1].

    In ascending r: A <- up(alpha_first); then A <- clip(A * (up(alpha_r) + 1 - A), 0, 1) (``gate`` with the
    running A as the coarse mask), up = bilinear, align_corners=False. Meaning: the coarsest level decides
    where the input may be copied at all; each finer level refines the mask only inside that region (A = 0
    stays 0, A = 1 becomes alpha_r, a soft A keeps part of itself). 1 = copy the input pixel.
    """
    if not alphas:
        raise ValueError("fuse_masks: no level alphas given")
    fused = None
    for r in sorted(alphas, key=int):
        up = _resize(alphas[r], size)
        fused = up.clamp(0.0, 1.0) if fused is None else gate(up, fused)  # same size: no resampling
    return fused


def blend(x: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * x + (1 - mask) * generated``: mask (B, 1, S, S) = 1 copies the input x (B, 3, S, S)."""
    return mask * x + (1 - mask) * generated


# ----------------------------------------------------------------------------------------------- networks
class IRBlock(nn.Module):
    """IR bottleneck with affine InstanceNorm (official ``bottleneck_IR(bn='InstanceNorm')``, stride 1).

    residual = IN -> 3x3 conv -> PReLU -> 3x3 conv -> IN; shortcut = identity (in == out) or 1x1 conv + IN.
    (B, in_ch, H, W) -> (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, bias: bool = False):
        super().__init__()
        if in_ch == out_ch:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=bias),
                                          nn.InstanceNorm2d(out_ch, affine=True))
        self.res = nn.Sequential(
            nn.InstanceNorm2d(in_ch, affine=True),
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias),
            nn.PReLU(out_ch),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias),
            nn.InstanceNorm2d(out_ch, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(x) + self.shortcut(x)


class AlignNet(nn.Module):
    """Predicts (dx, dy, alpha) from a generator feature S and an encoder feature E (methods.md §2.5 steps 1-6).

    forward(source S (B, C, H, W), target E (B, C, H, W)) -> (B, 3, H, W): channels dx, dy in
    [-warp_scale, warp_scale] (normalised grid units) and alpha in [0, 1] (1 = not invertible).

    Steps: non-affine InstanceNorm on S and E; input concat[IN(S) - IN(E), IN(E)] (2C channels); IR(2C->2C),
    IR(2C->3); heads dx = tanh * s, dy = tanh * s, alpha = sigmoid; then the [1,3,3,1] blur (pad (2, 1)).
    Order as in the official ``SPM_Warp``: ``blur(AlignNet(...))`` where AlignNet already applied the
    heads, i.e. the blur acts on the bounded (dx, dy, alpha) maps, AFTER tanh/sigmoid. The kernel is
    normalised, so the blur keeps the bounds; with ``blur_padding="zeros"`` (official) the zero padding
    pulls the outermost rows/columns towards 0 (top/left edge: at most 1/2 of the interior value, corner
    1/4), so a mask could never reach 1 along the top/left border (occluders that enter from an edge);
    ``"replicate"`` (our option) avoids that attenuation. Conv weights Xavier-normal, conv biases 0.
    """

    def __init__(self, channels: int, bias: bool = False, warp_scale: float = 0.08, blur_padding: str = "zeros",
                 alpha_init: float = 0.0, error_cue: bool = False):
        super().__init__()
        _check_choice("AlignNet", "blur_padding", blur_padding, BLUR_PADDINGS)
        self.channels, self.warp_scale, self.blur_padding = channels, float(warp_scale), blur_padding
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.body = nn.Sequential(IRBlock(2 * channels, 2 * channels, bias), IRBlock(2 * channels, 3, bias))
        self.blur = Blur((1, 3, 3, 1), pad=(2, 1) if blur_padding == "zeros" else (0, 0))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():  # the alpha logit's starting offset: the last residual InstanceNorm's shift
            self.body[1].res[-1].bias[2] = float(alpha_init)
        # optional: the stage-1 reconstruction error, un-normalised, added to the alpha logit (see AlignMaskNet).
        # Starts as "logit += 10 * error" (an error of 0.3 in [-1, 1] units lifts a -2 logit to +1): a prior the
        # training then adjusts; from zero it grows too slowly at these learning rates (Adam moves it by ~lr).
        self.cue = nn.Conv2d(1, 1, 3, padding=1) if error_cue else None
        if self.cue is not None:
            nn.init.zeros_(self.cue.weight)
            nn.init.zeros_(self.cue.bias)
            with torch.no_grad():
                self.cue.weight[0, 0, 1, 1] = 10.0

    def forward(self, source: torch.Tensor, target: torch.Tensor, cue: Optional[torch.Tensor] = None) -> torch.Tensor:
        s, e = self.norm(source), self.norm(target)
        raw = self.body(torch.cat([s - e, e], dim=1))
        if self.cue is not None:
            if cue is None:
                raise ValueError("AlignNet was built with error_cue=True: pass the error cue (B, 1, H, W)")
            raw = torch.cat([raw[:, :2], raw[:, 2:] + self.cue(cue)], dim=1)
        heads = torch.cat([torch.tanh(raw[:, :2]) * self.warp_scale, torch.sigmoid(raw[:, 2:])], dim=1)
        if self.blur_padding == "replicate":
            heads = F.pad(heads, (2, 1, 2, 1), mode="replicate")
        out = self.blur(heads)
        # the clamps only remove float round-off of the (convex) blur
        return torch.cat([out[:, :2].clamp(-self.warp_scale, self.warp_scale), out[:, 2:].clamp(0.0, 1.0)], dim=1)


@dataclass
class LevelOutput:
    """One level's result: aligned ``feature`` (B, C, r, r), ``flow`` (B, 2, r, r), ``alpha`` (B, 1, r, r)."""

    feature: torch.Tensor
    flow: torch.Tensor
    alpha: torch.Tensor


class AlignMaskLevel(nn.Module):
    """One alignment/mask level at resolution r (official ``StyledscaleNshfitBlock`` + its ``feats_conv``).

    Args:
        channels: generator channels C at r.
        tap_channels: channels of the encoder tap feeding this level.
        warp_scale: flow bound s (normalised grid units; 0.08 = 4 % of the width).
        cycles: alignment iterations (official 2; 3 in the Feature-Style training config).
        bias: conv biases in AlignNet (official ``mod_bias``).
        blur_padding: "zeros" (official) or "replicate", see ``AlignNet``.
        warp_grid: "linspace" (official) or "identity", see ``warp``.
        gate_interpolation: "bicubic" (official) or "bilinear", see ``gate``.

    forward(feature F (B, C, r, r), tap (B, Ct, r', r'), coarse_alpha (B, 1, r/2, r/2) or None) -> LevelOutput.
    E = proj(tap resized to r). Cycle 1: (flow, alpha) = AlignNet(F, E). Cycle k > 1: increments
    (dflow, dalpha) = AlignNet(S, E); flow <- clip(flow + dflow, -s, s); alpha <- clip(dalpha * alpha +
    alpha * (1 - alpha), 0, 1). In the last cycle, if ``coarse_alpha`` is given, alpha <- ``gate(alpha,
    coarse_alpha)`` (the coarse flow is not used). After each cycle
    S = warp(F, flow) * alpha + F * (1 - alpha) (the ORIGINAL F is warped each time). Returns S, flow, alpha.
    Polarity: alpha = 1 = "not invertible: copy from the input" (and warp fully there).
    """

    def __init__(self, channels: int, tap_channels: int, warp_scale: float = 0.08, cycles: int = 2,
                 bias: bool = False, blur_padding: str = "zeros", alpha_init: float = 0.0,
                 error_cue: bool = False, warp_grid: str = "linspace", gate_interpolation: str = "bicubic"):
        super().__init__()
        if not isinstance(cycles, int) or cycles < 1:
            raise ValueError(f"AlignMaskLevel: cycles must be an int >= 1, got {cycles!r}")
        if not warp_scale > 0:
            raise ValueError(f"AlignMaskLevel: warp_scale must be > 0, got {warp_scale!r}")
        _check_choice("AlignMaskLevel", "warp_grid", warp_grid, WARP_GRIDS)
        _check_choice("AlignMaskLevel", "gate_interpolation", gate_interpolation, GATE_INTERPOLATIONS)
        self.channels, self.tap_channels, self.cycles = channels, tap_channels, cycles
        self.warp_scale = float(warp_scale)
        self.warp_grid, self.gate_interpolation = warp_grid, gate_interpolation
        self.proj = nn.Conv2d(tap_channels, channels, 1)
        self.align = AlignNet(channels, bias=bias, warp_scale=warp_scale, blur_padding=blur_padding,
                              alpha_init=alpha_init, error_cue=error_cue)

    def forward(self, feature: torch.Tensor, tap: torch.Tensor, coarse_alpha: Optional[torch.Tensor] = None,
                cue: Optional[torch.Tensor] = None) -> LevelOutput:
        if feature.ndim != 4 or feature.shape[1] != self.channels:
            raise ValueError(f"AlignMaskLevel: feature must be (B, {self.channels}, r, r), got {tuple(feature.shape)}")
        if tap.ndim != 4 or tap.shape[1] != self.tap_channels or tap.shape[0] != feature.shape[0]:
            raise ValueError(f"AlignMaskLevel: tap must be (B={feature.shape[0]}, {self.tap_channels}, h, w), "
                             f"got {tuple(tap.shape)}")
        r = feature.shape[-1]
        enc = self.proj(_resize(tap.to(feature.dtype), r))
        s = self.warp_scale
        cue = _resize(cue.to(feature.dtype), r) if cue is not None else None
        out, flow, alpha = feature, None, None
        for k in range(self.cycles):
            pred = self.align(out, enc, cue)
            if k == 0:
                flow, alpha = pred[:, :2], pred[:, 2:]
            else:
                flow = torch.clamp(flow + pred[:, :2], -s, s)
                alpha = torch.clamp(pred[:, 2:] * alpha + alpha * (1 - alpha), 0.0, 1.0)
            if k == self.cycles - 1 and coarse_alpha is not None:
                alpha = gate(alpha, coarse_alpha.to(alpha.dtype), self.gate_interpolation)
            out = warp(feature, flow, self.warp_grid) * alpha + feature * (1 - alpha)
        return LevelOutput(out, flow, alpha)


@dataclass
class AlignMaskOutput:
    """``AlignMaskNet.forward`` result (S = image size).

    output (B, 3, S, S): blend of input and aligned generation; generated (B, 3, S, S): G output with the
    aligned features; mask (B, 1, S, S): fused alpha (1 = copied from input); alphas {r: (B, 1, r, r)} and
    flows {r: (B, 2, r, r)} of the active levels.
    """

    output: torch.Tensor
    generated: torch.Tensor
    mask: torch.Tensor
    alphas: Dict[int, torch.Tensor] = field(default_factory=dict)
    flows: Dict[int, torch.Tensor] = field(default_factory=dict)


class AlignMaskNet(nn.Module):
    """All alignment/mask levels plus the synthesis pass that uses them (the trainable part of stage two).

    Args:
        generator_channels: {res: channels} of the generator (``Generator.channels``; str keys accepted).
        tap_channels: {"f0".."f4": channels} of the encoder (``encoder.feature_channels``).
        levels: ascending resolutions to align (e.g. ``default_levels(G.size)``).
        encoder_input_size: side of the encoder input; picks each level's tap (``tap_for_level``).
        warp_scale, cycles, bias: see ``AlignMaskLevel``.
        blur_padding, warp_grid, gate_interpolation: the three resampling choices (module docstring); official
            "zeros", "linspace", "bicubic" by default, ours "replicate", "identity", "bilinear". Saved in ``config``,
            so a hand-off runs with the function it was trained with.
        inference_noise: the noise of a forward given none: "random" (official) or "stored" (module docstring).
        alpha_init: starting alpha logit (an initialisation only); error_cue: see ``forward``.

    Attributes: ``levels`` (ModuleDict keyed by str(r)), ``taps`` {r: tap name}, ``config`` (ctor kwargs,
    plain types, for export). Only this module is trainable; the caller freezes G and the encoder.
    """

    def __init__(self, generator_channels: Mapping, tap_channels: Mapping[str, int], levels: Sequence[int],
                 encoder_input_size: int, warp_scale: float = 0.08, cycles: int = 2, bias: bool = False,
                 blur_padding: str = "zeros", alpha_init: float = 0.0, error_cue: bool = False,
                 warp_grid: str = "linspace", gate_interpolation: str = "bicubic", inference_noise: str = "random"):
        super().__init__()
        _check_choice("AlignMaskNet", "inference_noise", inference_noise, INFERENCE_NOISES)
        self.inference_noise = inference_noise
        gen_ch = {int(k): int(v) for k, v in dict(generator_channels).items()}
        tap_ch = {str(k): int(v) for k, v in dict(tap_channels).items()}
        levels = [int(r) for r in levels]
        if not levels:
            raise ValueError("AlignMaskNet: levels must not be empty")
        if levels != sorted(set(levels)):
            raise ValueError(f"AlignMaskNet: levels must be strictly ascending, got {levels}")
        missing = [r for r in levels if r not in gen_ch]
        if missing:
            raise ValueError(f"AlignMaskNet: levels {missing} are not generator resolutions "
                             f"(generator_channels has {sorted(gen_ch)})")
        self.level_list = levels
        self.taps = {r: tap_for_level(r, encoder_input_size) for r in levels}
        absent = sorted({t for t in self.taps.values() if t not in tap_ch})
        if absent:
            raise ValueError(f"AlignMaskNet: tap_channels lacks {absent} (has {sorted(tap_ch)})")
        self.config = dict(generator_channels=gen_ch, tap_channels=tap_ch, levels=list(levels),
                           encoder_input_size=int(encoder_input_size), warp_scale=float(warp_scale),
                           cycles=int(cycles), bias=bool(bias), blur_padding=str(blur_padding),
                           alpha_init=float(alpha_init), error_cue=bool(error_cue), warp_grid=str(warp_grid),
                           gate_interpolation=str(gate_interpolation), inference_noise=str(inference_noise))
        self.error_cue = bool(error_cue)
        self.levels = nn.ModuleDict({
            str(r): AlignMaskLevel(gen_ch[r], tap_ch[self.taps[r]], warp_scale, cycles, bias, blur_padding, alpha_init,
                                   error_cue, warp_grid, gate_interpolation)
            for r in levels})

    def _active(self, active_levels) -> list:
        if active_levels is None:
            return list(self.level_list)
        active = [int(r) for r in active_levels]
        if active != self.level_list[:len(active)]:
            raise ValueError(f"AlignMaskNet: active_levels must be a prefix of levels {self.level_list}, got {active}")
        return active

    def _check_generator(self, G, active) -> None:
        channels = {int(k): int(v) for k, v in dict(getattr(G, "channels", {})).items()}
        for r in active:
            want = self.levels[str(r)].channels
            if channels.get(r) != want:
                have = f"{channels[r]} channels there" if r in channels else f"no {r} px layer (size {G.size})"
                raise ValueError(f"AlignMaskNet: level {r} expects a generator with {want} channels at {r} px; "
                                 f"this generator has {have}")

    def reconstruction_error(self, G, codes: torch.Tensor, image: torch.Tensor, noise=None) -> torch.Tensor:
        """The error cue: mean over channels of |image - G(codes)| (B, 1, S, S), without gradients."""
        with torch.no_grad():
            plain = G.synthesize(codes, noise=noise, randomize_noise=False).image
            return (image.to(plain.dtype) - plain).abs().mean(dim=1, keepdim=True)

    def forward(self, G, codes: torch.Tensor, taps: Mapping[str, torch.Tensor], image: torch.Tensor,
                active_levels: Optional[Sequence[int]] = None, noise=None,
                cue: Optional[torch.Tensor] = None, cue_codes: Optional[torch.Tensor] = None) -> AlignMaskOutput:
        """Synthesise ``codes`` (B, L, D) with G, replacing ``G.upconv_modulated(r)`` at the active levels.

        taps: encoder features {"f0".."f4": (B, C, h, w)}; image: input x (B, 3, S, S), S = G.size
        (detached before blending, as in the official code). active_levels: a prefix of ``levels``
        (progressive activation); None = all. noise: passed to ``G.synthesize``; None = this net's
        ``inference_noise`` (G's stored buffers, or fresh random maps). Levels run coarse to fine inside the
        synthesis pass, each gated by the previous level's alpha. With no active level the output is the
        plain G output (mask 0).

        With ``error_cue`` the alpha logits also receive a learned 3x3 map of the stage-1 reconstruction error
        ``cue`` (B, 1, S, S) (default: ``reconstruction_error(G, cue_codes, image)``, ``cue_codes`` defaulting to
        ``codes``). When ``codes`` are edited, pass the unedited codes as ``cue_codes`` (or their error as ``cue``)
        so the mask stays the input's, as the official editing does.
        """
        active = self._active(active_levels)
        self._check_generator(G, active)
        if noise is None:
            noise = G.stored_noise() if self.inference_noise == "stored" else [None] * G.num_layers
        if image.ndim != 4 or image.shape[-1] != G.size or image.shape[-2] != G.size:
            raise ValueError(f"AlignMaskNet: image must be (B, 3, {G.size}, {G.size}) for this generator, "
                             f"got {tuple(image.shape)}")
        for r in active:
            if self.taps[r] not in taps:
                raise KeyError(f"AlignMaskNet: level {r} needs encoder tap {self.taps[r]!r}; got {sorted(taps)}")
        alphas: Dict[int, torch.Tensor] = {}
        flows: Dict[int, torch.Tensor] = {}
        if self.error_cue and cue is None:
            cue = self.reconstruction_error(G, codes if cue_codes is None else cue_codes, image, noise)
        cue = cue if self.error_cue else None

        def make_edit(i, r):
            def edit(feature):
                coarse = alphas[active[i - 1]] if i > 0 else None
                res = self.levels[str(r)](feature, taps[self.taps[r]], coarse, cue)
                alphas[r], flows[r] = res.alpha, res.flow
                return res.feature
            return edit

        edits = {G.upconv_modulated(r): make_edit(i, r) for i, r in enumerate(active)}
        generated = G.synthesize(codes, noise=noise, randomize_noise=False, edits=edits).image
        if active:
            mask = fuse_masks(alphas, image.shape[-1])
        else:
            mask = generated.new_zeros(generated.shape[0], 1, *generated.shape[-2:])
        output = blend(image.detach().to(generated.dtype), generated, mask)
        return AlignMaskOutput(output, generated, mask, alphas, flows)


def save_align_mask(path, net: AlignMaskNet, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the stage-2 hand-off ``{"state_dict", "config", "meta"}`` atomically to ``path``; returns the path."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return save_atomic({"state_dict": state, "config": plain_containers(dict(net.config)),
                        "meta": plain_containers(dict(meta or {}))}, path)


def load_align_mask(path) -> Tuple[AlignMaskNet, Dict[str, Any]]:
    """Read a stage-2 file -> (AlignMaskNet in eval mode, meta dict); CheckpointError naming the file otherwise.

    Accepts this project's hand-off ``{"state_dict", "config", "meta"}`` (a config without the resampling options,
    as in files written before they existed, gets ``LEGACY_MATHS``: the function those files were trained with)
    and an official OOD-GAN-inversion checkpoint (``net_g_*.pth``: ``params_ema`` with ``modulation.*`` /
    ``feats_conv.*`` keys), converted by ``networks.convert_ood_official`` and run with the official function.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a stage-2 align_mask.pt)")
    ckpt = safe_load(path)
    if isinstance(ckpt, Mapping) and {"state_dict", "config"} <= set(ckpt):
        net = AlignMaskNet(**{**LEGACY_MATHS, **dict(ckpt["config"])})
        load_strict(net, ckpt["state_dict"], source=str(path))
        return net.eval(), dict(ckpt.get("meta") or {})
    from networks.convert_ood_official import is_official_checkpoint, load_official

    if is_official_checkpoint(ckpt):
        return load_official(ckpt, source=str(path))
    found = sorted(map(str, ckpt))[:8] if isinstance(ckpt, Mapping) else type(ckpt).__name__
    raise CheckpointError(f"{path} is neither a stage-2 hand-off (keys state_dict, config, meta) nor an official "
                          f"OOD-GAN-inversion checkpoint (params_ema with modulation.* / feats_conv.* keys); "
                          f"found {found}")
