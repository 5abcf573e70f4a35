"""Optimizer steps that do not advance Lightning's ``global_step`` (manual optimisation with several optimizers)."""
from __future__ import annotations

import pytorch_lightning as pl


def uncounted_step(module: pl.LightningModule, optimizer) -> None:
    """Step ``optimizer`` (a LightningOptimizer or a torch optimizer) without counting it in ``global_step``.

    Lightning counts every ``LightningOptimizer.step`` as a training step, so a module that takes a
    discriminator or regulariser step besides its main step would advance ``global_step`` (and with it
    ``max_steps``, checkpoint intervals and schedules) several times per batch. Stepping through the
    strategy keeps AMP scaling and hooks but leaves the counter alone.
    """
    raw = getattr(optimizer, "optimizer", optimizer)
    module.trainer.strategy.optimizer_step(raw, closure=lambda: None, model=module)
