"""SynthFaces DataModule: renders the dataset on first use, then reads it like any image folder.

The dataset directory (``root``) is written by ``datamodules.synthfaces.write_dataset`` (layout in
its docstring). Training and validation use the ``train`` / ``val`` indices of ``splits.json``; the
``test`` split (whose corrupted twins hold the OOD evaluation set) is never trained on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch.utils.data import Subset

from datamodules.image_folder import ImageFolderDataModule
from datamodules.synthfaces import write_dataset


class SynthFacesDataModule(ImageFolderDataModule):
    """ImageFolderDataModule over a SynthFaces dataset that it renders when missing.

    Args:
        root: dataset directory (holds ``images/``, ``splits.json``, ...).
        n_images, render_size, render_seed, n_eval: what to render (``python -m datamodules.synthfaces``
            arguments); an existing directory rendered with other arguments is an error.
        resolution, batch_size, num_workers, flip, seed, pin_memory: as ``ImageFolderDataModule``
            (``seed`` is unused: the split comes from ``splits.json``).
    Batches: float32 (B, 3, resolution, resolution) in [-1, 1].
    """

    def __init__(self, root: str | Path, resolution: int, n_images: int = 10000, render_size: int = 64,
                 render_seed: int = 0, n_eval: int = 500, batch_size: int = 16, num_workers: int = 0,
                 flip: bool = True, seed: int = 0, pin_memory: bool = False):
        self.dataset_root = Path(root).expanduser()
        self.render_args = dict(n=n_images, size=render_size, seed=render_seed, n_eval=n_eval)
        super().__init__(root=self.dataset_root / "images", resolution=resolution, batch_size=batch_size,
                         num_workers=num_workers, flip=flip, seed=seed, pin_memory=pin_memory)
        # save_hyperparameters() in the base class records *this* __init__'s arguments
        self.hparams["root"] = str(self.dataset_root / "images")
        self.hparams["dataset_root"] = str(self.dataset_root)

    def check_root(self) -> None:
        """Nothing to check before ``prepare_data`` renders the dataset."""

    def prepare_data(self) -> None:
        """Render the dataset if it is missing or incomplete (Lightning calls this on one process per node)."""
        write_dataset(self.dataset_root, **self.render_args, log=lambda msg: print(f"[synthfaces] {msg}"))

    def setup(self, stage: Optional[str] = None) -> None:
        """Build train/val Subsets from ``splits.json``."""
        if self.train_set is not None:
            return
        splits_file = self.dataset_root / "splits.json"
        if not splits_file.is_file():
            self.prepare_data()  # used outside a Trainer
        splits = json.loads(splits_file.read_text())
        full = self.make_dataset()
        n = self.render_args["n"]
        if len(full) != n:
            raise ValueError(f"{self.dataset_root}/images holds {len(full)} images, the dataset config says "
                             f"{n}: re-render with `python -m datamodules.synthfaces --out {self.dataset_root} "
                             f"--verify` or point data.root at a fresh directory")
        self.train_set = Subset(full, sorted(splits["train"]))
        self.val_set = Subset(full.with_flip(False), sorted(splits["val"]))
