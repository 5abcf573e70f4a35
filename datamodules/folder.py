"""Any folder of photos as a DataModule, optionally FFHQ-aligned first (dlib, optional extra `align`).

Without alignment this is `ImageFolderDataModule` (images are centre-cropped and resized). With
`align=True` every photo is aligned once, in `prepare_data`, into `aligned_root` (default: a sibling
folder ``<root>_aligned<size>``) as ``<relative path>.png``; photos without a detectable face are
skipped with one warning listing them (the list is kept in ``alignment.json``, so reruns neither
retry them nor redo finished ones). The loaders then read the aligned folder. See
`datamodules.face_alignment` for the alignment and the install hint when dlib is missing.
"""
from __future__ import annotations

from pathlib import Path

from datamodules.face_alignment import MANIFEST, FaceAligner, align_folder, import_dlib, resolve_predictor_path
from datamodules.image_folder import ImageFolderDataModule, ImageFolderDataset, list_images


class FolderDataModule(ImageFolderDataModule):
    """A folder of photos (any size and layout), optionally FFHQ-aligned.

    Args:
        root: folder of photos (searched recursively).
        resolution: output side.
        align: align faces the FFHQ way first (needs `pip install "invertlab[align]"`; checked at construction).
        align_size: side of the aligned images on disk (default: `resolution`).
        aligned_root: where aligned images go (default: ``<root>_aligned<align_size>`` next to `root`).
        predictor_path: dlib 68-point landmark model (default: the one of face-recognition-models).
        upsample: face detector upsampling (1 finds faces down to ~40 px; more is slower).
        masks: optional folder of ground-truth OOD masks ``<masks>/<name>.png`` (white = OOD; ``name`` as the
            image's path relative to ``root``, without extension): batches then carry ``ood_mask``.
        batch_size, num_workers, val_count, val_fraction, flip, seed, pin_memory, verify, non_square,
            allow_upscale: see `ImageFolderDataModule`.
    Batches: dicts {"image" (B, 3, R, R) in [-1, 1], "name"[, "ood_mask" (B, 1, R, R)]}; test/predict over the
    held-out images, or every image when none is held out (the usual case for inverting photos).
    """

    def __init__(self, root: str | Path, resolution: int, align: bool = False, align_size: int | None = None,
                 aligned_root: str | None = None, predictor_path: str | None = None, upsample: int = 1,
                 batch_size: int = 16, num_workers: int = 0, val_count: int | None = None,
                 val_fraction: float = 0.0, flip: bool = True, seed: int = 0, pin_memory: bool = False,
                 verify: str | bool = "header", non_square: str = "crop", allow_upscale: bool = True,
                 masks: str | None = None):
        root = str(Path(root).expanduser())  # hparams must stay plain (weights_only checkpoints)
        masks = str(Path(masks).expanduser()) if masks else None
        self.source_folder = Path(root)
        size = int(align_size or resolution)
        default = self.source_folder.parent / f"{self.source_folder.name}_aligned{size}"
        self.aligned_folder = Path(aligned_root).expanduser() if aligned_root else default
        if align:
            import_dlib()  # fail now with the install hint, not after the trainer started
            resolve_predictor_path(predictor_path)
        super().__init__(root=root, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
                         val_count=val_count, val_fraction=val_fraction, flip=flip, seed=seed,
                         pin_memory=pin_memory, verify=verify, non_square=non_square, allow_upscale=allow_upscale,
                         masks=masks)
        self.align_size = size

    @property
    def image_folder(self) -> Path:
        """The folder the loaders read: the aligned copy when `align`, else `root`."""
        return self.aligned_folder if self.hparams.align else self.source_folder

    def check_root(self) -> None:
        """Fails now if `root` holds no image."""
        list_images(self.source_folder)

    def prepare_data(self) -> None:
        """Aligns the photos into `aligned_folder` (only missing ones; nothing without `align`)."""
        if not self.hparams.align:
            return
        aligner = FaceAligner(self.hparams.predictor_path, self.hparams.upsample)
        align_folder(list_images(self.source_folder), self.source_folder, self.aligned_folder, self.align_size,
                     aligner, log=lambda msg: print(msg, flush=True))

    def make_dataset(self) -> ImageFolderDataset:
        """The (aligned) images, checked once; aligns first if that has not happened (use outside a Trainer)."""
        if self.hparams.align and not (self.aligned_folder / MANIFEST).is_file():
            self.prepare_data()
        return self.dataset_class(self.image_folder, self.hparams.resolution, flip=self.hparams.flip,
                                  **self.dataset_options())
