"""IR / IR-SE residual units (ArcFace backbones) with TreB1eN / pSp / e4e parameter names.

A unit maps (B, in_channel, H, W) -> (B, depth, H / stride, W / stride) as ``res_layer(x) + shortcut_layer(x)``:

* ``shortcut_layer``: ``MaxPool2d(1, stride)`` when ``in_channel == depth`` (no parameters), else
  ``Sequential(0: Conv2d 1x1 stride, 1: BatchNorm2d)``;
* ``res_layer``: ``0: BatchNorm2d(in)``, ``1: Conv2d 3x3``, ``2: PReLU``, ``3: Conv2d 3x3 stride``,
  ``4: BatchNorm2d(depth)`` and, for IR-SE, ``5: SEModule`` (``fc1`` / ``fc2`` 1x1 convs without bias).

The body is four stages; the first unit of each stage halves the resolution. Stage widths are
64/128/256/512 times ``width`` and the unit counts come from ``num_layers`` (50/100/152) unless ``units``
overrides them, which gives the narrow, shallow variants used for small generators.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
BASE_CHANNELS = (64, 128, 256, 512)
MODES = ("ir", "ir_se")


class Bottleneck(NamedTuple):
    """Description of one residual unit: input channels, output channels (``depth``) and stride."""

    in_channel: int
    depth: int
    stride: int


def get_block(in_channel: int, depth: int, num_units: int, stride: int = 2) -> List[Bottleneck]:
    """One stage: a strided unit ``in_channel -> depth`` followed by ``num_units - 1`` units ``depth -> depth``."""
    return [Bottleneck(in_channel, depth, stride)] + [Bottleneck(depth, depth, 1) for _ in range(num_units - 1)]


def stage_channels(width: float = 1.0) -> Tuple[int, int, int, int]:
    """Output channels of the four stages: ``max(1, round(c * width))`` for c in 64, 128, 256, 512."""
    return tuple(max(1, int(round(c * width))) for c in BASE_CHANNELS)


def check_backbone_args(num_layers: int, mode: str, width: float, units: Optional[Sequence[int]],
                        owner: str = "IR-SE backbone") -> Optional[Tuple[int, int, int, int]]:
    """Validate backbone arguments; returns ``units`` as a tuple of 4 ints (or None).

    Raises:
        ValueError: naming the offending argument.
    """
    if num_layers not in STAGE_UNITS:
        raise ValueError(f"{owner}: num_layers must be one of {sorted(STAGE_UNITS)}, got {num_layers!r}")
    if mode not in MODES:
        raise ValueError(f"{owner}: mode must be one of {MODES}, got {mode!r}")
    if not isinstance(width, (int, float)) or isinstance(width, bool) or not width > 0:
        raise ValueError(f"{owner}: width must be a positive number, got {width!r}")
    if units is None:
        return None
    try:
        parsed = tuple(int(u) for u in units)
    except (TypeError, ValueError):
        parsed = ()
    if len(parsed) != 4 or any(u < 1 for u in parsed) or any(float(u) != float(p) for u, p in zip(units, parsed)):
        raise ValueError(f"{owner}: units must be 4 positive integers (units per stage), got {units!r}")
    return parsed


def get_blocks(num_layers: int = 50, width: float = 1.0,
               units: Optional[Sequence[int]] = None) -> List[List[Bottleneck]]:
    """The four stages of an IR(-SE)-``num_layers`` body.

    Args:
        num_layers: 50, 100 or 152 (unit counts 3/4/14/3, 3/13/30/3, 3/8/36/3).
        width: channel multiplier of 64/128/256/512 (1.0 = the official networks).
        units: 4 unit counts overriding those of ``num_layers``.
    Returns:
        A list of 4 lists of ``Bottleneck`` descriptions (input channels of stage 1 = its output channels).
    """
    units = check_backbone_args(num_layers, "ir", width, units, owner="get_blocks") or STAGE_UNITS[num_layers]
    chans = stage_channels(width)
    ins = (chans[0],) + chans[:3]
    return [get_block(i, d, n) for i, d, n in zip(ins, chans, units)]


class SEModule(nn.Module):
    """Squeeze-and-excitation gate: x * sigmoid(fc2(relu(fc1(avgpool(x))))); (B, C, H, W) -> same shape."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)  # narrow variants: never a zero-width bottleneck
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class BottleneckIR(nn.Module):
    """IR unit (see module docstring): (B, in_channel, H, W) -> (B, depth, H/stride, W/stride)."""

    use_se = False

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channel, depth, (1, 1), stride, bias=False),
                nn.BatchNorm2d(depth),
            )
        layers = [
            nn.BatchNorm2d(in_channel),
            nn.Conv2d(in_channel, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        ]
        if self.use_se:
            layers.append(SEModule(depth, 16))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class BottleneckIRSE(BottleneckIR):
    """IR-SE unit: the IR unit with an ``SEModule`` (reduction 16) closing ``res_layer`` (index 5)."""

    use_se = True


def unit_class(mode: str):
    """``BottleneckIR`` for mode "ir", ``BottleneckIRSE`` for "ir_se"."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return BottleneckIRSE if mode == "ir_se" else BottleneckIR


def make_input_layer(in_channels: int, out_channels: int) -> nn.Sequential:
    """The stem ``Sequential(0: Conv2d 3x3 no bias, 1: BatchNorm2d, 2: PReLU)``; keeps the resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, (3, 3), 1, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.PReLU(out_channels),
    )


def make_body(blocks: Sequence[Sequence[Bottleneck]], mode: str) -> Tuple[nn.Sequential, List[int]]:
    """Flatten stages into ``Sequential`` ``body`` (keys ``body.N``).

    Returns:
        (body, stage_ends): ``stage_ends[s]`` is the index in ``body`` of the last unit of stage ``s``
        (for IR-SE-50: 2, 6, 20, 23).
    """
    cls = unit_class(mode)
    units, ends = [], []
    for block in blocks:
        for b in block:
            units.append(cls(b.in_channel, b.depth, b.stride))
        ends.append(len(units) - 1)
    return nn.Sequential(*units), ends


def infer_backbone_args(state, prefix: str = "") -> dict:
    """Infer ``num_layers``, ``mode``, ``width`` and ``units`` from a backbone state dict (keys ``body.N.*``).

    ``units`` is None when the per-stage counts equal those of a standard depth.
    Raises:
        KeyError: when the state dict holds no ``body.0`` unit.
    """
    n_units, stage_starts = 0, []
    while any(k.startswith(f"{prefix}body.{n_units}.") for k in state):
        # a stage starts where the unit changes the width or has a strided shortcut; stage 1's first
        # unit keeps the width, so it is taken as a start by position
        if n_units == 0 or f"{prefix}body.{n_units}.shortcut_layer.0.weight" in state:
            stage_starts.append(n_units)
        n_units += 1
    if n_units == 0:
        raise KeyError(f"{prefix}body.0")
    counts = [b - a for a, b in zip(stage_starts, stage_starts[1:] + [n_units])]
    mode = "ir_se" if f"{prefix}body.0.res_layer.5.fc1.weight" in state else "ir"
    width = state[f"{prefix}input_layer.0.weight"].shape[0] / 64
    width = int(width) if float(width).is_integer() else width
    for num_layers, std in STAGE_UNITS.items():
        if tuple(counts) == std:
            return dict(num_layers=num_layers, mode=mode, width=width, units=None)
    return dict(num_layers=50, mode=mode, width=width, units=tuple(counts))
