"""VGG19 perceptual + Gram style loss as in BasicSR's ``PerceptualLoss`` (the official stage-2 recipe's loss).

The OOD-GAN-inversion training config (``options/train/E4E_Face.yml``, ``perceptual_opt``) uses BasicSR's
``PerceptualLoss`` with a VGG19 feature extractor: features taken *before* the ReLU of conv1_2, conv2_2, conv3_4,
conv4_4, conv5_4 (layer weights 0.1, 0.1, 1, 1, 1), inputs mapped from [-1, 1] to [0, 1] (``range_norm``) and then
ImageNet-normalised (``use_input_norm``), criterion L1 (mean over all elements), the target's features detached.
Style term: the same L1 between Gram matrices ``F F^T / (C H W)`` per layer, with the same layer weights; the
recipe weights the two terms 1 and 50.

The torchvision VGG19 ImageNet weights (``vgg19-dcbb9e9d.pth``, keys ``features.N.*``) come from an explicit file:
nothing is downloaded. Without one the loss refuses, unless the caller opts in to a seeded random network; its
values are then named "vgg-random" (not comparable to anything).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from networks.checkpoints import CheckpointError, safe_load

Tensor = torch.Tensor
# torchvision vgg19().features: conv / relu / pool names in order (index = position in ``features``)
VGG19_NAMES = ("conv1_1 relu1_1 conv1_2 relu1_2 pool1 conv2_1 relu2_1 conv2_2 relu2_2 pool2 conv3_1 relu3_1 conv3_2 "
               "relu3_2 conv3_3 relu3_3 conv3_4 relu3_4 pool3 conv4_1 relu4_1 conv4_2 relu4_2 conv4_3 relu4_3 conv4_4 "
               "relu4_4 pool4 conv5_1 relu5_1 conv5_2 relu5_2 conv5_3 relu5_3 conv5_4 relu5_4 pool5").split()
OFFICIAL_LAYER_WEIGHTS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}
VGG19_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_features(n_layers: int) -> nn.Sequential:
    """The first ``n_layers`` modules of torchvision's ``vgg19().features`` (same indices, so ``features.N.*`` keys
    load as ``N.*``): 3x3 convs (padding 1), ReLU, 2x2 max pooling; ReLUs not in place (pre-ReLU outputs stay)."""
    layers, in_ch = [], 3
    for width in VGG19_WIDTHS:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.ReLU(inplace=False)]
            in_ch = width
    return nn.Sequential(*layers[:n_layers])


def gram_matrix(x: Tensor) -> Tensor:
    """Gram matrices (B, C, C) of features (B, C, H, W), normalised by C * H * W (BasicSR's ``_gram_mat``)."""
    b, c, h, w = x.shape
    f = x.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


class VGGPerceptualLoss(nn.Module):
    """L1 distance of VGG19 pre-ReLU features and of their Gram matrices (official stage-2 perceptual / style loss).

    Args:
        weights: torchvision ``vgg19`` ImageNet state dict (``vgg19-dcbb9e9d.pth``); required unless ``allow_random``.
        allow_random: without ``weights``, a seeded random VGG19 (warns; ``metric_name`` "vgg-random").
        layer_weights: {layer name: weight} (default ``OFFICIAL_LAYER_WEIGHTS``), names from ``VGG19_NAMES``.
        key: config key named in errors.

    ``forward(x, y) -> (perceptual, style)`` scalars for images x, y (B, 3, H, W) in [-1, 1]; ``y`` is the target
    (detached). Frozen, eval mode; gradients flow to ``x``.
    """

    def __init__(self, weights: Optional[str] = None, allow_random: bool = False,
                 layer_weights: Optional[Mapping[str, float]] = None, key: str = "model.vgg.weights"):
        super().__init__()
        self.layer_weights = {str(k): float(v) for k, v in (layer_weights or OFFICIAL_LAYER_WEIGHTS).items()}
        unknown = sorted(set(self.layer_weights) - set(VGG19_NAMES))
        if unknown or not self.layer_weights:
            raise ValueError(f"VGGPerceptualLoss: unknown VGG19 layers {unknown} (choose from {VGG19_NAMES})")
        if weights is None and not allow_random:
            raise ValueError(f"The VGG19 perceptual loss needs ImageNet weights and nothing can be downloaded: set "
                             f"{key}=PATH to torchvision's vgg19-dcbb9e9d.pth, or opt in to a random network with "
                             f"{key.rsplit('.', 1)[0]}.allow_random=true (logged as 'vgg-random')")
        last = max(VGG19_NAMES.index(k) for k in self.layer_weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random network is the same in every run
            self.features = vgg19_features(last + 1)
        self.names = VGG19_NAMES[:last + 1]
        if weights is not None:
            self._load(self.features, Path(weights).expanduser(), key)
            self.metric_name = "vgg"
        else:
            warnings.warn(f"VGGPerceptualLoss: no {key}; using a random VGG19. Values are labelled 'vgg-random'.",
                          stacklevel=2)
            self.metric_name = "vgg-random"
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    @staticmethod
    def _load(features: nn.Sequential, path: Path, key: str) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{key}={path}: no such file (torchvision's vgg19-dcbb9e9d.pth)")
        state = safe_load(path)
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{key}={path}: expected a torchvision VGG19 state dict")
        own = features.state_dict()
        missing = [f"features.{k}" for k in own if f"features.{k}" not in state]
        shaped = [f"features.{k}" for k in own if f"features.{k}" in state
                  and tuple(state[f"features.{k}"].shape) != tuple(own[k].shape)]
        if missing or shaped:
            raise CheckpointError(f"{key}={path} is not a torchvision VGG19 state dict: missing {missing[:4]}, "
                                  f"mis-shaped {shaped[:4]}")
        features.load_state_dict({k: state[f"features.{k}"] for k in own}, strict=True)

    def train(self, mode: bool = True) -> "VGGPerceptualLoss":
        """Stays in eval mode (a frozen feature extractor)."""
        super().train(False)
        return self

    def extract(self, x: Tensor) -> Dict[str, Tensor]:
        """Pre-ReLU features {layer: (B, C, h, w)} of images (B, 3, H, W) in [-1, 1]."""
        x = ((x + 1) / 2 - self.mean) / self.std
        out = {}
        for name, layer in zip(self.names, self.features):
            x = layer(x)
            if name in self.layer_weights:
                out[name] = x
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"VGGPerceptualLoss: x {tuple(x.shape)} and y {tuple(y.shape)} must both be (B, 3, H, W)")
        fx, fy = self.extract(x), self.extract(y.detach())
        perceptual = sum(w * F.l1_loss(fx[k], fy[k]) for k, w in self.layer_weights.items())
        style = sum(w * F.l1_loss(gram_matrix(fx[k]), gram_matrix(fy[k])) for k, w in self.layer_weights.items())
        return perceptual, style
