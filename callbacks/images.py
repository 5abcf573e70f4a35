"""Image helpers of the callbacks and writers: tile a batch, tensor -> PIL, write a PNG atomically.

Plain torch + PIL (no torchvision).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from networks.checkpoints import atomic_target


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 2,
              pad_value: float = 1.0) -> torch.Tensor:
    """Tile images (N, C, H, W) with values in [-1, 1] into one (C, H', W') tensor in [0, 1].

    ``nrow`` images per row (default ceil(sqrt(N))); rows = ceil(N / nrow); H' = rows * (H + padding)
    + padding, W' = nrow * (W + padding) + padding. Empty cells and borders are ``pad_value``.
    """
    if images.ndim != 4:
        raise ValueError(f"make_grid expects (N, C, H, W) images, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / nrow)
    grid = images.new_full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    tiles = ((images.detach().float() + 1) / 2).clamp(0, 1)
    for k in range(n):
        y, x = padding + (k // nrow) * (h + padding), padding + (k % nrow) * (w + padding)
        grid[:, y:y + h, x:x + w] = tiles[k]
    return grid


def grid_to_pil(grid: torch.Tensor) -> Image.Image:
    """(C, H, W) tensor in [0, 1] with C in {1, 3} -> PIL image (8-bit, L or RGB)."""
    array = (grid.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if array.shape[0] == 1:
        return Image.fromarray(array[0].numpy())
    return Image.fromarray(array.permute(1, 2, 0).contiguous().numpy())


def save_png(image: Image.Image, path) -> Path:
    """Write a PIL image as PNG to ``path`` through a temporary name (readers never see a half file)."""
    path = Path(path)
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_grid(images: torch.Tensor, path, nrow: Optional[int] = None, padding: int = 2) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid (see ``make_grid``); returns the path."""
    return save_png(grid_to_pil(make_grid(images, nrow=nrow, padding=padding)), path)
