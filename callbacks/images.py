"""Image helpers of the callbacks and writers: tile a batch, tensor -> PIL, label a grid, add a legend, write a PNG
atomically.

Plain torch + PIL (no torchvision). Text is drawn with ``PIL.ImageDraw`` in PIL's built-in bitmap font (no font file
is read or downloaded).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

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


# ------------------------------------------------------------------ labels and legends
TEXT = (0, 0, 0)        # label colour
BAND = (255, 255, 255)  # label band background
MARGIN = 3              # pixels around text in a band


def label_font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font (6 x 11 px per character; nothing is read from disk or downloaded)."""
    return ImageFont.load_default_imagefont()


def _text_width(font, text: str) -> int:
    return int(font.getbbox(text)[2]) if text else 0


def _line_height(font) -> int:
    return int(font.getbbox("Ag")[3]) + 1


def wrap_text(text: str, width: int, font=None) -> List[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels wide in ``font`` (a word wider than that is
    cut between characters)."""
    font = font or label_font()
    lines: List[str] = []
    for word in str(text).split():
        while _text_width(font, word) > width and len(word) > 1:  # cut a long word
            cut = max(1, max(k for k in range(1, len(word) + 1) if _text_width(font, word[:k]) <= width or k == 1))
            if lines and _text_width(font, lines[-1] + " " + word[:cut]) <= width:
                lines[-1] += " " + word[:cut]
            else:
                lines.append(word[:cut])
            word = word[cut:]
        if lines and _text_width(font, lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        elif word:
            lines.append(word)
    return lines or [""]


def label_grid(picture: Image.Image, tile: Tuple[int, int], columns: Optional[Sequence[str]] = None,
               rows: Optional[Sequence[str]] = None, padding: int = 2, title: Optional[str] = None,
               row_width: int = 150) -> Image.Image:
    """A ``make_grid`` picture with its columns and rows named: a header band on top (``title`` on its own line,
    then each column label centred over its column of tiles) and a band on the left (each row label centred on its
    row of tiles), black text on white.

    Args:
        picture: the grid (PIL image) of tiles ``tile`` = (width, height) with ``padding`` between them.
        columns: one label per column (None: no column labels); rows: one label per row (None: no row band).
        title: a line above the column labels (None: none).
        row_width: row labels wrap to this many pixels.
    Returns:
        A new RGB image: the grid is pasted at (left band width, header band height), unchanged.
    """
    font, line = label_font(), _line_height(label_font())
    w, h = int(tile[0]), int(tile[1])
    col_lines = [wrap_text(c, max(w, 6), font) for c in columns] if columns else []
    row_lines = [wrap_text(r, row_width, font) for r in rows] if rows else []
    title_lines = wrap_text(title, max(picture.width, 60), font) if title else []
    n_head = len(title_lines) + max((len(c) for c in col_lines), default=0)
    top = n_head * line + 2 * MARGIN if n_head else 0
    left = max((_text_width(font, t) for r in row_lines for t in r), default=0)
    left = left + 2 * MARGIN if row_lines else 0
    out = Image.new("RGB", (picture.width + left, picture.height + top), BAND)
    out.paste(picture.convert("RGB"), (left, top))
    draw = ImageDraw.Draw(out)
    y = MARGIN
    for text in title_lines:
        draw.text((left + MARGIN, y), text, fill=TEXT, font=font)
        y += line
    for j, lines in enumerate(col_lines):
        centre = left + padding + j * (w + padding) + w / 2
        for k, text in enumerate(lines):
            draw.text((round(centre - _text_width(font, text) / 2), y + k * line), text, fill=TEXT, font=font)
    for i, lines in enumerate(row_lines):
        middle = top + padding + i * (h + padding) + h / 2
        y0 = round(middle - len(lines) * line / 2)
        for k, text in enumerate(lines):
            draw.text((MARGIN, y0 + k * line), text, fill=TEXT, font=font)
    return out


def add_legend(picture: Image.Image, entries: Sequence[Tuple[Tuple[int, int, int], str]],
               swatch: int = 10) -> Image.Image:
    """``picture`` with a legend band below it: for each (RGB colour, label) a filled ``swatch`` x ``swatch`` square
    and its label, left to right, on as many lines as the width needs (the picture is widened for one entry wider
    than it). Returns a new RGB image."""
    font, line = label_font(), max(_line_height(label_font()), swatch + 1)
    widths = [swatch + 4 + _text_width(font, text) for _, text in entries]
    width = max([picture.width, *[wd + 2 * MARGIN for wd in widths]])
    placed, x, y = [], MARGIN, MARGIN
    for (colour, text), wd in zip(entries, widths):
        if x > MARGIN and x + wd > width - MARGIN:
            x, y = MARGIN, y + line + 2
        placed.append((x, y, colour, text))
        x += wd + 12
    band = (y + line + MARGIN) if entries else 0
    out = Image.new("RGB", (width, picture.height + band), BAND)
    out.paste(picture.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for x, y, colour, text in placed:
        y0 = picture.height + y
        draw.rectangle([x, y0, x + swatch - 1, y0 + swatch - 1], fill=tuple(colour), outline=TEXT)
        draw.text((x + swatch + 4, y0), text, fill=TEXT, font=font)
    return out
