"""CelebA-HQ DataModule with the standard test split of e4e / pSp / HFGI / DHR (2,824 images).

Three ways to say where the split is (checked in this order):

1. **Official files** (`mapping_file` + `partition_file`): CelebA-HQ's ``image_list.txt`` (columns
   ``idx orig_idx orig_file ...``; CelebAMask-HQ's ``CelebA-HQ-to-CelebA-mapping.txt`` has the same
   columns) maps each HQ index to its CelebA file, and CelebA's ``list_eval_partition.txt``
   (``000001.jpg 0``; the csv variant ``image_id,partition`` works too) gives 0 = train, 1 = val,
   2 = test per CelebA file. An HQ image belongs to the split of its CelebA file: 24,183 / 2,993 /
   2,824 images. Images in `root` are matched by the number at the end of their name (``123.jpg``,
   ``00123.png``, ``imgHQ00123.png``), in any sub-folder.
2. **Split folders**: `root` has a ``test/`` sub-folder (and ``train/``, ``val/`` when fitting).
3. **One folder**: `root` already holds the split to evaluate (e.g. the 2,824 test images); test
   and predict use all of it, fitting splits it like `ImageFolderDataModule` (`val_count`).

A split naming images that are not in `root` is an error listing them (or, with
`allow_missing=True`, one warning listing them, and they are skipped).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

from torch.utils.data import Dataset, Subset

from datamodules.image_folder import (
    DataError,
    ImageFolderDataModule,
    ImageFolderDataset,
    NamedImages,
    check_images,
    describe_files,
    list_images,
)

PARTITIONS = {"train": 0, "val": 1, "test": 2}
TEST_SIZE = 2824  # the standard test split of the full 30,000-image CelebA-HQ


def read_celebahq_mapping(path: str | Path) -> dict[int, str]:
    """HQ index -> CelebA file name from ``image_list.txt`` / ``CelebA-HQ-to-CelebA-mapping.txt``.

    A header line naming ``idx`` and ``orig_file`` selects the columns; without a header the columns
    are ``idx orig_idx orig_file``. Raises DataError naming the file and line for malformed content.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CelebA-HQ mapping file {path} does not exist (data.mapping_file).")
    rows = [(n, line.split()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not rows:
        raise DataError(f"CelebA-HQ mapping file {path} is empty (data.mapping_file).")
    idx_col, file_col = 0, 2
    if not rows[0][1][0].isdigit():
        header = rows.pop(0)[1]
        if "idx" not in header or "orig_file" not in header:
            raise DataError(f"{path} (data.mapping_file) has the header {header}; expected columns 'idx' and "
                            f"'orig_file' as in CelebA-HQ's image_list.txt")
        idx_col, file_col = header.index("idx"), header.index("orig_file")
    mapping = {}
    for n, cols in rows:
        try:
            mapping[int(cols[idx_col])] = cols[file_col]
        except (IndexError, ValueError):
            raise DataError(f"{path} line {n} (data.mapping_file) is not 'idx orig_idx orig_file': "
                            f"{' '.join(cols)!r}") from None
    return mapping


def read_celeba_partition(path: str | Path) -> dict[str, int]:
    """CelebA file name -> partition (0 train, 1 val, 2 test) from ``list_eval_partition.txt`` (or .csv)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CelebA partition file {path} does not exist (data.partition_file).")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        cols = [c for c in re.split(r"[,\s]+", line.strip()) if c]
        if not cols:
            continue
        if len(cols) == 2 and cols[1] in ("0", "1", "2"):
            out[cols[0]] = int(cols[1])
        elif not out and n == 1:
            continue  # csv header "image_id,partition"
        else:
            raise DataError(f"{path} line {n} (data.partition_file) is not '<file> <0|1|2>': {line.strip()!r}")
    if not out:
        raise DataError(f"CelebA partition file {path} lists no images (data.partition_file).")
    return out


def celebahq_splits(mapping_file: str | Path, partition_file: str | Path) -> dict[str, list[int]]:
    """{"train", "val", "test"} -> sorted HQ indices, from the mapping and partition files (see module docstring)."""
    mapping = read_celebahq_mapping(mapping_file)
    partition = read_celeba_partition(partition_file)
    unknown = sorted(i for i, f in mapping.items() if f not in partition)
    if unknown:
        raise DataError(
            f"{len(unknown)} CelebA file(s) of {mapping_file} are not in {partition_file}: "
            f"{', '.join(mapping[i] for i in unknown[:10])}; are data.mapping_file / data.partition_file the "
            f"CelebA-HQ image_list.txt and CelebA list_eval_partition.txt?"
        )
    splits = {name: [] for name in PARTITIONS}
    by_value = {v: k for k, v in PARTITIONS.items()}
    for idx in sorted(mapping):
        splits[by_value[partition[mapping[idx]]]].append(idx)
    return splits


def index_by_number(files: list[Path], root: Path) -> dict[int, Path]:
    """HQ index -> file, from the number ending each file name (``12.jpg``, ``00012.png``, ``imgHQ00012.png``).
    Files without a number are ignored; two files with one number are a DataError listing them."""
    index: dict[int, Path] = {}
    clashes = []
    for path in files:
        m = re.search(r"(\d+)$", path.stem)
        if m is None:
            continue
        i = int(m.group(1))
        if i in index:
            clashes.append(f"{index[i].relative_to(root).as_posix()} / {path.relative_to(root).as_posix()}")
        else:
            index[i] = path
    if clashes:
        raise DataError(f"{len(clashes)} CelebA-HQ index(es) have more than one image under {root} (data.root): "
                        f"{', '.join(clashes[:10])}; keep one resolution / format per index")
    return index


class CelebAHQDataModule(ImageFolderDataModule):
    """CelebA-HQ with the standard train / val / test split (module docstring).

    Args:
        root: folder of CelebA-HQ images (with the split files), or of split folders, or of one split.
        resolution: output side (CelebA-HQ is 1024 px; images are area-downscaled).
        mapping_file, partition_file: CelebA-HQ ``image_list.txt`` and CelebA ``list_eval_partition.txt``
            (both or neither).
        allow_missing: skip split images missing from `root` with one warning instead of an error.
        val_split: split that validates during fitting: "test" (as e4e / pSp do), "val" or "none".
        batch_size, num_workers, val_count, val_fraction, flip, seed, pin_memory, verify, non_square,
            allow_upscale: see `ImageFolderDataModule` (val_count / val_fraction / seed only for one folder).
    Batches: training/validation float32 (B, 3, R, R) in [-1, 1]; test/predict dicts
    {"image": (B, 3, R, R), "name": list[str]} over the test split, in index order.
    """

    def __init__(self, root: str | Path, resolution: int, mapping_file: str | None = None,
                 partition_file: str | None = None, allow_missing: bool = False, val_split: str = "test",
                 batch_size: int = 16, num_workers: int = 0, val_count: int | None = None,
                 val_fraction: float = 0.0, flip: bool = True, seed: int = 0, pin_memory: bool = False,
                 verify: str | bool = "header", non_square: str = "crop", allow_upscale: bool = True):
        root = str(Path(root).expanduser())  # hparams must stay plain (weights_only checkpoints)
        mapping_file = None if mapping_file is None else str(Path(mapping_file).expanduser())
        partition_file = None if partition_file is None else str(Path(partition_file).expanduser())
        super().__init__(root=root, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
                         val_count=val_count, val_fraction=val_fraction, flip=flip, seed=seed,
                         pin_memory=pin_memory, verify=verify, non_square=non_square, allow_upscale=allow_upscale)
        if val_split not in ("test", "val", "none"):
            raise DataError(f"data.val_split must be test, val or none; got {val_split!r}")
        if (mapping_file is None) != (partition_file is None):
            missing = "data.partition_file" if partition_file is None else "data.mapping_file"
            raise DataError(f"The CelebA-HQ split needs both data.mapping_file (CelebA-HQ image_list.txt) and "
                            f"data.partition_file (CelebA list_eval_partition.txt); {missing} is not set.")
        root = Path(self.hparams.root)
        self._checked: dict[str, tuple[Path, list[Path]]] = {}
        self.split_ids: dict[str, list[int]] | None = None
        self.index: dict[int, Path] | None = None
        if mapping_file is not None:
            self.layout = "files"
            self.split_ids = celebahq_splits(mapping_file, partition_file)
            if sum(map(len, self.split_ids.values())) == 30000 and len(self.split_ids["test"]) != TEST_SIZE:
                warnings.warn(f"The CelebA-HQ test split from {mapping_file} and {partition_file} has "
                              f"{len(self.split_ids['test'])} images, not the standard {TEST_SIZE}; check the files.",
                              stacklevel=2)
            self.index = index_by_number(list_images(root), root)
        elif (root / "test").is_dir():
            self.layout = "folders"
        else:
            self.layout = "folder"

    def split_files(self, split: str) -> tuple[Path, list[Path] | None]:
        """(folder, files) of `split` ("train", "val", "test"); files None means every image of the folder."""
        root = Path(self.hparams.root)
        if self.layout == "folders":
            folder = root / split
            if not folder.is_dir():
                raise FileNotFoundError(f"CelebA-HQ folder {root} (data.root) has test/ but no {split}/ sub-folder, "
                                        f"which this stage needs.")
            return folder, None
        ids = self.split_ids[split]
        missing = [i for i in ids if i not in self.index]
        if missing:
            listing = describe_files([str(i) for i in missing])
            if not self.hparams.allow_missing:
                raise DataError(f"The CelebA-HQ {split} split names {len(missing)} image(s) that are not under "
                                f"{root} (data.root): HQ indices {listing}. Point data.root at the full CelebA-HQ "
                                f"folder, or set data.allow_missing=true to skip them.")
            warnings.warn(f"Skipping {len(missing)} CelebA-HQ {split} image(s) missing from {root}: HQ indices "
                          f"{listing}", stacklevel=2)
        files = [self.index[i] for i in ids if i in self.index]
        if not files:
            raise DataError(f"None of the {len(ids)} CelebA-HQ {split} images is under {root} (data.root).")
        return root, files

    def split_dataset(self, split: str, flip: bool) -> ImageFolderDataset:
        """The dataset of `split`, its files checked once (a split used for validation and test warns once)."""
        if split not in self._checked:
            folder, files = self.split_files(split)
            options = {k: v for k, v in self.dataset_options().items() if k != "masks"}
            if files is None:
                files = list_images(folder)
            files = check_images(files, folder, self.hparams.resolution, **options)
            self._checked[split] = (folder, files)
        folder, files = self._checked[split]
        return self.dataset_class(folder, self.hparams.resolution, flip=flip, files=files,
                                  non_square=self.hparams.non_square)

    def setup_fit(self) -> None:
        """Training on the train split, validation on `val_split` (one folder: a random held-out part)."""
        if self.layout == "folder":
            return super().setup_fit()
        self.train_set = self.split_dataset("train", flip=self.hparams.flip)
        if self.hparams.val_split == "none":
            self.val_set = Subset(self.train_set.with_flip(False), [])
        else:
            self.val_set = self.split_dataset(self.hparams.val_split, flip=False)
        if len(self.train_set) < self.hparams.batch_size:
            raise DataError(f"data.batch_size={self.hparams.batch_size} is larger than the {len(self.train_set)} "
                            f"CelebA-HQ training images; lower data.batch_size.")

    def make_test_set(self) -> Dataset:
        """The test split (one folder: every image), as {"image", "name"} items."""
        if self.layout == "folder":
            return NamedImages(self.full_dataset())
        return NamedImages(self.split_dataset("test", flip=False))
