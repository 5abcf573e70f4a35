"""Identity loss / metric: 1 - cosine similarity of ArcFace IR-SE-50 embeddings (pSp / e4e's ``IDLoss``).

The weights are TreB1eN's ``model_ir_se50.pth`` from an explicit path; nothing is downloaded. Without
a file the loss refuses, unless the caller opts in to a seeded random network, whose numbers are named
"id-random".
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from networks.checkpoints import CheckpointError, load_strict, safe_load
from networks.encoders import IRSEArcFace

Tensor = torch.Tensor
CROPS = ("e4e", "scaled")


def face_crop(x: Tensor, crop: str = "e4e") -> Tensor:
    """The ID crop of images (B, 3, H, W) -> (B, 3, 112, 112).

    "e4e": resized to 256, cropped to rows 35:223 / cols 32:220, pooled to 112. "scaled" (OOD-GAN-inversion's
    IDLoss): with s = H // 256, rows 35s:H-33s / cols 32s:W-36s of the image as it is (no crop when H < 256), pooled
    to 112 (at 1024 px: rows 140:892, cols 128:880).
    """
    if crop not in CROPS:
        raise ValueError(f"face_crop: crop must be one of {CROPS}, got {crop!r}")
    if crop == "scaled":
        s = x.shape[-2] // 256
        if s >= 1:
            x = x[:, :, 35 * s:x.shape[-2] - 33 * s, 32 * s:x.shape[-1] - 36 * s]
        return F.adaptive_avg_pool2d(x, (112, 112))
    if x.shape[-1] != 256 or x.shape[-2] != 256:
        x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
    return F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (112, 112))


class IDLoss(nn.Module):
    """Per-image identity distance ``1 - <f(x), f(y)>`` with ArcFace embeddings f (L2-normalised).

    Args:
        weights: path of ``model_ir_se50.pth``; required unless ``allow_random``.
        allow_random: without ``weights``, a seeded random ArcFace (warns; ``metric_name`` "id-random").
        key: config key named in errors.
        arcface: optional ready network (tests, other depths); ``weights`` is then loaded into it if given.
        crop: "e4e" (default) or "scaled" (the official stage-2 recipe), see ``face_crop``.

    ``forward(x, y) -> (B,)`` for images (B, 3, H, W) in [-1, 1]; gradients flow to the inputs, the
    network is frozen and in eval mode.
    """

    def __init__(self, weights: Optional[str] = None, allow_random: bool = False, key: str = "model.identity.weights",
                 arcface: Optional[IRSEArcFace] = None, crop: str = "e4e"):
        super().__init__()
        if crop not in CROPS:
            raise ValueError(f"IDLoss: crop must be one of {CROPS}, got {crop!r} ({key.rsplit('.', 1)[0]}.crop)")
        self.crop = crop
        if weights is None and not allow_random:
            raise ValueError(f"The identity loss needs ArcFace weights and nothing can be downloaded: set {key}=PATH to "
                             f"TreB1eN's model_ir_se50.pth, set its weight (e.g. model.id_lambda) to 0, or opt in to a "
                             f"random network with {key.rsplit('.', 1)[0]}.allow_random=true (logged as 'id-random')")
        if arcface is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                arcface = IRSEArcFace(112, 50, "ir_se")
        self.facenet = arcface
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{key}={path}: no such file (TreB1eN's model_ir_se50.pth)")
            state = safe_load(path)
            if not isinstance(state, dict):
                raise CheckpointError(f"{key}={path}: expected a state dict, found {type(state).__name__}")
            load_strict(self.facenet, state, source=f"{key}={path}")
            self.metric_name = "id"
        else:
            warnings.warn(f"IDLoss: no {key}; using a random ArcFace. Values are labelled 'id-random'.", stacklevel=2)
            self.metric_name = "id-random"
        self.facenet.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "IDLoss":
        """Stays in eval mode (BatchNorm statistics of the released network)."""
        super().train(False)
        return self

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> embeddings (B, 512)."""
        return self.facenet(face_crop(x, self.crop))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return 1 - (self.embed(x) * self.embed(y)).sum(dim=1)
