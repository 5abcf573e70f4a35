"""After each validation epoch, write the module's ``grid_batch`` as one picture: one row per entry.

Used by the inversion stages: ``grid_batch`` is a dict such as ``{"input": x, "reconstruction": y}``
(each (N, C, H, W); images in [-1, 1], C = 3, or masks in [0, 1], C = 1). The rows are stacked in the
dict's order, so columns line up image by image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import pytorch_lightning as pl
import torch

from callbacks.images import grid_to_pil, make_grid, save_png


def stack_rows(rows: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Named batches (N, C, H, W) -> one batch (len(rows) * N, 3, H, W) in [-1, 1], row after row.

    One-channel entries are treated as masks in [0, 1] and shown grey-scale. All entries must share N, H, W.
    """
    tiles = []
    for name, batch in rows.items():
        batch = batch.detach().float().cpu()
        if batch.ndim != 4 or batch.shape[1] not in (1, 3):
            raise ValueError(f"stack_rows: entry {name!r} must be (N, 1 or 3, H, W), got {tuple(batch.shape)}")
        if batch.shape[1] == 1:
            batch = batch.clamp(0, 1).mul(2).sub(1).expand(-1, 3, -1, -1)
        tiles.append(batch)
    shapes = {tuple(t.shape) for t in tiles}
    if len(shapes) != 1:
        raise ValueError(f"stack_rows: entries differ in shape {sorted(shapes)}")
    return torch.cat(tiles)


class ReconstructionGrid(pl.Callback):
    """Saves ``pl_module.grid_batch`` after validation to ``run_dir/reconstructions/step_XXXXXX.png`` (after
    testing: ``test_step_XXXXXX.png``, W&B key ``test/...``) and to
    every logger with ``log_image`` (W&B) under ``key``; rank zero only. Args: run_dir (default
    ``trainer.default_root_dir``), key. Does nothing while the module has no ``grid_batch``.
    """

    def __init__(self, run_dir: Optional[str] = None, key: str = "val/reconstructions"):
        super().__init__()
        self.run_dir, self.key = run_dir, key

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._save(trainer, pl_module, "step", self.key)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module, "test_step", self.key.replace("val/", "test/"))

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str, key: str) -> None:
        rows = getattr(pl_module, "grid_batch", None)
        if not rows or not trainer.is_global_zero:
            return
        images = stack_rows(rows)
        n = next(iter(rows.values())).shape[0]
        picture = grid_to_pil(make_grid(images, nrow=n))
        step = trainer.global_step
        run_dir = Path(self.run_dir or trainer.default_root_dir)
        save_png(picture, run_dir / "reconstructions" / f"{prefix}_{step:06d}.png")
        caption = " / ".join(rows)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[picture], step=step, caption=[f"{caption} (rows), step {step}"])
