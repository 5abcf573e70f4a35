"""pSp's encoder (Richardson et al. 2021, ``GradualStyleEncoder``): every W+ row from its own head."""
from __future__ import annotations

from typing import Dict

import torch

from .common import PyramidEncoder


class GradualStyleEncoder(PyramidEncoder):
    """W+ encoder of pSp: ``codes[:, i] = styles[i](level_i)`` with no shared base style.

    Same constructor, parameters (``encoder.*`` keys of pSp's ``psp_ffhq_encode.pt``), taps and
    ``config`` as ``Encoder4Editing`` (see ``PyramidEncoder``); no progressive stages.

    forward: images (B, input_nc, input_size, input_size) in [-1, 1] -> codes (B, n_styles, style_dim), without
    latent_avg.
    """

    kind = "psp"

    def codes_from_features(self, feats: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Each style from its pyramid level -> codes (B, n_styles, style_dim)."""
        cache: Dict[int, torch.Tensor] = {}
        rows = [self.styles[i](self.pyramid(feats, self.level_of(i), cache)) for i in range(self.n_styles)]
        return torch.stack(rows, dim=1)
