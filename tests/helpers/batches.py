"""Test data in the project's one batch shape: dict items ``{"image": (3, S, S), "name": str}``."""
from __future__ import annotations

from typing import Dict, List

import torch


def image_items(images: torch.Tensor, prefix: str = "") -> List[Dict[str, object]]:
    """Dataset items ``{"image": images[i], "name": f"{prefix}{i}"}`` of images (N, 3, S, S): a ``DataLoader`` over
    them gives the batches every DataModule gives."""
    return [{"image": image, "name": f"{prefix}{i}"} for i, image in enumerate(images)]
