"""Part classes of the SynthFaces per-pixel part maps, and their display palette.

A pixel gets the class of the last-painted shape whose centre-sampled coverage is >= 0.5 (painter's
order: background, hair behind the head, neck, clothes, ears, skin, nose, eyes, brows, lips, mouth
interior, hair in front, glasses). Clear lenses keep the class beneath them; sunglass lenses are
``glasses``. Part maps describe the clean face; OOD corruptions come with their own masks.
"""
from __future__ import annotations

import torch

from labels.synthfaces import NUM_PARTS, PART_CLASSES, PART_INDEX, PART_PALETTE  # noqa: F401 (the tables live there)


def colorize_parts(parts: torch.Tensor) -> torch.Tensor:
    """Map a part map (N, H, W) of class indices to uint8 RGB images (N, 3, H, W) for display."""
    pal = torch.tensor(PART_PALETTE, dtype=torch.uint8, device=parts.device)
    return pal[parts.long().clamp(0, NUM_PARTS - 1)].permute(0, 3, 1, 2).contiguous()


def png_palette() -> list[int]:
    """Flat 768-entry palette for saving part maps as palette ('P' mode) PNGs whose pixel values
    are the class indices."""
    flat = [c for rgb in PART_PALETTE for c in rgb]
    return flat + [0] * (768 - len(flat))
