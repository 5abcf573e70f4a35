"""e4e's encoder (Tov et al. 2021, ``Encoder4Editing``): one base style plus progressively enabled per-layer deltas."""
from __future__ import annotations

import operator
from typing import Dict, Optional, Sequence

import torch

from .common import PyramidEncoder


class Encoder4Editing(PyramidEncoder):
    """W+ encoder of e4e: ``codes[:, 0] = styles[0](f4)`` and ``codes[:, i] = codes[:, 0] + styles[i](level_i)``.

    Parameter names equal the official ``encoder.*`` keys of ``e4e_ffhq_encode.pt`` (see ``PyramidEncoder`` for
    the constructor arguments and the taps). Only deltas ``1..progressive_stage`` are computed; the other
    rows repeat the base style (e4e's progressive training). ``progressive_stage`` defaults to ``n_styles``
    (inference: every delta); values >= ``n_styles - 1`` all mean "every delta".

    forward: images (B, input_nc, input_size, input_size) in [-1, 1] -> codes (B, n_styles, style_dim), without
    latent_avg.
    """

    kind = "e4e"

    def __init__(self, num_layers: int = 50, mode: str = "ir_se", n_styles: int = 14, style_dim: int = 512,
                 input_size: int = 256, width: float = 1.0, units: Optional[Sequence[int]] = None,
                 input_nc: int = 3):
        super().__init__(num_layers=num_layers, mode=mode, n_styles=n_styles, style_dim=style_dim,
                         input_size=input_size, width=width, units=units, input_nc=input_nc)
        self.progressive_stage = n_styles

    def set_progressive_stage(self, stage: int) -> None:
        """Use the deltas of styles 1..``stage`` (0: a single W repeated; >= n_styles - 1: all deltas)."""
        try:
            stage = operator.index(stage) if not isinstance(stage, bool) else None
        except TypeError:
            stage = None
        if stage is None:
            raise ValueError("Encoder4Editing.set_progressive_stage: stage must be an integer")
        if stage < 0:
            raise ValueError(f"Encoder4Editing.set_progressive_stage: stage must be >= 0, got {stage}")
        self.progressive_stage = stage

    @property
    def active_deltas(self) -> int:
        """How many deltas the current stage uses (0 .. n_styles - 1)."""
        return min(self.progressive_stage, self.n_styles - 1)

    def codes_from_features(self, feats: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Base style from f4 plus the active deltas -> codes (B, n_styles, style_dim)."""
        cache: Dict[int, torch.Tensor] = {}
        w0 = self.styles[0](feats["f4"])
        rows = [w0]
        for i in range(1, self.n_styles):
            if i <= self.active_deltas:
                rows.append(w0 + self.styles[i](self.pyramid(feats, self.level_of(i), cache)))
            else:
                rows.append(w0)
        return torch.stack(rows, dim=1)
