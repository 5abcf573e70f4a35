"""Shared parts of the pSp / e4e encoders: the IR-SE feature pyramid, the map-to-style heads, input resizing.

Both encoders (``GradualStyleEncoder`` of pSp, ``Encoder4Editing`` of e4e) have the same parameters:
``input_layer``, ``body.N`` (IR / IR-SE units), ``styles.N`` (``GradualStyleBlock``: ``convs`` of strided
3x3 convs + LeakyReLU, then an equalised ``linear``) and the FPN laterals ``latlayer1`` / ``latlayer2``.
Style ``i`` reads the coarse map (input/16, styles 0-2), the middle map (input/8, styles 3-6) or the fine map
(input/4, styles 7+). A lateral exists only when a style reads its level: ``latlayer1`` needs n_styles > 3,
``latlayer2`` n_styles > 7 (every official generator has n_styles >= 14).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from networks.stylegan2.layers import EqualLinear

from .irse import check_backbone_args, get_blocks, make_body, make_input_layer, stage_channels

FEATURE_NAMES = ("f0", "f1", "f2", "f3", "f4")
COARSE_END, MIDDLE_END = 3, 7  # e4e / pSp: styles [0, 3) coarse, [3, 7) middle, [7, n) fine


class GradualStyleBlock(nn.Module):
    """Map a (B, in_c, spatial, spatial) feature map to a (B, out_c) style.

    ``convs``: ``max(1, log2(spatial))`` stride-2 3x3 convs (the first ``in_c -> out_c``), each followed by
    ``LeakyReLU(0.01)``, reducing the map to 1x1; ``linear``: equalised ``EqualLinear(out_c, out_c)``.
    """

    def __init__(self, in_c: int, out_c: int, spatial: int):
        super().__init__()
        self.out_c, self.spatial = out_c, spatial
        num_pools = max(1, int(math.log2(spatial)))
        layers = []
        for i in range(num_pools):
            layers += [nn.Conv2d(in_c if i == 0 else out_c, out_c, kernel_size=3, stride=2, padding=1),
                       nn.LeakyReLU()]
        self.convs = nn.Sequential(*layers)
        self.linear = EqualLinear(out_c, out_c, lr_mul=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).reshape(-1, self.out_c))


def upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """FPN merge: ``x`` bilinearly resized (align_corners=True) to ``y``'s size, plus ``y``."""
    return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y


class PyramidEncoder(nn.Module):
    """Base of ``Encoder4Editing`` and ``GradualStyleEncoder`` (IR-SE body + FPN + per-style heads).

    Args:
        num_layers: IR depth, 50 / 100 / 152 (official encoders: 50).
        mode: "ir" or "ir_se" (official: "ir_se").
        n_styles: number of W+ rows produced (= the generator's ``n_latent``).
        style_dim: size of each W+ row (= the generator's ``style_dim``; the style heads are this wide).
        input_size: side of the square input images, a power of two >= 16 (official: 256).
        width: channel multiplier of the backbone's 64/128/256/512 stages (the FPN has the top width).
        units: 4 per-stage unit counts overriding ``num_layers``'s (e.g. (1, 1, 2, 1)).
        input_nc: input channels (3 for RGB).

    Attributes:
        config: the constructor kwargs (``units`` as a tuple or None).
        feature_channels: channels of the taps, ``{"f0": 64w, "f1": 64w, "f2": 128w, "f3": 256w, "f4": 512w}``
            with ``w = width`` (rounded as ``irse.stage_channels``).
        feature_strides: ``{"f0": 1, "f1": 2, "f2": 4, "f3": 8, "f4": 16}`` (tap side = input_size / stride).
        stage_ends: indices into ``body`` of the last unit of each stage (IR-SE-50: 2, 6, 20, 23).
    """

    kind = ""

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", n_styles: int = 14, style_dim: int = 512,
                 input_size: int = 256, width: float = 1.0, units: Optional[Sequence[int]] = None,
                 input_nc: int = 3):
        super().__init__()
        owner = type(self).__name__
        units = check_backbone_args(num_layers, mode, width, units, owner=owner)
        for name, value, low in (("n_styles", n_styles, 1), ("style_dim", style_dim, 1), ("input_nc", input_nc, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
        if not isinstance(input_size, int) or input_size < 16 or input_size & (input_size - 1):
            raise ValueError(f"{owner}: input_size must be a power of two >= 16, got {input_size!r}")
        self.config = dict(num_layers=num_layers, mode=mode, n_styles=n_styles, style_dim=style_dim,
                           input_size=input_size, width=width, units=units, input_nc=input_nc)
        self.n_styles, self.style_dim, self.input_size = n_styles, style_dim, input_size

        chans = stage_channels(width)
        self.input_layer = make_input_layer(input_nc, chans[0])
        self.body, self.stage_ends = make_body(get_blocks(num_layers, width, units), mode)
        self._tap_at = {end: FEATURE_NAMES[s + 1] for s, end in enumerate(self.stage_ends)}
        self.feature_channels: Dict[str, int] = {"f0": chans[0], "f1": chans[0], "f2": chans[1], "f3": chans[2],
                                                 "f4": chans[3]}
        self.feature_strides: Dict[str, int] = {"f0": 1, "f1": 2, "f2": 4, "f3": 8, "f4": 16}

        top = chans[3]
        self.styles = nn.ModuleList(
            GradualStyleBlock(top, style_dim, input_size // self._level_stride(i)) for i in range(n_styles))
        # FPN laterals only when some style reads their level (n_styles > 3 / > 7; always for official sizes),
        # so small generators have no never-trained parameters
        if n_styles > COARSE_END:
            self.latlayer1 = nn.Conv2d(chans[2], top, kernel_size=1, stride=1, padding=0)
        if n_styles > MIDDLE_END:
            self.latlayer2 = nn.Conv2d(chans[1], top, kernel_size=1, stride=1, padding=0)

    @staticmethod
    def _level_stride(style_index: int) -> int:
        """Stride of the pyramid level style ``style_index`` reads (16 coarse, 8 middle, 4 fine)."""
        return 16 if style_index < COARSE_END else 8 if style_index < MIDDLE_END else 4

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is a float (B, input_nc, input_size, input_size) tensor."""
        n, s = self.config["input_nc"], self.input_size
        if not (torch.is_tensor(x) and x.ndim == 4 and x.shape[1] == n and tuple(x.shape[-2:]) == (s, s)
                and x.is_floating_point()):
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects float images (B, {n}, {s}, {s}) "
                             f"(its input_size={s}); got {got}. Resize with networks.encoders.resize_to_encoder.")

    def backbone(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Run stem and body; returns the taps ``{"f0".."f4"}`` (see ``feature_channels`` / ``feature_strides``)."""
        self.check_input(x)
        x = self.input_layer(x)
        feats = {"f0": x}
        for i, unit in enumerate(self.body):
            x = unit(x)
            name = self._tap_at.get(i)
            if name is not None:
                feats[name] = x
        return feats

    def pyramid(self, feats: Dict[str, torch.Tensor], level: int,
                cache: Dict[int, torch.Tensor]) -> torch.Tensor:
        """FPN map (B, 512w, h, w) for ``level`` 0 (coarse: f4), 1 (middle: up(f4) + latlayer1(f3)) or
        2 (fine: up(middle) + latlayer2(f2)); ``cache`` keeps the levels already computed for this input."""
        if level not in cache:
            if level == 0:
                cache[0] = feats["f4"]
            elif level == 1:
                cache[1] = upsample_add(self.pyramid(feats, 0, cache), self.latlayer1(feats["f3"]))
            else:
                cache[2] = upsample_add(self.pyramid(feats, 1, cache), self.latlayer2(feats["f2"]))
        return cache[level]

    @staticmethod
    def level_of(style_index: int) -> int:
        """Pyramid level read by style ``style_index`` (0 coarse, 1 middle, 2 fine)."""
        return 0 if style_index < COARSE_END else 1 if style_index < MIDDLE_END else 2

    def codes_from_features(self, feats: Dict[str, torch.Tensor]) -> torch.Tensor:
        """W+ codes (B, n_styles, style_dim) from backbone taps; subclasses define how styles combine."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Images (B, input_nc, S, S) -> (codes (B, n_styles, style_dim), taps {"f0".."f4"}).

        Tap shapes: f_k is (B, feature_channels[f_k], S / feature_strides[f_k], same). Codes exclude latent_avg.
        """
        feats = self.backbone(x)
        return self.codes_from_features(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, input_nc, S, S), S = input_size, in [-1, 1] -> codes (B, n_styles, style_dim) (no latent_avg)."""
        return self.codes_from_features(self.backbone(x))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


def resize_to_encoder(x: torch.Tensor, size: int, *, allow_resize: bool = True,
                      key: str = "model.encoder.input_size", antialias: bool = True) -> torch.Tensor:
    """Return images (B, C, H, W) at (B, C, size, size): unchanged when already that size, else resized.

    Resizing is bilinear, with antialiasing unless ``antialias`` is false (OOD-GAN-inversion's plain
    ``F.interpolate(x, (256, 256), mode="bilinear")``), and warns (``warnings.warn``, once per call site under Python's
    default filter) that sizes differ.
    Raises:
        ValueError: sizes differ and ``allow_resize`` is false; the message names ``key``.
    """
    if not (torch.is_tensor(x) and x.ndim == 4):
        got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"resize_to_encoder expects images (B, C, H, W); got {got}")
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if not allow_resize:
        raise ValueError(f"images are {tuple(x.shape[-2:])} but the encoder takes {size}x{size} ({key}={size}); "
                         f"set {key} to the image size or allow resizing")
    warnings.warn(f"resizing images from {tuple(x.shape[-2:])} to the encoder's {size}x{size} ({key}={size})",
                  stacklevel=2)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
