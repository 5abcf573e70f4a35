"""Periodic sample grids from the EMA generator: PNG files under ``run_dir/samples`` and logger images.

The image helpers (``make_grid``, ``save_grid``, ...) live in ``callbacks.images`` (re-exported here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from callbacks.images import grid_to_pil, make_grid, save_grid, save_png  # noqa: F401 (re-exported)


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` training steps, decode fixed latents with ``pl_module.<generator_attr>``.

    The latents are ``n_samples`` z ~ N(0, I) from a CPU generator seeded with ``seed``, identical in
    every call and run; noise is the generator's stored buffers (``randomize_noise=False``). On global
    rank zero the grid goes to ``run_dir/samples/step_XXXXXX.png`` and to every logger that has
    ``log_image`` (e.g. ``WandbLogger``) under ``key``. A final grid is written at the end of training.

    Args:
        every_n_steps, n_samples, seed: default to the module's ``sample_every_n_steps``, ``n_samples``
            and ``sample_seed`` attributes (StyleGAN2Module's kwargs); ``every_n_steps=0`` disables.
        run_dir: output directory; default ``trainer.default_root_dir``.
        nrow: images per grid row (default ceil(sqrt(n_samples))).
        generator_attr: module attribute holding the generator (default ``"g_ema"``).
        key: logger image key.
    """

    def __init__(self, every_n_steps: Optional[int] = None, n_samples: Optional[int] = None,
                 seed: Optional[int] = None, run_dir: Optional[str] = None, nrow: Optional[int] = None,
                 generator_attr: str = "g_ema", key: str = "samples/g_ema"):
        super().__init__()
        for name, value, low in (("every_n_steps", every_n_steps, 0), ("n_samples", n_samples, 1)):
            if value is not None and int(value) < low:
                raise ValueError(f"SampleGrid: {name} must be >= {low}, got {value!r}")
        self.every_n_steps, self.n_samples, self.seed = every_n_steps, n_samples, seed
        self.run_dir, self.nrow, self.generator_attr, self.key = run_dir, nrow, generator_attr, key
        self._last_step: Optional[int] = None

    def _setting(self, pl_module, own, attr, default):
        if own is not None:
            return int(own)
        return int(getattr(pl_module, attr, default))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        """Write a grid when ``global_step`` is a positive multiple of ``every_n_steps``."""
        every = self._setting(pl_module, self.every_n_steps, "sample_every_n_steps", 500)
        step = trainer.global_step
        if every > 0 and step > 0 and step % every == 0 and step != self._last_step:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write a final grid unless the last step already has one."""
        every = self._setting(pl_module, self.every_n_steps, "sample_every_n_steps", 500)
        if every > 0 and trainer.global_step != self._last_step:
            self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[Path]:
        """Decode the fixed latents now; on rank zero save + log the grid and return its path (else None)."""
        step = trainer.global_step
        self._last_step = step
        if not trainer.is_global_zero:
            return None
        generator = getattr(pl_module, self.generator_attr, None)
        if generator is None:
            rank_zero_warn(f"SampleGrid: {type(pl_module).__name__} has no `{self.generator_attr}`; no samples")
            return None
        n = self._setting(pl_module, self.n_samples, "n_samples", 16)
        seed = self._setting(pl_module, self.seed, "sample_seed", 0)
        z = torch.randn(n, generator.style_dim, generator=torch.Generator().manual_seed(seed))
        device = next(generator.parameters()).device
        was_training = generator.training
        generator.eval()
        images = generator([z.to(device)], randomize_noise=False)[0]
        generator.train(was_training)
        picture = grid_to_pil(make_grid(images, nrow=self.nrow))
        run_dir = Path(self.run_dir or trainer.default_root_dir)
        path = save_png(picture, run_dir / "samples" / f"step_{step:06d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=self.key, images=[picture], step=step, caption=[f"step {step}"])
        return path
