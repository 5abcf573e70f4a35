"""SynthFaces DataModule: renders the dataset on first use, then reads it like any image folder.

The dataset directory (``root``) is written by ``datamodules.synthfaces.write_dataset`` (layout in
its docstring). Training and validation use the ``train`` / ``val`` indices of ``splits.json``; the
``test`` split is never trained on. Test / predict batches come from `SynthFacesEvalDataset`: each
test image's corrupted twin (``ood/images``) with its exact OOD mask, its clean twin, part map,
labels, corruption family and severity.
"""
from __future__ import annotations

import json
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from datamodules.image_folder import DataError, ImageFolderDataModule, make_transform, read_rgb
from datamodules.synthfaces import FACTORS, write_dataset

TEST_VARIANTS = ("ood", "clean")


class SynthFacesEvalDataset(Dataset):
    """The test split of a SynthFaces dataset, for evaluating inversion and OOD masks.

    root: dataset directory; resolution: output side (images area/bicubic-resized, masks and part maps
    nearest-neighbour); variant: "ood" (the corrupted twin is the input) or "clean" (the clean image is
    the input, the mask is empty, family "clean", severity 0).
    Items (collated by the default collate into a batch of the same keys):
        image   (3, R, R) float32 in [-1, 1]: the input to invert;
        clean   (3, R, R) float32 in [-1, 1]: the clean twin (the target inside the in-domain area);
        ood_mask (1, R, R) float32 in {0, 1}: 1 where the corruption changed the image;
        parts   (R, R) int64: part class per pixel of the clean face (`datamodules.synthfaces.PART_CLASSES`);
        labels  dict factor name -> scalar tensor (int64 for categorical factors, float32 otherwise);
        family  str; severity float32 scalar; name str (e.g. "09500").
    Deterministic: no random augmentation.
    """

    def __init__(self, root: str | Path, resolution: int, variant: str = "ood"):
        if variant not in TEST_VARIANTS:
            raise DataError(f"data.test_variant must be one of {', '.join(TEST_VARIANTS)}; got {variant!r}")
        self.root = Path(root).expanduser()
        self.resolution = int(resolution)
        self.variant = variant
        meta_file, labels_file = self.root / "ood" / "meta.json", self.root / "labels.json"
        for path in (meta_file, labels_file):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: {self.root} is not a complete SynthFaces dataset "
                                        f"(re-render: python -m datamodules.synthfaces --out {self.root} --verify)")
        meta = json.loads(meta_file.read_text())
        labels = json.loads(labels_file.read_text())
        self.names = sorted(meta)
        self.meta = meta
        self.labels = {name: labels[name] for name in self.names}
        self.transform = make_transform(self.resolution, flip=False,
                                        additional_targets={"clean": "image", "ood_mask": "mask", "parts": "mask"})

    def __len__(self) -> int:
        return len(self.names)

    def _read_index(self, rel: str) -> np.ndarray:
        with Image.open(self.root / rel) as im:
            return np.asarray(im).copy()  # palette / L images: the stored values (class index, 0/255)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        entry = self.meta[name]
        clean = read_rgb(self.root / entry["clean"])
        parts = self._read_index(entry["clean"].replace("images/", "parts/", 1))
        if self.variant == "ood":
            image = read_rgb(self.root / entry["image"])
            mask = (self._read_index(entry["mask"]) > 127).astype(np.uint8)
            family, severity = entry["family"], float(entry["severity"])
        else:
            image, mask, family, severity = clean, np.zeros(clean.shape[:2], np.uint8), "clean", 0.0
        out = self.transform(image=image, clean=clean, ood_mask=mask, parts=parts)
        row = self.labels[name]
        labels = {f.name: torch.tensor(row[f.name], dtype=torch.int64 if f.kind == "int" else torch.float32)
                  for f in FACTORS if f.name in row}
        return {
            "image": out["image"],
            "clean": out["clean"],
            "ood_mask": out["ood_mask"].float()[None],
            "parts": out["parts"].long(),
            "labels": labels,
            "family": family,
            "severity": torch.tensor(severity, dtype=torch.float32),
            "name": name,
        }


class SynthFacesDataModule(ImageFolderDataModule):
    """ImageFolderDataModule over a SynthFaces dataset that it renders when missing.

    Args:
        root: dataset directory (holds ``images/``, ``splits.json``, ...).
        n_images, render_size, render_seed, n_eval: what to render (``python -m datamodules.synthfaces``
            arguments); an existing directory rendered with other arguments is an error.
        test_variant: "ood" (test/predict inputs are the corrupted twins) or "clean" (the clean test images).
        resolution, batch_size, num_workers, flip, seed, pin_memory, verify, non_square, allow_upscale: as
            ``ImageFolderDataModule`` (``seed`` is unused: the split comes from ``splits.json``).
    Batches: training/validation dicts {"image" (B, 3, R, R) in [-1, 1], "name"}; test/predict dicts
    of `SynthFacesEvalDataset` items: image, clean (B, 3, R, R), ood_mask (B, 1, R, R) float {0, 1},
    parts (B, R, R) long, labels {factor: (B,)}, family list[str], severity (B,), name list[str].
    """

    def __init__(self, root: str | Path, resolution: int, n_images: int = 10000, render_size: int = 64,
                 render_seed: int = 0, n_eval: int = 500, batch_size: int = 16, num_workers: int = 0,
                 flip: bool = True, seed: int = 0, pin_memory: bool = False, test_variant: str = "ood",
                 verify: str | bool = "header", non_square: str = "crop", allow_upscale: bool = True):
        self.dataset_root = Path(root).expanduser()
        self.render_args = dict(n=n_images, size=render_size, seed=render_seed, n_eval=n_eval)
        if test_variant not in TEST_VARIANTS:
            raise DataError(f"data.test_variant must be one of {', '.join(TEST_VARIANTS)}; got {test_variant!r}")
        super().__init__(root=self.dataset_root / "images", resolution=resolution, batch_size=batch_size,
                         num_workers=num_workers, flip=flip, seed=seed, pin_memory=pin_memory, verify=verify,
                         non_square=non_square, allow_upscale=allow_upscale)
        # save_hyperparameters() in the base class records *this* __init__'s arguments
        self.hparams["root"] = str(self.dataset_root / "images")
        self.hparams["dataset_root"] = str(self.dataset_root)

    def check_root(self) -> None:
        """Nothing to check before ``prepare_data`` renders the dataset."""

    @classmethod
    def from_existing(cls, root: str | Path, resolution: int, **kwargs) -> "SynthFacesDataModule":
        """A DataModule over an already rendered dataset, with the render arguments read from its
        ``synthfaces.json`` (so scripts work on any rendered size / count); DataError when ``root`` holds none."""
        meta_path = Path(root).expanduser() / "synthfaces.json"
        try:
            config = json.loads(meta_path.read_text())["config"]
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{meta_path}: no SynthFaces dataset there ({exc}); render one with "
                            f"`python -m datamodules.synthfaces --out {root}` or run any +exp once") from None
        return cls(root, resolution, n_images=config["n"], render_size=config["size"], render_seed=config["seed"],
                   n_eval=config["n_eval"], **kwargs)

    def prepare_data(self) -> None:
        """Render the dataset if it is missing or incomplete (Lightning calls this on one process per node)."""
        write_dataset(self.dataset_root, **self.render_args, log=lambda msg: print(f"[synthfaces] {msg}"))

    def _ensure_rendered(self) -> dict:
        splits_file = self.dataset_root / "splits.json"
        if not splits_file.is_file():
            self.prepare_data()  # used outside a Trainer
        return json.loads(splits_file.read_text())

    def setup_fit(self) -> None:
        """Build train/val Subsets from ``splits.json``."""
        splits = self._ensure_rendered()
        full = self.full_dataset()
        n = self.render_args["n"]
        if len(full) != n:
            raise DataError(f"{self.dataset_root}/images holds {len(full)} images, the dataset config says "
                            f"{n}: re-render with `python -m datamodules.synthfaces --out {self.dataset_root} "
                            f"--verify` or point data.root at a fresh directory")
        self.train_set = Subset(full, sorted(splits["train"]))
        self.val_set = Subset(full.with_flip(False), sorted(splits["val"]))

    def make_test_set(self) -> SynthFacesEvalDataset:
        """The test split with OOD masks, clean twins, parts and labels (see `SynthFacesEvalDataset`)."""
        self._ensure_rendered()
        return SynthFacesEvalDataset(self.dataset_root, self.hparams.resolution, self.hparams.test_variant)
