"""An LPIPS-style distance on the features of a network trained on the domain ("lpips-synthfaces").

LPIPS compares channel-normalised activations of an ImageNet backbone. On SynthFaces no ImageNet weights are at
hand, and a random backbone measures nothing perceptual. This module builds the same distance on the SynthFaces
attribute classifier (``networks.synthfaces_nets.AttributeClassifier``, trained to read 36 face factors from
SynthFaces images): its taps are the output of each stage's first convolution block (full resolution of that stage:
64, 32, 16, 8 px for a 64 px classifier with four stages). Per layer the distance map is the channel mean of the
squared difference of unit-normalised features (LPIPS without learned linear heads: the paper's "baseline"
variant, since no human judgements of SynthFaces exist to fit them); the distance is the sum over layers of their
spatial means. ``FeatureLPIPS`` exposes the subset of ``lpips.LPIPS`` that ``lightning_modules.perceptual.LPIPSLoss``
uses (``net``, ``scaling_layer``, ``lins``, ``spatial``, ``__call__``), so every LPIPS use (losses, masked
per-layer distances, DSS error maps, metrics) takes it unchanged.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from networks.synthfaces_nets import AttributeClassifier

Tensor = torch.Tensor


def unit_normalise(features: Tensor, eps: float = 1e-10) -> Tensor:
    """Features (B, C, h, w) divided by their L2 norm over channels at each position (as ``lpips.normalize_tensor``)."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


class ClassifierTaps(nn.Module):
    """The attribute classifier's body as a feature pyramid: ``forward(x)`` -> [(B, C_s, R / 2^s, R / 2^s)], the output
    of each stage's first (stride-1) block for images (B, 3, H, W) in [-1, 1], resized to the classifier's R first.

    Args:
        classifier: a trained ``AttributeClassifier`` (frozen here, eval mode).
    """

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.resolution = int(classifier.resolution)
        self.body = classifier.body
        self.tap_indices = list(range(0, len(self.body), 2))  # blocks alternate stride 1, stride 2 per stage
        self.channels = [self.body[i][0].out_channels for i in self.tap_indices]

    def forward(self, x: Tensor) -> List[Tensor]:
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        taps = []
        for i, block in enumerate(self.body):
            x = block(x)
            if i in self.tap_indices:
                taps.append(x)
        return taps


class ChannelMean(nn.Module):
    """The uniform linear head: (B, C, h, w) -> channel mean (B, 1, h, w)."""

    def forward(self, d: Tensor) -> Tensor:
        return d.mean(dim=1, keepdim=True)


class FeatureLPIPS(nn.Module):
    """LPIPS-style distance on ``ClassifierTaps`` (see the module docstring).

    ``forward(x, y)`` for images (B, 3, H, W) in [-1, 1]: (B, 1, 1, 1) distances, or with ``spatial = True`` the
    per-pixel map (B, 1, H, W) (each layer's map bilinearly upsampled to the input size, summed).
    """

    pnet_type = "synthfaces"

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.net = ClassifierTaps(classifier)
        self.scaling_layer = nn.Identity()  # the classifier was trained on [-1, 1] images
        self.lins = nn.ModuleList(ChannelMean() for _ in self.net.tap_indices)
        self.spatial = False
        self.eval().requires_grad_(False)

    def layer_maps(self, x: Tensor, y: Tensor) -> List[Tensor]:
        """Per-layer distance maps [(B, 1, h_l, w_l)] of images x, y (B, 3, H, W) in [-1, 1]."""
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        return [lin((unit_normalise(a) - unit_normalise(b)) ** 2) for lin, a, b in zip(self.lins, fx, fy)]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        maps = self.layer_maps(x, y)
        if self.spatial:
            size = x.shape[-2:]
            return sum(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps)
        return sum(m.mean(dim=(2, 3), keepdim=True) for m in maps)


__all__ = ["FeatureLPIPS", "ClassifierTaps", "ChannelMean", "unit_normalise"]
