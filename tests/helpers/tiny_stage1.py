"""A tiny stage-1 hand-off (generator + narrow e4e encoder, e4e layout) for tests of the later stages."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from networks.encoder_checkpoints import export_e4e_checkpoint
from networks.encoders import build_encoder
from networks.stylegan2 import Generator


class TinyStage1(NamedTuple):
    """The written ``encoder.pt`` and the networks in it."""

    path: Path
    generator: Generator
    encoder: torch.nn.Module
    latent_avg: torch.Tensor


def export_tiny_stage1(path, size: int = 64, style_dim: int = 32, n_mlp: int = 2, channel_multiplier: float = 1,
                       channel_max: int = 32, seed: int = 0) -> TinyStage1:
    """Seeded G(size) + e4e encoder (width 0.25, one unit per stage, input = size) written to ``path``."""
    torch.manual_seed(seed)
    g = Generator(size, style_dim=style_dim, n_mlp=n_mlp, channel_multiplier=channel_multiplier,
                  channel_max=channel_max)
    enc = build_encoder("e4e", n_styles=g.n_latent, style_dim=style_dim, input_size=size, width=0.25,
                        units=[1, 1, 1, 1])
    latent_avg = g.mean_latent(256, seed=seed).reshape(1, -1).repeat(g.n_latent, 1)
    return TinyStage1(export_e4e_checkpoint(path, enc, g, latent_avg), g, enc, latent_avg)
