"""FFHQ DataModule: the aligned FFHQ images in either official layout.

Layouts (`root` may point at any of them):
- the repository root holding ``images1024x1024/00000/00000.png ...`` (and maybe ``thumbnails128x128/``,
  ``in-the-wild-images/``, ``ffhq-dataset-v2.json``): `subfolder="auto"` picks ``images1024x1024``
  (else ``thumbnails128x128``); never the unaligned in-the-wild images;
- the ``images1024x1024`` folder itself (nested ``00000/00000.png``);
- a flat folder ``00000.png ... 69999.png`` (e.g. a resized 256 px copy).
Training uses every image (70,000) by default; validation is the slice of the last `val_count`
images in name order (``69000 ... 69999`` for 1,000), which is also trained on unless
`val_in_train=False` (then it is held out). The OOD / DHR papers train on all 70k.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from datamodules.image_folder import DataError, ImageFolderDataModule, ImageFolderDataset, list_images

FFHQ_SUBFOLDERS = ("images1024x1024", "thumbnails128x128")
UNALIGNED = "in-the-wild-images"


def resolve_ffhq_folder(root: str | Path, subfolder: str | None = "auto") -> Path:
    """The folder holding FFHQ's aligned images: `root/subfolder`, or with "auto" the first of
    `FFHQ_SUBFOLDERS` under `root`, else `root` itself. Errors name `data.root` / `data.subfolder`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"FFHQ folder {root} does not exist (set data.root=/path/to/ffhq).")
    if subfolder in (None, "", "none"):
        return root
    if subfolder != "auto":
        folder = root / subfolder
        if not folder.is_dir():
            raise FileNotFoundError(f"FFHQ folder {root} has no sub-folder {subfolder!r} (data.subfolder; "
                                    f"use auto or none for {root} itself).")
        return folder
    for name in FFHQ_SUBFOLDERS:
        if (root / name).is_dir():
            return root / name
    if (root / UNALIGNED).is_dir():
        raise DataError(f"{root} holds only FFHQ's unaligned {UNALIGNED}/; point data.root at the aligned "
                        f"images ({' or '.join(FFHQ_SUBFOLDERS)}) or set data.subfolder explicitly.")
    return root


class FFHQDataModule(ImageFolderDataModule):
    """FFHQ: every image for training, a fixed slice (the last `val_count`) for validation and test.

    Args:
        root: FFHQ folder in one of the layouts of the module docstring; subfolder: "auto", "none"
            or a sub-folder name (e.g. thumbnails128x128).
        resolution: output side (images are area-downscaled, e.g. 1024 -> 256).
        val_count: size of the validation slice (wins over val_fraction); val_in_train: also train on it.
        expected_count: warn if the folder holds another number of images (70000 for full FFHQ; None: no check).
        batch_size, num_workers, flip, seed, pin_memory, verify, non_square, allow_upscale: see
            `ImageFolderDataModule` (`seed` is unused: the slice is fixed).
    Batches: training/validation float32 (B, 3, R, R) in [-1, 1]; test/predict dicts {"image", "name"}
    over the validation slice.
    """

    def __init__(self, root: str | Path, resolution: int, subfolder: str | None = "auto", batch_size: int = 16,
                 num_workers: int = 0, val_count: int | None = 1000, val_fraction: float = 0.0,
                 val_in_train: bool = True, expected_count: int | None = None, flip: bool = True, seed: int = 0,
                 pin_memory: bool = False, verify: str | bool = "header", non_square: str = "crop",
                 allow_upscale: bool = True):
        root = str(Path(root).expanduser())  # hparams must stay plain (weights_only checkpoints)
        self.image_folder = resolve_ffhq_folder(root, subfolder)
        super().__init__(root=root, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
                         val_count=val_count, val_fraction=val_fraction, flip=flip, seed=seed,
                         pin_memory=pin_memory, verify=verify, non_square=non_square, allow_upscale=allow_upscale)

    def check_root(self) -> None:
        """Fails now if the resolved image folder holds no image."""
        list_images(self.image_folder)

    def make_dataset(self) -> ImageFolderDataset:
        """All images of the resolved folder (training transforms), checked once; warns on an unexpected count."""
        ds = self.dataset_class(self.image_folder, self.hparams.resolution, flip=self.hparams.flip,
                                **self.dataset_options())
        expected = self.hparams.expected_count
        if expected is not None and len(ds) != expected:
            warnings.warn(f"FFHQ folder {self.image_folder} holds {len(ds)} usable images, not {expected} "
                          f"(a partial copy?); set data.expected_count=null to silence this.", stacklevel=2)
        return ds

    def split(self, n: int) -> tuple[list[int], list[int]]:
        """Validation: the last `val_count` indices (name order); training: all (val_in_train) or the rest."""
        n_val = self.held_out_count(n)
        val = list(range(n - n_val, n))
        train = list(range(n)) if self.hparams.val_in_train else list(range(n - n_val))
        return train, val
