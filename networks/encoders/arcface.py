"""ArcFace IR-SE backbone (TreB1eN/InsightFace_Pytorch ``Backbone``), used by the identity loss.

State-dict keys match TreB1eN's ``model_ir_se50.pth`` (as loaded by pSp / e4e's ``IDLoss``): ``input_layer.{0,1,2}``,
``body.N`` (IR-SE units, see ``irse``) and ``output_layer.{0: BatchNorm2d, 1: Dropout, 2: Flatten, 3: Linear,
4: BatchNorm1d}``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .irse import check_backbone_args, get_blocks, make_body, make_input_layer, stage_channels


class IRSEArcFace(nn.Module):
    """Face-recognition embedding network.

    Args:
        input_size: 112 (the released weights) or 224; the body reduces it 16x (7x7 or 14x14 before the linear).
        num_layers: 50 / 100 / 152; mode: "ir" or "ir_se" (``model_ir_se50.pth``: 50, "ir_se").
        drop_ratio: dropout before the linear layer (training only).
        affine: learnable scale/shift of the final BatchNorm1d (True for ``model_ir_se50.pth``).
        width, units: narrow / shallow variants for tests (see ``irse.get_blocks``); defaults = the real network.

    forward: images (B, 3, input_size, input_size) in [-1, 1] -> L2-normalised embeddings (B, 512)
    (the embedding size is 512 * width).
    """

    def __init__(self, input_size: int = 112, num_layers: int = 50, mode: str = "ir_se", drop_ratio: float = 0.4,
                 affine: bool = True, width: float = 1.0, units: Optional[Sequence[int]] = None):
        super().__init__()
        if input_size not in (112, 224):
            raise ValueError(f"IRSEArcFace: input_size must be 112 or 224, got {input_size!r}")
        units = check_backbone_args(num_layers, mode, width, units, owner="IRSEArcFace")
        self.config = dict(input_size=input_size, num_layers=num_layers, mode=mode, drop_ratio=drop_ratio,
                           affine=affine, width=width, units=units)
        self.input_size = input_size
        chans = stage_channels(width)
        top = chans[3]
        side = input_size // 16
        self.embedding_dim = top
        self.input_layer = make_input_layer(3, chans[0])
        self.body, _ = make_body(get_blocks(num_layers, width, units), mode)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(top),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(top * side * side, top),
            nn.BatchNorm1d(top, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_size
        if not (torch.is_tensor(x) and x.ndim == 4 and x.shape[1] == 3 and tuple(x.shape[-2:]) == (s, s)):
            got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"IRSEArcFace expects images (B, 3, {s}, {s}); got {got}")
        x = self.output_layer(self.body(self.input_layer(x)))
        return F.normalize(x, p=2, dim=1)
