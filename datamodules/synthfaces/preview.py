"""Preview grid of SynthFaces: clean faces, part maps, a smile sweep, and every OOD family with its
mask, as one labelled PNG (``python -m datamodules.synthfaces --preview grid.png``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .corrupt import OOD_FAMILIES, corrupt_batch
from .factors import sample_factors
from .parts import colorize_parts
from .render import check_size, render_factors

_SEVERITIES = (0.25, 0.5, 0.75, 1.0)


def preview_grid(seed: int = 0, n: int = 8, size: int = 64, scale: int = 2) -> np.ndarray:
    """Return an (H, W, 3) uint8 grid: rows of ``n`` clean images, their part maps, one face with
    smile 0 -> 1, then per OOD family the corrupted images (severities cycling 0.25..1) and their
    masks; each tile upscaled ``scale`` times (nearest), with row labels on the left."""
    check_size(size)
    f = sample_factors(seed, n)
    out = render_factors(f, size)
    images, parts = out["images"], out["parts"]
    one = {k: v[:1].repeat(n) for k, v in f.items()}
    one["smile"] = torch.linspace(0.0, 1.0, n)
    rows = [("clean", images), ("parts", colorize_parts(parts)), ("smile 0..1", render_factors(one, size)["images"])]
    sev = torch.tensor([_SEVERITIES[i % len(_SEVERITIES)] for i in range(n)])
    for k, fam in enumerate(OOD_FAMILIES):
        bad, mask = corrupt_batch(images, parts, fam, sev, seed * 1000 + k)
        rows.append((fam, bad))
        rows.append((f"{fam} mask", (mask[:, None].expand(-1, 3, -1, -1) * 255).to(torch.uint8)))
    label_w, pad = 124, 2
    tile = size * scale
    grid = Image.new("RGB", (label_w + n * (tile + pad), len(rows) * (tile + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    for r, (name, batch) in enumerate(rows):
        y = r * (tile + pad)
        draw.text((4, y + tile // 2 - 6), name, fill=(0, 0, 0), font=font)
        for i in range(n):
            im = Image.fromarray(batch[i].permute(1, 2, 0).numpy()).resize((tile, tile), Image.NEAREST)
            grid.paste(im, (label_w + i * (tile + pad), y))
    return np.asarray(grid)


def save_preview(path: str | Path, seed: int = 0, n: int = 8, size: int = 64, scale: int = 2) -> Path:
    """Write ``preview_grid(seed, n, size, scale)`` as a PNG at ``path``; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(preview_grid(seed, n, size, scale)).save(path)
    return path
