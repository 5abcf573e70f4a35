"""The frozen stage-1 hand-off (encoder + generator + average latent) that stages 2 and 3 build on."""
from __future__ import annotations

from pathlib import Path

import torch

from networks.encoder_checkpoints import load_e4e_checkpoint
from networks.encoders import resize_to_encoder

Tensor = torch.Tensor


ENCODER_RESIZES = ("antialiased", "bilinear")


class FrozenStage1:
    """Mixin for LightningModules: ``load_stage1(path)`` sets ``encoder``, ``generator`` (frozen, eval) and the
    ``latent_avg`` buffer (n_styles, D) from an e4e-layout file; ``encode(images)`` gives codes and taps.

    ``encoder_resize`` (class default "antialiased", as e4e's PIL-resized inputs) says how images of another size
    reach the encoder: "bilinear" is OOD-GAN-inversion's plain ``F.interpolate`` of the 1024 px input."""

    encoder_resize = "antialiased"

    def load_stage1(self, path) -> None:
        """Read the stage-1 hand-off ``path`` (``encoder_checkpoint`` keeps its string for errors and meta)."""
        self.encoder_checkpoint = str(path)
        loaded = load_e4e_checkpoint(Path(self.encoder_checkpoint).expanduser())
        self.encoder, self.generator = loaded.encoder.eval(), loaded.generator.eval()
        self.encoder.requires_grad_(False)
        self.generator.requires_grad_(False)
        self.register_buffer("latent_avg", loaded.latent_avg.float().clone())

    @torch.no_grad()
    def encode(self, images: Tensor):
        """Images (B, 3, S, S) -> (W+ codes (B, L, D) with latent_avg, encoder taps {"f0".."f4"})."""
        x = resize_to_encoder(images, int(self.encoder.config["input_size"]),
                              antialias=self.encoder_resize == "antialiased")
        codes, taps = self.encoder.forward_features(x)
        return codes + self.latent_avg.unsqueeze(0), taps
