"""A folder of images as a dataset / LightningDataModule: the base of the FFHQ, CelebA-HQ and SynthFaces data.

Images (png, jpg, jpeg, webp; any case) are found recursively, so flat folders and FFHQ's nested
`00000/00000.png` layout both work. Each image becomes RGB, is resized so its short side equals
`resolution` (INTER_AREA when shrinking, bicubic when enlarging), centre-cropped to a square,
optionally mirrored, and scaled to [-1, 1]: a float32 tensor of shape (3, resolution, resolution).
"""
import copy
import os
import warnings
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def list_images(root: str | Path, config_key: str = "data.root") -> list[Path]:
    """Returns the image files under `root`, recursively, sorted by relative path (hidden entries skipped).

    Raises FileNotFoundError if `root` is not a folder, ValueError if it holds no image; both name
    the folder and `config_key`, the setting that chose it.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist (set {config_key}=/path/to/images).")
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(folder) / n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(
            f"Image folder {root} contains no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images "
            f"(set {config_key}=/path/to/images)."
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:  # reads the header only
            image.size
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


class ImageFolderDataset(Dataset):
    """Images under `root` as (3, resolution, resolution) float32 tensors in [-1, 1].

    root: folder (searched recursively); resolution: output side in pixels; flip: random horizontal
    mirror (training); verify: open every file's header once and skip unreadable ones with one warning;
    files: an already checked file list (skips the scan; used for train/val views).
    Subclasses can override `load_image`, `build_transform` and `__getitem__` (e.g. to add masks/labels).
    """

    def __init__(self, root: str | Path, resolution: int, flip: bool = False, verify: bool = True, files=None):
        self.root = Path(root).expanduser()
        self.resolution = int(resolution)
        self.flip = flip
        if files is None:
            files = list_images(self.root)
            if verify:
                files = self._drop_unreadable(files)
        self.files = list(files)
        self.transform = self.build_transform()

    def _drop_unreadable(self, files: list[Path]) -> list[Path]:
        bad = [p for p in files if not _readable(p)]
        if bad:
            shown = ", ".join(p.relative_to(self.root).as_posix() for p in bad[:20])
            more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
            message = f"Skipping {len(bad)} unreadable image file(s) under {self.root}: {shown}{more}"
            warnings.warn(message, stacklevel=3)
        bad_set = set(bad)
        good = [p for p in files if p not in bad_set]
        if not good:
            raise ValueError(f"Image folder {self.root} has no readable image (set data.root=/path/to/images).")
        return good

    def build_transform(self) -> A.Compose:
        """Albumentations pipeline: short side -> resolution (INTER_AREA when shrinking), centre crop, [flip],
        values to [-1, 1], HWC uint8 -> CHW float32 tensor."""
        size = self.resolution
        return A.Compose(
            [
                A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC, area_for_downscale="image"),
                A.CenterCrop(size, size),
                *([A.HorizontalFlip(p=0.5)] if self.flip else []),
                A.Normalize(mean=0.5, std=0.5, max_pixel_value=255.0),
                ToTensorV2(),
            ]
        )

    def load_image(self, path: Path) -> np.ndarray:
        """Reads `path` as an RGB uint8 array (H, W, 3); grayscale, palette, RGBA and 16-bit images are converted."""
        with Image.open(path) as image:
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
            return np.asarray(image.convert("RGB"))

    def with_flip(self, flip: bool) -> "ImageFolderDataset":
        """Returns a copy sharing the file list, with random flipping switched on or off."""
        view = copy.copy(self)
        view.flip = flip
        view.transform = view.build_transform()
        return view

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Returns image `index` as a float32 tensor (3, resolution, resolution) in [-1, 1]."""
        image = self.load_image(self.files[index])
        # Albumentations keeps its own RNG; seeding it from torch makes augmentations follow
        # seed_everything and differ between DataLoader workers.
        self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ())))
        return self.transform(image=image)["image"]


class ImageFolderDataModule(pl.LightningDataModule):
    """Train/val loaders over an image folder, split deterministically by `seed`.

    root, resolution: see `ImageFolderDataset`; batch_size: per device (per DDP process);
    val_count: number of held-out images (wins over val_fraction); val_fraction: share held out
    when val_count is None; flip: mirror training images at random; seed: fixes the split.
    Batches are float32 tensors (B, 3, resolution, resolution) in [-1, 1]. Training drops the last
    incomplete batch. Subclasses set `dataset_class` (and may override `make_dataset`).
    """

    dataset_class = ImageFolderDataset

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        batch_size: int = 16,
        num_workers: int = 0,
        val_count: int | None = None,
        val_fraction: float = 0.0,
        flip: bool = True,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        root = str(Path(root).expanduser())  # hparams go into checkpoints: keep them weights_only-loadable
        self.save_hyperparameters()
        self.check_root()  # fail at construction, before any training machinery starts
        if (val_count is not None and val_count < 0) or not 0.0 <= val_fraction < 1.0:
            raise ValueError(
                f"data.val_count must be >= 0 and data.val_fraction in [0, 1); got {val_count}, {val_fraction}"
            )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def check_root(self) -> None:
        """Raise a clear error now if ``root`` holds no images (subclasses that create data override it)."""
        list_images(self.hparams.root)

    def make_dataset(self) -> ImageFolderDataset:
        """Builds the full dataset (training transforms); the split and the val view are made from it."""
        return self.dataset_class(self.hparams.root, self.hparams.resolution, flip=self.hparams.flip)

    def setup(self, stage: str | None = None) -> None:
        """Scans the folder once and splits it into `train_set` / `val_set` (Subsets)."""
        if self.train_set is not None:
            return
        full = self.make_dataset()
        n = len(full)
        hp = self.hparams
        n_val = hp.val_count if hp.val_count is not None else int(round(hp.val_fraction * n))
        if n_val >= n:
            raise ValueError(
                f"data.val_count/val_fraction hold out {n_val} of {n} images under {hp.root}: none left to train on."
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(hp.seed)).tolist()
        self.val_set = Subset(full.with_flip(False), sorted(order[:n_val]))
        self.train_set = Subset(full, sorted(order[n_val:]))
        if len(self.train_set) < hp.batch_size:
            raise ValueError(
                f"data.batch_size={hp.batch_size} is larger than the {len(self.train_set)} training images under "
                f"{hp.root}; lower data.batch_size."
            )

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches (B, 3, R, R), last incomplete batch dropped."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Held-out batches in a fixed order, no flipping (empty when nothing is held out)."""
        return self._loader(self.val_set, train=False)
