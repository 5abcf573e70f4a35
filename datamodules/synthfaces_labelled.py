"""SynthFaces with labels and part maps: batches for the attribute classifier and the face parser.

Reads a dataset written by ``datamodules.synthfaces.write_dataset`` (layout in its docstring; it is
rendered on first use like ``SynthFacesDataModule``): ``images/``, ``parts/``, ``labels.json`` and
the train / val / test indices of ``splits.json``. A batch is a dict::

    {"image":  float32 (B, 3, R, R) in [-1, 1],
     "name":   list[str] file stems (e.g. "00042"),
     "labels": float32 (B, 36) label vectors in FACTOR_NAMES order (categories as 0., 1., ...),
     "parts":  int64 (B, R, R) part classes (PART_CLASSES),      # only with with_parts=True
     "index":  int64 (B,) dataset indices}

The images are small (10k x 64 px = 120 MB), so by default each split is decoded once into memory
(``preload``); ``preload=False`` reads the PNGs in ``__getitem__`` instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.synthfaces import write_dataset
from datamodules.synthfaces.factors import FACTOR_NAMES
from datamodules.synthfaces.writer import CHUNK

SPLITS = ("train", "val", "test")


def _name_width(n: int) -> int:
    """Digits of the file names of an n-image dataset (writer convention: >= 5, zero padded)."""
    return max(5, len(str(max(n - 1, 0))))


def sample_path(root: Path, kind: str, index: int, n: int) -> Path:
    """Path of image ``index`` of an ``n``-image dataset for ``kind`` in images, parts, ood/images, ood/masks."""
    w = _name_width(n)
    return root / kind / f"{(index // CHUNK) * CHUNK:0{w}d}" / f"{index:0{w}d}.png"


def read_dataset_info(root: Path) -> Dict:
    """``{"n", "size", "labels", "splits"}`` of the dataset at ``root``; clear errors for missing files."""
    root = Path(root)
    files = {"meta": root / "synthfaces.json", "labels": root / "labels.json", "splits": root / "splits.json"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not a complete SynthFaces dataset (missing {', '.join(missing)}); "
                                f"render it with `python -m datamodules.synthfaces --out {root}` or set data.root")
    meta = json.loads(files["meta"].read_text())
    labels = json.loads(files["labels"].read_text())
    splits = json.loads(files["splits"].read_text())
    bad = [s for s in SPLITS if s not in splits]
    if bad:
        raise ValueError(f"{files['splits']} lacks split(s) {bad}")
    return {"n": int(meta["config"]["n"]), "size": int(meta["config"]["size"]), "labels": labels, "splits": splits}


def label_matrix(labels: Dict[str, Dict[str, float]], indices: Sequence[int], n: int, source: str = "labels.json") -> torch.Tensor:
    """float32 (len(indices), len(FACTOR_NAMES)) label vectors of ``indices``; raises naming ``source``
    when an image or a label is missing."""
    w = _name_width(n)
    rows = []
    for i in indices:
        entry = labels.get(f"{i:0{w}d}")
        if entry is None:
            raise KeyError(f"{source} has no entry {i:0{w}d}")
        missing = [k for k in FACTOR_NAMES if k not in entry]
        if missing:
            raise KeyError(f"{source} entry {i:0{w}d} lacks labels {missing}")
        rows.append([float(entry[k]) for k in FACTOR_NAMES])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(FACTOR_NAMES))


class SynthFacesLabelledDataset(Dataset):
    """Images, label vectors and (optionally) part maps of the given dataset indices.

    Args:
        root: dataset directory; indices: dataset indices of this split; labels: (N, 36) label vectors
            of those indices; n: dataset size (file naming); resolution: output side (images are
            resized with area averaging, part maps with nearest neighbour when it differs from the
            stored size); with_parts: also return ``parts``; flip: mirror image and part map at random
            (labels are NOT mirrored: keep it off for attribute training); preload: decode everything now.
    Items: dict with ``image`` (3, R, R) float32 in [-1, 1], ``name`` (the file stem, e.g. "00042"), ``labels`` (36,),
    ``parts`` (R, R) int64, ``index``.
    """

    def __init__(self, root: Path, indices: Sequence[int], labels: torch.Tensor, n: int, resolution: int,
                 with_parts: bool = True, flip: bool = False, preload: bool = True, image_kind: str = "images"):
        self.root, self.indices, self.labels, self.n = Path(root), list(indices), labels, int(n)
        self.resolution, self.with_parts, self.flip, self.image_kind = int(resolution), with_parts, flip, image_kind
        self.images: Optional[torch.Tensor] = None
        self.parts: Optional[torch.Tensor] = None
        if preload:
            self.images = torch.stack([self._read_image(i) for i in self.indices]) if self.indices else None
            if with_parts and self.indices:
                self.parts = torch.stack([self._read_parts(i) for i in self.indices])

    def _read_image(self, index: int) -> torch.Tensor:
        path = sample_path(self.root, self.image_kind, index, self.n)
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read SynthFaces image {path}: {err}") from None
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x[None].float(), size=(self.resolution,) * 2, mode="area" if x.shape[-1] > self.resolution
                              else "bicubic").round().clamp(0, 255).to(torch.uint8)[0]
        return x

    def _read_parts(self, index: int) -> torch.Tensor:
        path = sample_path(self.root, "parts", index, self.n)
        try:
            with Image.open(path) as im:
                if im.mode not in ("P", "L"):
                    raise ValueError(f"part maps are palette/L PNGs of class indices, this one is {im.mode}")
                arr = np.asarray(im)
        except (OSError, ValueError) as err:
            raise OSError(f"cannot read SynthFaces part map {path}: {err}") from None
        p = torch.from_numpy(arr.astype(np.uint8))
        if p.shape[-1] != self.resolution:
            p = F.interpolate(p[None, None].float(), size=(self.resolution,) * 2, mode="nearest")[0, 0].to(torch.uint8)
        return p

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Dict[str, torch.Tensor]:
        """Item ``k`` of the split (see the class docstring)."""
        index = self.indices[k]
        image = self.images[k] if self.images is not None else self._read_image(index)
        item = {"name": f"{index:0{_name_width(self.n)}d}", "labels": self.labels[k], "index": torch.tensor(index)}
        parts = None
        if self.with_parts:
            parts = self.parts[k] if self.parts is not None else self._read_parts(index)
        if self.flip and bool(torch.rand(()) < 0.5):
            image = image.flip(-1)
            parts = parts.flip(-1) if parts is not None else None
        item["image"] = image.float() / 127.5 - 1.0
        if parts is not None:
            item["parts"] = parts.long()
        return item


class SynthFacesLabelledDataModule(pl.LightningDataModule):
    """Train / val / test loaders of labelled SynthFaces batches (dict batches, see module docstring).

    Args:
        root: dataset directory (rendered there on first use with ``n_images``, ``render_size``,
            ``render_seed``, ``n_eval``, as ``SynthFacesDataModule`` does).
        resolution: image side of the batches; batch_size: per device; num_workers, pin_memory: DataLoader.
        with_parts: include part maps; flip: random mirror of training images and part maps (not labels);
        preload: decode each split into memory once; train_limit: use only the first N training
            images (quick runs, tests; None = all); seed: unused (the splits come from ``splits.json``).
    """

    def __init__(self, root: str | Path, resolution: int = 64, n_images: int = 10000, render_size: int = 64,
                 render_seed: int = 0, n_eval: int = 500, batch_size: int = 64, num_workers: int = 0,
                 pin_memory: bool = False, with_parts: bool = True, flip: bool = False, preload: bool = True,
                 train_limit: Optional[int] = None, seed: int = 0):
        super().__init__()
        if batch_size < 1 or resolution < 1 or (train_limit is not None and train_limit < 1):
            raise ValueError(f"data.batch_size, data.resolution and data.train_limit must be >= 1, got "
                             f"{batch_size}, {resolution}, {train_limit}")
        self.save_hyperparameters()
        self.hparams["root"] = str(Path(root).expanduser())
        self.dataset_root = Path(root).expanduser()
        self.render_args = dict(n=n_images, size=render_size, seed=render_seed, n_eval=n_eval)
        self.sets: Dict[str, SynthFacesLabelledDataset] = {}
        self.info: Optional[Dict] = None

    @classmethod
    def from_existing(cls, root: str | Path, **kwargs) -> "SynthFacesLabelledDataModule":
        """A DataModule over the dataset already at ``root``, its render settings read from its
        ``synthfaces.json`` (evaluation of any rendered dataset); ``kwargs`` as ``__init__``."""
        meta_path = Path(root).expanduser() / "synthfaces.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: {root} is not a rendered SynthFaces dataset")
        config = json.loads(meta_path.read_text())["config"]
        return cls(root, n_images=config["n"], render_size=config["size"], render_seed=config["seed"],
                   n_eval=config["n_eval"], **kwargs)

    def prepare_data(self) -> None:
        """Render the dataset if it is missing or incomplete."""
        write_dataset(self.dataset_root, **self.render_args, log=print)

    def _load_info(self) -> Dict:
        if self.info is None:
            if not (self.dataset_root / "splits.json").is_file():
                self.prepare_data()  # used outside a Trainer
            self.info = read_dataset_info(self.dataset_root)
            if self.info["n"] != self.render_args["n"]:
                raise ValueError(f"{self.dataset_root} holds {self.info['n']} images, data.n_images says "
                                 f"{self.render_args['n']}; point data.root at a matching dataset")
        return self.info

    def dataset(self, split: str, image_kind: str = "images") -> SynthFacesLabelledDataset:
        """The dataset of ``split`` (train, val, test); ``image_kind="ood/images"`` gives the corrupted
        twins of the test images (same labels and part maps of the clean faces)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        key = f"{split}:{image_kind}"
        if key not in self.sets:
            info, hp = self._load_info(), self.hparams
            indices = sorted(int(i) for i in info["splits"][split])
            if split == "train" and hp.train_limit is not None:
                indices = indices[:hp.train_limit]
            labels = label_matrix(info["labels"], indices, info["n"], str(self.dataset_root / "labels.json"))
            self.sets[key] = SynthFacesLabelledDataset(
                self.dataset_root, indices, labels, info["n"], hp.resolution, with_parts=hp.with_parts,
                flip=hp.flip and split == "train", preload=hp.preload, image_kind=image_kind)
        return self.sets[key]

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the splits the stage needs (fit: train + val; validate: val; test: test)."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val"))
        for split in wanted:
            ds = self.dataset(split)
            if split == "train" and len(ds) < self.hparams.batch_size:
                raise ValueError(f"data.batch_size={self.hparams.batch_size} exceeds the {len(ds)} training images")

    def _loader(self, split: str, train: bool) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.dataset(split), batch_size=hp.batch_size, shuffle=train, drop_last=train,
                          num_workers=hp.num_workers, pin_memory=hp.pin_memory, persistent_workers=hp.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (last incomplete one dropped)."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in index order."""
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (clean images) in index order."""
        return self._loader("test", False)
