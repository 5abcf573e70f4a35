"""Per-image W&B tables with pictures next to the metrics: after testing, and after each validation.

The stages' ``test_step`` / ``validation_step`` return what they scored (``lightning_modules.contracts.StepPictures``)::

    {"names": [B names], "metrics": {metric: (B,)}, "pictures": {"input": (B, 3, H, W) in [-1, 1],
     "output" or "reconstruction": (B, 3, H, W), "mask": (B, 1, H, W) in [0, 1] (prediction, 1 = OOD),
     "ood_mask": (B, 1, H, W) (ground truth), "edit": (B, 3, H, W), ...},
     "edit_pictures": optional, a callable returning more pictures {column: (B, 3, H, W)}, called only for a batch
     with an image that gets pictures (stage 3: each ``model.edits`` entry at each of its strengths, "smile_-3")}

and keep every image's metrics in ``test_table`` (``lightning_modules.metrics.MetricTable``). This callback keeps
small thumbnails of at most ``pictures`` test images (``pick``: the ones with the lowest or highest ``pick_by``, or
the first ones) and, for every W&B logger on rank zero:

- after ``trainer.test``: ``test/per_image``, a ``wandb.Table`` with one row per test image: ``name``, the metric
  columns, then the picture columns ``input``, ``reconstruction``, ``mask`` (the input with W&B mask layers
  ``prediction`` and ``ground_truth``, classes ``in-domain`` / ``out-of-domain``), ``edit`` (the evaluation edit)
  and any other picture the stage returns (stage 2: ``stage1``, ``generated``, ``stage1_edit``; stage 3: the output
  edits ``smile_-3``, ``smile_+3``, ...). Rows without pictures have empty
  picture cells. ``summary["test_mean/<metric>"]`` holds each column's mean;
- after each validation (not the sanity check): ``val/per_image``, the first ``val_pictures`` validation images of
  rank zero with their metrics and pictures (the same images at every validation, so training can be followed).

Under DDP only rank zero's images can have pictures (each rank scores its own share); every rank's metrics are in
the test table. Other loggers are left alone.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from callbacks.mask_overlay import CLASS_LABELS

PICKS = ("lowest", "highest", "first")
# picture keys of the stages -> table columns (in this order; other keys follow in the stage's order)
COLUMN_NAMES = {"input": "input", "output": "reconstruction", "reconstruction": "reconstruction"}
MASK_KEYS = ("mask", "ood_mask")


def _cell(value):
    if isinstance(value, float) and math.isnan(value):
        return None  # W&B tables show missing values as empty cells
    return value


def thumbnail(image: torch.Tensor, size: Optional[int], is_mask: bool = False, threshold: float = 0.5) -> np.ndarray:
    """One picture as a small numpy array: an image (3, H, W) in [-1, 1] -> (h, w, 3) uint8, or a mask (1, H, W) in
    [0, 1] -> (h, w) uint8 of 0 / 1 (``>= threshold``). Shrunk (area) so that the longer side is at most ``size``
    (None = full size)."""
    picture = image.detach().float().cpu()
    if is_mask:
        picture = (picture >= threshold).float()
    h, w = picture.shape[-2:]
    if size and max(h, w) > size:
        scale = size / max(h, w)
        picture = F.interpolate(picture[None], size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                mode="area")[0]
    if is_mask:
        return (picture[0] >= 0.5).to(torch.uint8).numpy()
    return ((picture.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def picture_columns(keys: Sequence[str]) -> List[str]:
    """Table columns for a stage's picture keys: ``input``, ``reconstruction``, ``mask`` (when it has a predicted
    or ground-truth mask), then the other keys in order."""
    cols = [COLUMN_NAMES[k] for k in ("input", "output", "reconstruction") if k in keys]
    if any(k in keys for k in MASK_KEYS):
        cols.append("mask")
    cols += [k for k in keys if k not in COLUMN_NAMES and k not in MASK_KEYS]
    return list(dict.fromkeys(cols))


def image_thumbnails(pictures: Mapping[str, torch.Tensor], i: int, size: Optional[int],
                     threshold: float = 0.5) -> Dict[str, np.ndarray]:
    """Thumbnails of image ``i`` of a batch's pictures, keyed by the stage's picture keys (masks as 0 / 1 arrays)."""
    return {k: thumbnail(v[i], size, is_mask=k in MASK_KEYS, threshold=threshold) for k, v in pictures.items()
            if torch.is_tensor(v) and v.ndim == 4 and v.shape[1] in (1, 3)}


def wandb_cells(thumbs: Mapping[str, np.ndarray], columns: Sequence[str], caption: str = "") -> Dict[str, Any]:
    """``wandb.Image`` cells of one row: {column: image}; the ``mask`` column is the input with mask layers
    ``prediction`` / ``ground_truth`` (``CLASS_LABELS``)."""
    import wandb

    cells: Dict[str, Any] = {}
    for key, array in thumbs.items():
        if key in MASK_KEYS:
            continue
        column = COLUMN_NAMES.get(key, key)
        if column in columns:
            cells[column] = wandb.Image(array, caption=f"{caption} {column}".strip())
    if "mask" in columns and "input" in thumbs and any(k in thumbs for k in MASK_KEYS):
        layers = {}
        for key, layer in (("mask", "prediction"), ("ood_mask", "ground_truth")):
            if key in thumbs:
                layers[layer] = {"mask_data": thumbs[key], "class_labels": CLASS_LABELS}
        cells["mask"] = wandb.Image(thumbs["input"], masks=layers, caption=f"{caption} mask".strip())
    return cells


class WandbMetricTable(pl.Callback):
    """Per-image W&B tables with pictures (see the module docstring).

    Args:
        key: W&B key of the test table.
        pictures: test images with pictures (0 = numbers only); bounds the table's size on large test sets.
        thumbnail: longest side of each picture in pixels (None = full size).
        pick: which test images get pictures: ``lowest`` / ``highest`` ``pick_by`` (NaN, e.g. a failed image,
            counts as the lowest), or ``first`` (in test order).
        pick_by: the metric ``pick`` sorts by (an image without it counts as NaN).
        val_key: W&B key of the validation table.
        val_pictures: validation images in each validation table (0 = none).
        threshold: the predicted mask's threshold (mask layers are 0 / 1).
        columns: metric columns every test table has, in this order, empty where a run has no value (e.g. mask IoU
            for a method without a mask), so the runs of a comparison share one schema; the other metrics follow.
            None = the metrics found, in order.
    """

    def __init__(self, key: str = "test/per_image", pictures: int = 64, thumbnail: Optional[int] = 128,
                 pick: str = "lowest", pick_by: str = "psnr", val_key: str = "val/per_image", val_pictures: int = 8,
                 threshold: float = 0.5, columns: Optional[Sequence[str]] = None):
        super().__init__()
        if pick not in PICKS:
            raise ValueError(f"WandbMetricTable: pick={pick!r}; choose one of {', '.join(PICKS)}")
        for name, value in (("pictures", pictures), ("val_pictures", val_pictures)):
            if int(value) < 0:
                raise ValueError(f"WandbMetricTable: {name} must be >= 0, got {value!r}")
        if thumbnail is not None and int(thumbnail) < 1:
            raise ValueError(f"WandbMetricTable: thumbnail must be >= 1 pixel or null, got {thumbnail!r}")
        self.key, self.pictures, self.pick, self.pick_by = key, int(pictures), pick, pick_by
        self.thumbnail = int(thumbnail) if thumbnail is not None else None
        self.val_key, self.val_pictures, self.threshold = val_key, int(val_pictures), float(threshold)
        self.columns = [str(c) for c in columns] if columns else []
        self._test: List[dict] = []  # kept test images: {"name", "score", "order", "thumbs"}
        self._val: List[dict] = []  # validation rows: {"name", "metrics", "thumbs"}
        self._seen = 0

    # ------------------------------------------------------------------ collecting
    @staticmethod
    def _wandb_loggers(trainer: pl.Trainer) -> list:
        return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]

    def _score(self, metrics: Mapping[str, Any], i: int) -> float:
        value = metrics.get(self.pick_by)
        value = float(value[i]) if value is not None else float("nan")
        return -math.inf if math.isnan(value) else value  # NaN (a failed image) counts as the lowest

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._test, self._seen = [], 0

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if not (self.pictures and trainer.is_global_zero and isinstance(outputs, Mapping) and "pictures" in outputs
                and self._wandb_loggers(trainer)):
            return
        metrics = outputs.get("metrics") or {}
        pictures = dict(outputs["pictures"])
        edits_added = False
        for i, name in enumerate(outputs["names"]):
            order, self._seen = self._seen, self._seen + 1
            if self.pick == "first":
                if len(self._test) >= self.pictures:
                    return
                score = float(order)
            else:
                score = self._score(metrics, i) * (1 if self.pick == "lowest" else -1)
                if len(self._test) >= self.pictures and score >= self._test[-1]["score"]:
                    continue
            if not edits_added and callable(outputs.get("edit_pictures")):  # rendered once, for a batch with a row
                with torch.no_grad():
                    pictures.update(outputs["edit_pictures"]())
                edits_added = True
            self._test.append({"name": str(name), "score": score, "order": order,
                               "thumbs": image_thumbnails(pictures, i, self.thumbnail, self.threshold)})
            self._test.sort(key=lambda r: (r["score"], r["order"]))
            del self._test[self.pictures:]

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if (trainer.sanity_checking or not self.val_pictures or not trainer.is_global_zero
                or not isinstance(outputs, Mapping) or "pictures" not in outputs or not self._wandb_loggers(trainer)):
            return
        metrics = outputs.get("metrics") or {}
        for i, name in enumerate(outputs["names"]):
            if len(self._val) >= self.val_pictures:
                return
            values = {k: float(v.reshape(-1)[i]) for k, v in metrics.items() if torch.is_tensor(v) and v.numel()
                      == len(outputs["names"])}
            self._val.append({"name": str(name), "metrics": values,
                              "thumbs": image_thumbnails(outputs["pictures"], i, self.thumbnail, self.threshold)})

    # ------------------------------------------------------------------ logging
    def table(self, rows: Sequence[Mapping[str, Any]], pictures: Mapping[str, Mapping[str, np.ndarray]],
              fixed: Sequence[str] = ()):
        """Columns and data of a table: ``name``, the ``fixed`` metric columns, the other metric columns of ``rows``
        (``MetricTable`` rows), then the picture columns; ``pictures`` maps a name to its thumbnails (other rows get
        empty picture cells)."""
        metric_cols: List[str] = list(fixed)
        for row in rows:
            metric_cols += [k for k in row if k != "name" and k not in metric_cols and isinstance(row[k], (int, float))]
        keys: List[str] = []
        for thumbs in pictures.values():
            keys += [k for k in thumbs if k not in keys]
        picture_cols = [c if c not in metric_cols else f"{c}_image" for c in picture_columns(keys)]
        columns = ["name"] + metric_cols + picture_cols
        data = []
        for row in rows:
            name = str(row.get("name"))
            cells = wandb_cells(pictures[name], picture_columns(keys), caption=name) if name in pictures else {}
            renamed = {(c if c not in metric_cols else f"{c}_image"): v for c, v in cells.items()}
            data.append([name] + [_cell(row.get(c)) for c in metric_cols] + [renamed.get(c) for c in picture_cols])
        return columns, data

    # on_test_end, not on_test_epoch_end: callbacks' epoch-end hooks run before the module's, which is where the
    # stages gather the per-image rows of every DDP rank
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table = getattr(pl_module, "test_table", None)
        loggers = self._wandb_loggers(trainer)
        if table is None or not table.rows or not trainer.is_global_zero or not loggers:
            return
        columns, data = self.table(table.rows, {r["name"]: r["thumbs"] for r in self._test}, self.columns)
        for logger in loggers:
            logger.log_table(key=self.key, columns=columns, data=data, step=trainer.global_step)
            for name, value in table.mean().items():
                logger.experiment.summary[f"test_mean/{name}"] = value
        self._test = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loggers = self._wandb_loggers(trainer)
        if trainer.sanity_checking or not self._val or not trainer.is_global_zero or not loggers:
            return
        rows = [{"name": r["name"], **r["metrics"]} for r in self._val]
        columns, data = self.table(rows, {r["name"]: r["thumbs"] for r in self._val})
        for logger in loggers:
            logger.log_table(key=self.val_key, columns=columns, data=data, step=trainer.global_step)
        self._val = []
