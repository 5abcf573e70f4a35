"""Periodic sample grids from the EMA generator: PNG files under ``run_dir/samples`` and logger images.

Plain torch + PIL (no torchvision): ``make_grid`` tiles a batch, ``save_grid`` writes it atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_warn

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


def save_grid(images: torch.Tensor, path, nrow: Optional[int] = None, padding: int = 2) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid (see ``make_grid``); returns the path."""
    return _save_png(grid_to_pil(make_grid(images, nrow=nrow, padding=padding)), path)


def _save_png(image: Image.Image, path) -> Path:
    path = Path(path)
    with atomic_target(path) as tmp:  # readers never see a half-written file
        image.save(tmp, format="PNG")
    return path


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
        path = _save_png(picture, run_dir / "samples" / f"step_{step:06d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=self.key, images=[picture], step=step, caption=[f"step {step}"])
        return path
