"""Tiny hand-offs of one 64 px generator for run-level tests: stage 1, stage 2, a smile direction, a classifier."""
from pathlib import Path
from typing import Dict

import torch

from networks.align_mask import AlignMaskNet, default_levels, save_align_mask
from networks.editing import save_direction
from networks.synthfaces_nets import AttributeClassifier, save_aux_net
from tests.helpers.tiny_stage1 import export_tiny_stage1


def export_tiny_handoffs(root: Path, produced_by: str = "test") -> Dict[str, str]:
    """Write ``encoder.pt`` (tiny stage 1), ``align_mask.pt`` (an untrained stage-2 net for its generator),
    ``classifier.pt`` (an untrained SynthFaces attribute classifier) and ``smile.pt`` (a seeded direction) under
    ``root``; returns {"encoder", "align", "classifier", "direction"} -> path strings."""
    encoder, g, enc, _ = export_tiny_stage1(root / "encoder.pt")
    net = AlignMaskNet(dict(g.channels), dict(enc.feature_channels), default_levels(64), 64)
    align = save_align_mask(root / "align_mask.pt", net, {"generator": dict(g.config), "produced_by": produced_by})
    classifier = save_aux_net(root / "classifier.pt", AttributeClassifier(resolution=64, widths=(4, 8, 8, 8),
                                                                          feature_dim=8))
    torch.manual_seed(3)
    direction = save_direction(root / "smile.pt", torch.randn(1, 32))
    return {k: str(v) for k, v in dict(encoder=encoder, align=align, classifier=classifier,
                                       direction=direction).items()}
