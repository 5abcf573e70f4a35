"""Test-only callback: a training run that dies at a given step (as a crash or a killed job would)."""
from __future__ import annotations

import pytorch_lightning as pl


class CrashAt(pl.Callback):
    """Raise RuntimeError once ``trainer.global_step`` reaches ``step``: Lightning tears down and re-raises, and
    whatever checkpoints were saved stay on disk. Added from the command line:
    ``+callbacks.crash._target_=tests.helpers.interrupt.CrashAt +callbacks.crash.step=N``. (Not KeyboardInterrupt:
    Lightning answers that with sys.exit and ignores SIGINT afterwards, which would break an in-process test.)"""

    def __init__(self, step: int):
        super().__init__()
        self.step = int(step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"CrashAt: simulated crash at step {trainer.global_step}")
