"""A folder of images as a dataset / LightningDataModule: the base of the FFHQ, CelebA-HQ, folder and SynthFaces data.

Images (png, jpg, jpeg, webp; any case) are found recursively, so flat folders and FFHQ's nested
`00000/00000.png` layout both work. Each image becomes RGB, is resized so its short side equals
`resolution` (INTER_AREA when shrinking, bicubic when enlarging), centre-cropped to a square,
optionally mirrored, and scaled to [-1, 1]: a float32 tensor of shape (3, resolution, resolution).

Bad input, checked once when a dataset is built (`verify`); everything worth knowing goes into ONE
warning per folder that lists the files, and anything refused into ONE `DataError` naming the files
and the config key:
- unreadable files (not an image, corrupt header, truncated: a PNG/JPEG/WebP whose end marker is
  missing is decoded in full to confirm) are skipped; none left is an error;
- grayscale, palette, CMYK, 16-bit and RGBA/LA images are converted to 8-bit RGB (alpha is dropped;
  images with an alpha channel are listed); EXIF orientation is applied;
- non-square images are centre-cropped (listed) or refused (`non_square="error"`);
- images smaller than `resolution` are upscaled (listed) or refused (`allow_upscale=False`).
A file that fails to decode later (missed by the header check) stops with a DataError naming it.

Every split yields the one batch shape of the project: a dict ``{"image": (B, 3, R, R), "name": list[str]}``, plus
``"ood_mask"`` (B, 1, R, R) when a masks folder is given (``masks``: ``<masks>/<name>.png``, white = out of domain,
given the image's crop and resize; an image without a readable mask gets an all-NaN mask: unknown).
"""
import copy
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from albumentations.pytorch import ToTensorV2
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
VERIFY_MODES = ("none", "header", "full")
NON_SQUARE_MODES = ("crop", "error")
LISTED = 20  # names shown in one warning / error before "and N more"


class DataError(ValueError):
    """Bad data on disk or a bad data setting; the message names the files and the config key to change."""


def list_images(root: str | Path, config_key: str = "data.root") -> list[Path]:
    """Returns the image files under `root`, recursively, sorted by relative path (hidden entries skipped; symlinked
    folders followed, each real folder listed once).

    Raises FileNotFoundError if `root` is not a folder, ValueError if it holds no image; both name
    the folder and `config_key`, the setting that chose it.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist (set {config_key}=/path/to/images).")
    files, seen = [], set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink back to a folder already listed (e.g. `ln -s . loop`): list it once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(folder) / n for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(
            f"Image folder {root} contains no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images "
            f"(set {config_key}=/path/to/images)."
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def describe_files(items: Sequence, root: Path | None = None, limit: int = LISTED) -> str:
    """`"a.png, sub/b.png (12x9), ... and N more"` for a list of paths or (path, note) pairs, relative to `root`."""
    shown = []
    for item in items[:limit]:
        path, note = item if isinstance(item, tuple) else (item, None)
        path = Path(path)
        if root is not None:
            try:
                path = path.relative_to(root)
            except ValueError:
                pass
        shown.append(path.as_posix() + (f" ({note})" if note else ""))
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(shown) + more


def _tail_missing(path: Path, fmt: str | None) -> bool:
    """Cheap truncation test: True if a PNG / JPEG / WebP file lacks its end marker (or is shorter than
    its header says)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        length = f.tell()
        f.seek(max(0, length - 64))
        tail = f.read()
        if fmt == "WEBP":
            f.seek(4)
            riff = int.from_bytes(f.read(4), "little")
            return riff + 8 > length
    if fmt == "PNG":
        return not tail.endswith(b"IEND\xaeB`\x82")
    if fmt in ("JPEG", "MPO"):
        # Some writers pad after the end-of-image marker; a suspicious file is decoded in full, not rejected.
        return not tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    return False


def probe_image(path: Path, full: bool = False) -> tuple[tuple[int, int] | None, str, str | None]:
    """Opens `path` (header only, unless `full` or the file looks truncated: then it is decoded).

    Returns ``(size (w, h) as stored, PIL mode, None)`` for a usable image, or ``(None, "", reason)``
    with reason "not an image", "corrupt", "truncated" or "too many pixels".
    """
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:
        return None, "", "too many pixels"
    except UnidentifiedImageError:
        return None, "", "not an image"
    except Exception:  # any other header failure (OSError, SyntaxError, struct.error, ...)
        return None, "", "corrupt"
    with image:
        size, mode = image.size, image.mode
        try:
            if full or _tail_missing(path, image.format):
                image.load()
        except Image.DecompressionBombError:
            return None, "", "too many pixels"
        except Exception as exc:  # decoder failures: OSError, SyntaxError, zlib.error, ...
            return None, "", "truncated" if "truncated" in str(exc).replace(str(path), "") else "corrupt"
    return size, mode, None


def check_images(
    files: Iterable[Path],
    root: Path,
    resolution: int,
    verify: str | bool = "header",
    non_square: str = "crop",
    allow_upscale: bool = True,
    config_prefix: str = "data",
) -> list[Path]:
    """Checks image files once; returns the usable ones in the same order.

    One warning lists the unreadable files (dropped), the images with an alpha channel, the non-square
    ones (centre-cropped) and the too small ones (upscaled); with `non_square="error"` /
    `allow_upscale=False` the latter are one `DataError` instead. No usable file left is a `DataError`.
    `verify`: "none" (trust the list), "header" (open each header; decode fully only files whose end
    marker is missing), "full" (decode every file).
    Messages name `root` and the `config_prefix.<key>` settings.
    """
    files = list(files)
    verify = _verify_mode(verify, config_prefix)
    if verify == "none":
        return files
    bad, alpha, not_square, small, good = [], [], [], [], []
    for path in files:
        size, mode, reason = probe_image(path, full=verify == "full")
        if reason is not None:
            bad.append((path, reason))
            continue
        good.append(path)
        w, h = size
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            alpha.append(path)
        if w != h:
            not_square.append((path, f"{w}x{h}"))
        if min(w, h) < resolution:
            small.append((path, f"{w}x{h}"))
    notes = []  # everything noteworthy goes into one warning
    if bad:
        notes.append(f"skipping {len(bad)} unreadable image file(s): {describe_files(bad, root)}")
    if not good:
        _warn_notes(root, notes)
        raise DataError(f"Image folder {root} has no readable image (set {config_prefix}.root=/path/to/images).")
    errors = []
    if not_square:
        listing = describe_files(not_square, root)
        if non_square == "error":
            errors.append(f"{len(not_square)} image(s) under {root} are not square: {listing}. Crop them, or set "
                          f"{config_prefix}.non_square=crop to centre-crop them.")
        else:
            notes.append(f"{len(not_square)} non-square image(s) are centre-cropped to a square "
                         f"(set {config_prefix}.non_square=error to refuse them): {listing}")
    if small:
        listing = describe_files(small, root)
        if not allow_upscale:
            errors.append(f"{len(small)} image(s) under {root} are smaller than the resolution {resolution}: "
                          f"{listing}. Remove them, lower the resolution, or set {config_prefix}.allow_upscale=true "
                          f"to upscale them.")
        else:
            notes.append(f"{len(small)} image(s) smaller than the resolution {resolution} are upscaled "
                         f"(set {config_prefix}.allow_upscale=false to refuse them): {listing}")
    if alpha:
        notes.append(f"{len(alpha)} image(s) have an alpha channel; it is dropped (transparent pixels keep their "
                     f"stored colour): {describe_files(alpha, root)}")
    _warn_notes(root, notes)
    if errors:
        raise DataError(" ".join(errors))
    return good


def _warn_notes(root: Path, notes: list[str]) -> None:
    if notes:
        warnings.warn(f"Image folder {root}: " + "; ".join(notes), stacklevel=4)


def _verify_mode(verify: str | bool, config_prefix: str = "data") -> str:
    if verify is True:
        return "header"
    if verify is False or verify is None:
        return "none"
    if verify not in VERIFY_MODES:
        raise DataError(f"{config_prefix}.verify must be one of {', '.join(VERIFY_MODES)}; got {verify!r}")
    return verify


def make_transform(resolution: int, flip: bool = False, additional_targets: dict | None = None) -> A.Compose:
    """Albumentations pipeline: short side -> resolution (INTER_AREA when shrinking, bicubic when enlarging),
    centre crop, [random horizontal flip], values to [-1, 1], HWC uint8 -> CHW float32 tensor.
    `additional_targets` (e.g. {"clean": "image", "parts": "mask"}) get the same geometry; masks are
    resized nearest-neighbour, keep their values and become (H, W) tensors."""
    size = int(resolution)
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC, area_for_downscale="image"),
            A.CenterCrop(size, size),
            *([A.HorizontalFlip(p=0.5)] if flip else []),
            A.Normalize(mean=0.5, std=0.5, max_pixel_value=255.0),
            ToTensorV2(),
        ],
        additional_targets=additional_targets,
    )


def read_rgb(path: Path) -> np.ndarray:
    """Reads `path` as an RGB uint8 array (H, W, 3): EXIF rotation applied; grayscale, palette, CMYK, RGBA
    (alpha dropped) and 16-bit images converted. Raises DataError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                # 16-bit grayscale: 65535 -> 255
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
            elif image.mode == "F":
                image = Image.fromarray((np.asarray(image, dtype=np.float64) * 255.0).clip(0, 255).astype(np.uint8))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's note on palette transparency
                return np.asarray(image.convert("RGB"))
    except Exception as exc:
        raise DataError(
            f"Cannot decode image {path} ({type(exc).__name__}: {exc}). Delete it, or set data.verify=full to find "
            f"and skip every corrupt file before training."
        ) from exc


def read_mask(masks: str | Path | None, name: str, size: tuple[int, int]) -> np.ndarray | None:
    """The OOD mask ``<masks>/<name>.png`` (white = out of domain) as a (H, W) uint8 array of 0 / 1 at ``size`` (H, W)
    (nearest resize: the mask of the image as stored, before its crop); None without ``masks`` or the file, or when
    it cannot be read (warns, naming the file: the image only loses its mask)."""
    if not masks:
        return None
    path = Path(masks).expanduser() / f"{name}.png"
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L").resize(tuple(size)[::-1], Image.NEAREST)) >= 128
    except (OSError, ValueError) as err:
        rank_zero_warn(f"masks: cannot read the ground-truth mask {path} ({type(err).__name__}: {err}); "
                       f"{name!r} has no ground-truth mask (no metrics.json in mode=invert)")
        return None
    return mask.astype(np.uint8)


class ImageFolderDataset(Dataset):
    """Images under `root` as dict items ``{"image": (3, resolution, resolution) float32 in [-1, 1], "name": str}``,
    plus ``"ood_mask"`` (1, resolution, resolution) float32 in {0, 1} (1 = out of domain) when `masks` is given.

    root: folder (searched recursively); resolution: output side in pixels; flip: random horizontal
    mirror (training); verify: "header" (default; True means the same), "full" or "none"/False, see
    `check_images`; files: an already checked file list (skips the scan and the checks; used for
    train/val views and by subclasses); non_square: "crop" or "error"; allow_upscale: upscale images
    smaller than `resolution` (else an error); masks: optional folder of OOD masks ``<masks>/<name>.png``
    (white = OOD; resized to the image, then cropped, resized and mirrored with it; an image without a readable
    mask gets an all-NaN mask, "unknown", so that every item of a batch has one).
    Subclasses can override `load_image`, `build_transform` and `__getitem__` (e.g. to add labels).
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        flip: bool = False,
        verify: str | bool = True,
        files=None,
        non_square: str = "crop",
        allow_upscale: bool = True,
        masks: str | Path | None = None,
    ):
        self.root = Path(root).expanduser()
        self.resolution = int(resolution)
        self.flip = flip
        self.masks = Path(masks).expanduser() if masks else None
        if non_square not in NON_SQUARE_MODES:
            raise DataError(f"data.non_square must be one of {', '.join(NON_SQUARE_MODES)}; got {non_square!r}")
        if self.masks is not None and not self.masks.is_dir():
            raise DataError(f"masks={masks}: no such folder (OOD masks <masks>/<name>.png, white = OOD)")
        if files is None:
            files = check_images(list_images(self.root), self.root, self.resolution, verify, non_square, allow_upscale)
        self.files = list(files)
        self.transform = self.build_transform()

    def build_transform(self) -> A.Compose:
        """`make_transform(resolution, flip)` (the mask, when there is one, gets the same geometry)."""
        return make_transform(self.resolution, self.flip, additional_targets={"ood_mask": "mask"})

    def load_image(self, path: Path) -> np.ndarray:
        """Reads `path` as an RGB uint8 array (H, W, 3); see `read_rgb`."""
        return read_rgb(path)

    def name(self, index: int) -> str:
        """Image `index`'s path relative to `root`, without extension (e.g. "00000/00042")."""
        path = self.files[index]
        try:
            path = path.relative_to(self.root)
        except ValueError:
            pass
        return path.with_suffix("").as_posix()

    def with_flip(self, flip: bool) -> "ImageFolderDataset":
        """Returns a copy sharing the file list, with random flipping switched on or off."""
        view = copy.copy(self)
        view.flip = flip
        view.transform = view.build_transform()
        return view

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        """Item `index`: {"image": (3, R, R) float32 in [-1, 1], "name": str[, "ood_mask": (1, R, R) float32]}."""
        image = self.load_image(self.files[index])
        name = self.name(index)
        # Albumentations keeps its own RNG; seeding it from torch makes augmentations follow
        # seed_everything and differ between DataLoader workers.
        self.transform.set_random_seed(int(torch.randint(0, 2**31 - 1, ())))
        if self.masks is None:
            return {"image": self.transform(image=image)["image"], "name": name}
        mask = read_mask(self.masks, name, image.shape[:2])
        out = self.transform(image=image, ood_mask=mask if mask is not None else np.zeros(image.shape[:2], np.uint8))
        ood = out["ood_mask"].float()[None]
        if mask is None:
            ood = torch.full_like(ood, float("nan"))
        return {"image": out["image"], "name": name, "ood_mask": ood}


class NamedImages(Dataset):
    """Evaluation view: the items (``{"image", "name"[, "ood_mask"]}``) of `dataset[indices]` (all when `indices` is
    None), with flipping switched off."""

    def __init__(self, dataset: ImageFolderDataset, indices: Sequence[int] | None = None):
        self.dataset = dataset.with_flip(False) if dataset.flip else dataset
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]


class ImageFolderDataModule(pl.LightningDataModule):
    """Train/val/test loaders over an image folder, split deterministically by `seed`.

    root, resolution: see `ImageFolderDataset`; batch_size: per device (per DDP process);
    val_count: number of held-out images (wins over val_fraction); val_fraction: share held out
    when val_count is None; flip: mirror training images at random; seed: fixes the split;
    verify / non_square / allow_upscale: bad-input policy, see `check_images`; masks: optional folder of OOD
    masks ``<masks>/<name>.png`` (white = OOD), see `ImageFolderDataset`.
    Every batch is a dict ``{"image": (B, 3, R, R) float32 in [-1, 1], "name": list[str]}`` plus ``"ood_mask"``
    (B, 1, R, R) with `masks` (training drops the last incomplete batch; validation never flips). Test and predict
    batches cover the held-out images (all images when nothing is held out), in a fixed order. Subclasses set
    `dataset_class` and may override `make_dataset`, `split` and `make_test_set`.
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
        verify: str | bool = "header",
        non_square: str = "crop",
        allow_upscale: bool = True,
        masks: str | None = None,
    ):
        super().__init__()
        root = str(Path(root).expanduser())  # hparams go into checkpoints: keep them weights_only-loadable
        self.save_hyperparameters()
        _verify_mode(verify)
        if non_square not in NON_SQUARE_MODES:
            raise DataError(f"data.non_square must be one of {', '.join(NON_SQUARE_MODES)}; got {non_square!r}")
        if (val_count is not None and val_count < 0) or not 0.0 <= val_fraction < 1.0:
            raise DataError(
                f"data.val_count must be >= 0 and data.val_fraction in [0, 1); got {val_count}, {val_fraction}"
            )
        if masks and not Path(masks).expanduser().is_dir():
            raise DataError(f"data.masks={masks}: no such folder (OOD masks <masks>/<name>.png, white = OOD)")
        self.check_root()  # fail at construction, before any training machinery starts
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.predict_set: Dataset | None = None
        self._full: ImageFolderDataset | None = None

    def check_root(self) -> None:
        """Raise a clear error now if ``root`` holds no images (subclasses that create data override it)."""
        list_images(self.hparams.root)

    def dataset_options(self) -> dict:
        """Bad-input policy passed to every dataset this module builds."""
        hp = self.hparams
        return dict(verify=hp.verify, non_square=hp.non_square, allow_upscale=hp.allow_upscale,
                    masks=hp.get("masks"))

    def make_dataset(self) -> ImageFolderDataset:
        """Builds the full dataset (training transforms); the split and the val view are made from it."""
        return self.dataset_class(self.hparams.root, self.hparams.resolution, flip=self.hparams.flip,
                                  **self.dataset_options())

    def full_dataset(self) -> ImageFolderDataset:
        """`make_dataset()`, built (scanned and checked) once."""
        if self._full is None:
            self._full = self.make_dataset()
        return self._full

    def held_out_count(self, n: int) -> int:
        """Number of validation images out of `n` (val_count, else round(val_fraction * n)); checks that some remain."""
        hp = self.hparams
        n_val = hp.val_count if hp.val_count is not None else int(round(hp.val_fraction * n))
        if n_val >= n:
            raise DataError(
                f"data.val_count/val_fraction hold out {n_val} of {n} images under {hp.root}: none left to train on."
            )
        return n_val

    def split(self, n: int) -> tuple[list[int], list[int]]:
        """(train indices, val indices) of `n` images: a random held-out set fixed by `seed`, both sorted."""
        n_val = self.held_out_count(n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.hparams.seed)).tolist()
        return sorted(order[n_val:]), sorted(order[:n_val])

    def setup(self, stage: str | None = None) -> None:
        """fit/validate: scans the folder once and splits it into `train_set` / `val_set` (Subsets);
        test/predict: builds `test_set` / `predict_set` (dict items). Idempotent."""
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.setup_fit()
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self.make_test_set()
            self.predict_set = self.test_set

    def setup_fit(self) -> None:
        """Builds `train_set` and `val_set` (no flipping in validation)."""
        full = self.full_dataset()
        train, val = self.split(len(full))
        self.val_set = Subset(full.with_flip(False), val)
        self.train_set = Subset(full, train)
        if len(self.train_set) < self.hparams.batch_size:
            raise DataError(
                f"data.batch_size={self.hparams.batch_size} is larger than the {len(self.train_set)} training images "
                f"under {self.hparams.root}; lower data.batch_size."
            )

    def make_test_set(self) -> Dataset:
        """Test/predict items ``{"image", "name"[, "ood_mask"]}``: the held-out images, or all when none is held out."""
        full = self.full_dataset()
        _, val = self.split(len(full))
        return NamedImages(full, val or None)

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
        """Shuffled dict batches, last incomplete batch dropped."""
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Held-out dict batches in a fixed order, no flipping (empty when nothing is held out)."""
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Fixed-order dict batches of `test_set` (built on first use if `setup("test")` was not called)."""
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        """Fixed-order dict batches of `predict_set` (the test items unless a subclass says otherwise)."""
        if self.predict_set is None:
            self.setup("predict")
        return self._loader(self.predict_set, train=False)
