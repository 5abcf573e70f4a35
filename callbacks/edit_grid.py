"""Edit grids after testing: methods (rows) x edit strengths (columns) for the first images of test batch 0.

The callback asks the module for a grid (``pl_module.edit_grid_request``, set at test start: strengths, number
of columns, number of images) and the module renders it while scoring batch 0 into ``pl_module.edit_grid_batch``
(``RefineModule.edit_grid``)::

    {edit name: {"strengths": [s_1 .. s_K], "rows": {method: (K + 1, N, 3, H, W) in [-1, 1]}}}

Column 0 of every row is the input. This callback only lays the tensors out and writes them: one PNG per edit,
``<run_dir>/edits/test_edit_grid_<edit>.png`` (image by image, one row per method; labelled: a header band with the
edit's name over the column headers "input" and the strengths, a band of row labels naming image and method), and,
for every logger with ``log_image`` (W&B), the same picture under ``test/<key>/<edit>`` with a caption naming the rows
and columns.
Rank zero only. A module that does not offer ``lightning_modules.contracts.DrawsEditGrids`` is left alone.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from callbacks.images import grid_to_pil, label_grid, make_grid, save_png
from lightning_modules.contracts import DrawsEditGrids


def _label(strength: float) -> str:
    return f"{strength:+g}" if strength else "0"


def layout(strengths: Sequence[float], rows: Mapping[str, torch.Tensor],
           tile_size: Optional[int] = None) -> torch.Tensor:
    """Tiles of one edit grid in reading order (``make_grid(tiles, nrow=K + 1)`` draws the picture).

    Args:
        strengths: the K column strengths.
        rows: {method: (K + 1, N, 3, H, W)}, column 0 the input.
        tile_size: shrink tiles larger than this (area interpolation); None = full size.
    Returns:
        (N * M * (K + 1), 3, h, w): image by image, then method (M rows per image), then column.
    """
    if not rows:
        raise ValueError("edit grid: no rows (methods)")
    shapes = {tuple(t.shape) for t in rows.values()}
    first = next(iter(rows.values()))
    if len(shapes) != 1 or first.ndim != 5 or first.shape[0] != len(strengths) + 1 or first.shape[2] != 3:
        raise ValueError(f"edit grid: every row must be (K + 1 = {len(strengths) + 1}, N, 3, H, W), got "
                         f"{ {k: tuple(v.shape) for k, v in rows.items()} }")
    stacked = torch.stack([t.detach().float().cpu() for t in rows.values()])  # (M, K + 1, N, 3, H, W)
    tiles = stacked.permute(2, 0, 1, 3, 4, 5).reshape(-1, *first.shape[2:])  # image, method, column
    if tile_size and max(tiles.shape[-2:]) > tile_size:
        scale = tile_size / max(tiles.shape[-2:])
        size = (max(1, round(tiles.shape[-2] * scale)), max(1, round(tiles.shape[-1] * scale)))
        tiles = F.interpolate(tiles, size=size, mode="area")
    return tiles


def caption(edit: str, strengths: Sequence[float], methods: Sequence[str], n_images: int) -> str:
    """What the grid shows, e.g. ``rows: 2 image(s) x (e4e (stage 1) / dhr (stage 3)), image by image; columns:
    input | smile -3 | ...``."""
    columns = " | ".join(["input"] + [f"{edit} {_label(k)}" for k in strengths])
    return f"rows: {n_images} image(s) x ({' / '.join(methods)}), image by image; columns: {columns}"


def column_labels(strengths: Sequence[float]) -> List[str]:
    """Column headers of an edit grid: "input", then each strength (``+1.5``, ``0``, ``-3``)."""
    return ["input"] + [_label(k) for k in strengths]


def row_labels(methods: Sequence[str], n_images: int) -> List[str]:
    """Row labels in ``layout`` order (image by image, then method): the method, prefixed ``#i`` (1-based image
    number) when the grid shows more than one image."""
    if n_images <= 1:
        return list(methods)
    return [f"#{i + 1} {m}" for i in range(n_images) for m in methods]


def labelled_picture(edit: str, strengths: Sequence[float], rows: Mapping[str, torch.Tensor],
                     tile_size: Optional[int] = None):
    """The PIL picture of one edit grid with its labels: title "<edit>: edit strength", column headers
    (``column_labels``) and row labels (``row_labels``) around the ``make_grid`` tiles of ``layout``."""
    tiles = layout(strengths, rows, tile_size)
    picture = grid_to_pil(make_grid(tiles, nrow=len(strengths) + 1))
    n_images = next(iter(rows.values())).shape[1]
    return label_grid(picture, (tiles.shape[-1], tiles.shape[-2]), column_labels(strengths),
                      row_labels(list(rows), n_images), title=f"{edit}: edit strength")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(name)) or "edit"


class EditGrid(pl.Callback):
    """Writes the module's edit grids after testing (see the module docstring).

    Args:
        run_dir: output directory (default ``trainer.default_root_dir``); PNGs go to ``<run_dir>/edits/``.
        key: W&B key under ``test/`` (``test/<key>/<edit>``).
        strengths: column strengths for every edit; None = the module's default (for ``RefineModule``:
            ``n_columns`` values over each configured edit's range, 0 included).
        n_columns: number of columns when ``strengths`` is None (>= 2).
        n_images: images of test batch 0 in the grid (>= 1).
        tile_size: shrink larger images to this side in the picture (None = full size).
    """

    def __init__(self, run_dir: Optional[str] = None, key: str = "edit_grid",
                 strengths: Optional[Sequence[float]] = None,
                 n_columns: int = 5, n_images: int = 4, tile_size: Optional[int] = 256):
        super().__init__()
        if strengths is not None:
            try:
                strengths = [float(k) for k in strengths]
            except (TypeError, ValueError):
                raise ValueError(f"EditGrid: strengths must be a list of numbers, got {strengths!r}") from None
            if not strengths:
                raise ValueError("EditGrid: strengths is empty (null = the module's default columns)")
        for name, value, low in (("n_columns", n_columns, 2), ("n_images", n_images, 1)):
            if int(value) < low:
                raise ValueError(f"EditGrid: {name} must be >= {low}, got {value!r}")
        self.run_dir, self.key, self.strengths = run_dir, key, strengths
        self.n_columns, self.n_images, self.tile_size = int(n_columns), int(n_images), tile_size
        self.written: List[Path] = []

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(pl_module, DrawsEditGrids):
            pl_module.edit_grid_batch = None  # no stale grid from an earlier test run
            pl_module.edit_grid_request = {"strengths": self.strengths, "n_columns": self.n_columns,
                                           "n": self.n_images}

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grids = pl_module.edit_grid_batch if isinstance(pl_module, DrawsEditGrids) else None
        if grids and trainer.is_global_zero:
            self.write(trainer, grids, "test")

    def write(self, trainer: pl.Trainer, grids: Mapping[str, Mapping[str, Any]], stage: str) -> List[Path]:
        """Lay out, save and log every edit's grid; returns the PNG paths."""
        run_dir = Path(self.run_dir or trainer.default_root_dir)
        step = trainer.global_step
        paths = []
        for edit, grid in grids.items():
            strengths, rows = list(grid["strengths"]), dict(grid["rows"])
            picture = labelled_picture(edit, strengths, rows, self.tile_size)
            path = save_png(picture, run_dir / "edits" / f"{stage}_edit_grid_{_safe_name(edit)}.png")
            paths.append(path)
            text = caption(edit, strengths, list(rows), next(iter(rows.values())).shape[1])
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=f"{stage}/{self.key}/{edit}", images=[picture], step=step, caption=[text])
        self.written = paths
        return paths
