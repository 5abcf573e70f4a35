"""Image encoders for GAN inversion: e4e / pSp W+ encoders on IR-SE backbones, and the ArcFace IR-SE network.

* ``Encoder4Editing`` (kind "e4e") and ``GradualStyleEncoder`` (kind "psp"): images (B, 3, S, S) ->
  W+ codes (B, n_styles, style_dim) without latent_avg; ``forward_features`` also returns the taps
  f0..f4 (channels in ``encoder.feature_channels``, strides 1/2/4/8/16 in ``encoder.feature_strides``).
* ``build_encoder(kind, **config)`` builds one by kind; ``ENCODER_KINDS`` lists the kinds.
* ``IRSEArcFace``: identity embeddings (B, 512) with ``model_ir_se50.pth`` keys.
* ``resize_to_encoder``: bring images to the encoder's input size (with a warning) or fail clearly.
"""
from __future__ import annotations

from .arcface import IRSEArcFace
from .common import FEATURE_NAMES, GradualStyleBlock, PyramidEncoder, resize_to_encoder
from .e4e import Encoder4Editing
from .irse import BottleneckIR, BottleneckIRSE, SEModule, get_blocks
from .psp import GradualStyleEncoder

ENCODER_CLASSES = {"e4e": Encoder4Editing, "psp": GradualStyleEncoder}
ENCODER_KINDS = tuple(ENCODER_CLASSES)


def build_encoder(kind: str, **config) -> PyramidEncoder:
    """Build an encoder: ``kind`` "e4e" (``Encoder4Editing``) or "psp" (``GradualStyleEncoder``), ``config`` its kwargs.

    Raises:
        ValueError: unknown kind (the message lists the choices) or invalid config values.
        TypeError: unknown config keys.
    """
    if kind not in ENCODER_CLASSES:
        raise ValueError(f"unknown encoder kind {kind!r}; choose one of {list(ENCODER_KINDS)}")
    return ENCODER_CLASSES[kind](**config)


__all__ = ["ENCODER_KINDS", "ENCODER_CLASSES", "FEATURE_NAMES", "Encoder4Editing", "GradualStyleEncoder",
           "GradualStyleBlock", "PyramidEncoder", "IRSEArcFace", "BottleneckIR", "BottleneckIRSE", "SEModule",
           "get_blocks", "build_encoder", "resize_to_encoder"]
