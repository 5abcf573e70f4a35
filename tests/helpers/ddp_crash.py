"""A test-only callback that makes one DDP process die, to test what the other processes and run.py do then.

Added from the command line of experiments/run.py (the repository root is on sys.path there):
    +callbacks.crash._target_=tests.helpers.ddp_crash.CrashRank +callbacks.crash.rank=1 +callbacks.crash.step=3
The process of global rank ``rank`` dies when it starts training step ``step`` (``stage=fit``) or predict
batch ``step`` (``stage=predict``), or while run.py builds its callbacks, before the process group exists
(``stage=start``; the rank is then read from ``LOCAL_RANK``, and ``step`` is ignored), in one of three ways (``how``):

* ``kill``: SIGKILL to itself (what the kernel's OOM killer or a lost node does: no Python clean-up at all);
* ``exit``: ``os._exit(3)`` (a hard exit with a status, no clean-up);
* ``raise``: a RuntimeError (a bug in one process: Lightning's and run.py's error handling run).

``marker`` (optional): a file written right before dying, naming the rank, step and pid (so a test knows
the crash really happened where it asked). While it exists the callback does nothing: the command that
continues the run (which repeats the run's overrides, this callback's included) runs through.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl

HOWS = ("kill", "exit", "raise")
STAGES = ("fit", "predict", "start")


class CrashRank(pl.Callback):
    """Kills / stops the process of one global rank at one step (see the module docstring).

    Args:
        rank: global rank that dies.
        step: training step (``trainer.global_step`` when the batch starts) or predict batch index.
        how: ``kill`` | ``exit`` | ``raise``.
        stage: ``fit`` | ``predict`` | ``start``.
        marker: optional file written just before dying (JSON: rank, step, pid, how); once it exists, no crash.
    """

    def __init__(self, rank: int = 1, step: int = 3, how: str = "kill", stage: str = "fit",
                 marker: Optional[str] = None):
        if how not in HOWS or stage not in STAGES:
            raise ValueError(f"CrashRank: how={how!r} (choose {HOWS}), stage={stage!r} (choose {STAGES})")
        self.rank, self.step, self.how, self.stage, self.marker = int(rank), int(step), how, stage, marker
        if stage == "start" and int(os.environ.get("LOCAL_RANK", "0")) == self.rank:
            self._die(self.step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.stage == "fit":
            self._maybe_die(trainer, trainer.global_step)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        if self.stage == "predict":
            self._maybe_die(trainer, batch_idx)

    def _maybe_die(self, trainer: pl.Trainer, step: int) -> None:
        if trainer.global_rank == self.rank and step == self.step:
            self._die(step)

    def _die(self, step: int) -> None:
        if self.marker and Path(self.marker).exists():
            return
        if self.marker:
            Path(self.marker).parent.mkdir(parents=True, exist_ok=True)
            Path(self.marker).write_text(json.dumps({"rank": self.rank, "step": step, "pid": os.getpid(),
                                                     "how": self.how}))
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.how == "exit":
            os._exit(3)
        raise RuntimeError(f"CrashRank: rank {self.rank} fails on purpose at step {step}")
