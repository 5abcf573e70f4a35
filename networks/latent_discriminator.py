"""e4e's latent-code discriminator: an MLP that tells encoded W rows from mapping-network W samples.

Parameter names follow e4e's ``LatentCodesDiscriminator`` (``mlp.0``, ``mlp.2``, ... linear layers with
LeakyReLU(0.2) between them), so its state dict matches ``discriminator_state_dict`` in e4e training
checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn


class LatentCodesDiscriminator(nn.Module):
    """MLP critic on single W vectors.

    Args:
        style_dim: size D of a W vector.
        num_mlp_layers: linear layers in total; all but the last map D -> D and are followed by
            LeakyReLU(0.2), the last maps D -> 1.

    ``forward(w (N, D)) -> logits (N, 1)``.
    """

    def __init__(self, style_dim: int = 512, num_mlp_layers: int = 4):
        super().__init__()
        if num_mlp_layers < 1:
            raise ValueError(f"LatentCodesDiscriminator: num_mlp_layers must be >= 1, got {num_mlp_layers}")
        layers = []
        for _ in range(num_mlp_layers - 1):
            layers += [nn.Linear(style_dim, style_dim), nn.LeakyReLU(0.2)]
        layers.append(nn.Linear(style_dim, 1))
        self.mlp = nn.Sequential(*layers)
        self.config = {"style_dim": int(style_dim), "num_mlp_layers": int(num_mlp_layers)}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """w (N, D) -> logits (N, 1)."""
        return self.mlp(w)
