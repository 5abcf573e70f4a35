"""Part classes of the SynthFaces per-pixel part maps, and their display palette.

A pixel gets the class of the last-painted shape whose centre-sampled coverage is >= 0.5 (painter's
order: background, hair behind the head, neck, clothes, ears, skin, nose, eyes, brows, lips, mouth
interior, hair in front, glasses). Clear lenses keep the class beneath them; sunglass lenses are
``glasses``. Part maps describe the clean face; OOD corruptions come with their own masks.
"""
from __future__ import annotations

import torch

PART_CLASSES: tuple[str, ...] = (
    "background",  # 0
    "skin",        # 1 face skin
    "hair",        # 2
    "eye",         # 3 eye white, iris, pupil
    "brow",        # 4
    "nose",        # 5
    "lips",        # 6
    "mouth",       # 7 mouth interior and teeth
    "glasses",     # 8 frames, and lenses of sunglasses
    "ear",         # 9
    "neck",        # 10
    "clothes",     # 11
)
PART_INDEX = {name: i for i, name in enumerate(PART_CLASSES)}
NUM_PARTS = len(PART_CLASSES)

PART_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (204, 160, 120), (90, 50, 20), (255, 255, 255), (140, 30, 140), (255, 160, 0),
    (230, 30, 60), (120, 0, 0), (0, 200, 255), (60, 180, 60), (150, 110, 80), (40, 60, 200),
)


def colorize_parts(parts: torch.Tensor) -> torch.Tensor:
    """Map a part map (N, H, W) of class indices to uint8 RGB images (N, 3, H, W) for display."""
    pal = torch.tensor(PART_PALETTE, dtype=torch.uint8, device=parts.device)
    return pal[parts.long().clamp(0, NUM_PARTS - 1)].permute(0, 3, 1, 2).contiguous()


def png_palette() -> list[int]:
    """Flat 768-entry palette for saving part maps as palette ('P' mode) PNGs whose pixel values
    are the class indices."""
    flat = [c for rgb in PART_PALETTE for c in rgb]
    return flat + [0] * (768 - len(flat))
