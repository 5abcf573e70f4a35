"""Per-image metrics as a ``wandb.Table`` and their means in the run summary, after testing.

Reads the module's ``test_table`` (``lightning_modules.metrics.MetricTable``: one row per image, a ``name``
column and numbers). For every W&B logger, rank zero only: ``test/per_image`` (a table the dashboard can sort,
filter and plot) and ``summary["test_mean/<metric>"]`` for each column's mean. Other loggers are left alone.
"""
from __future__ import annotations

import math

import pytorch_lightning as pl


def _cell(value):
    if isinstance(value, float) and math.isnan(value):
        return None  # W&B tables show missing values as empty cells
    return value


class WandbMetricTable(pl.Callback):
    """Logs ``pl_module.test_table`` to W&B after ``trainer.test`` (see the module docstring). Args: key."""

    def __init__(self, key: str = "test/per_image"):
        super().__init__()
        self.key = key

    # on_test_end, not on_test_epoch_end: callbacks' epoch-end hooks run before the module's, which is where the
    # stages gather the per-image rows of every DDP rank
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = getattr(pl_module, "test_table", None)
        if table is None or not table.rows or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        if not loggers:
            return
        import wandb

        columns = ["name"] + [c for c in table.columns() if c != "name"]
        data = [[_cell(row.get(c)) for c in columns] for row in table.rows]
        for logger in loggers:
            run = logger.experiment
            run.log({self.key: wandb.Table(columns=columns, data=data), "trainer/global_step": trainer.global_step})
            for name, value in table.mean().items():
                run.summary[f"test_mean/{name}"] = value
