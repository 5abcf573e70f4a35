"""Image and mask metrics with per-image values, and a table that keeps them for reports.

PSNR is the standard definition on images in [0, 1] (data range 1): 10 log10(1 / MSE). Some inversion
papers compute it on [-1, 1] images with data range 1, which reads 20 log10(2) = 6.02 dB lower, or on
[0, 255] with a rounding step (methods.md §3.5); numbers here are never shifted to match them.
SSIM is torchmetrics' (Gaussian window 11, sigma 1.5). Masked variants average the squared error and the
SSIM map inside / outside a mask.

Under DDP every process scores its share of the evaluation set; ``MetricTable.gathered`` puts the shares back
together (dataset order, each image once, the sampler's padding dropped), so tables and means equal one
process's.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

Tensor = torch.Tensor


def to_unit(x: Tensor) -> Tensor:
    """Images in [-1, 1] -> [0, 1] (clamped), float32."""
    return ((x.detach().float() + 1) / 2).clamp(0, 1)


def _psnr(mse: Tensor) -> Tensor:
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _masked_mean(values: Tensor, weight: Tensor) -> Tensor:
    """Per-image weighted mean of values (B, C, H, W) with weight (B, 1, H, W); NaN where the weight is 0."""
    total = weight.sum(dim=(1, 2, 3)) * values.shape[1]
    mean = (values * weight).sum(dim=(1, 2, 3)) / total.clamp_min(1e-12)
    return torch.where(total > 0, mean, torch.full_like(mean, float("nan")))


@torch.no_grad()
def image_metrics(pred: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Per-image metrics of pred vs target, images (B, 3, H, W) in [-1, 1] (read as [0, 1]).

    Returns (B,) tensors: "mse", "psnr" (dB), "ssim"; with ``mask`` (B, 1, H, W) (1 = inside, values
    thresholded at 0.5) also "mse_in", "psnr_in", "ssim_in", "mse_out", "psnr_out", "ssim_out" (NaN for an
    image whose region is empty).
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"image_metrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} must be "
                         f"equal (B, C, H, W) shapes")
    p, t = to_unit(pred), to_unit(target)
    err = (p - t) ** 2
    _, ssim_map = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none",
                                                      return_full_image=True)
    out = {"mse": err.mean(dim=(1, 2, 3))}
    out["psnr"] = _psnr(out["mse"])
    out["ssim"] = ssim_map.mean(dim=(1, 2, 3))
    if mask is not None:
        if mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
            raise ValueError(f"image_metrics: mask {tuple(mask.shape)} does not match images {tuple(pred.shape)}")
        inside = (mask.detach().float() > 0.5).float()
        for name, weight in (("in", inside), ("out", 1 - inside)):
            out[f"mse_{name}"] = _masked_mean(err, weight)
            out[f"psnr_{name}"] = _psnr(out[f"mse_{name}"]).where(~out[f"mse_{name}"].isnan(), out[f"mse_{name}"])
            out[f"ssim_{name}"] = _masked_mean(ssim_map, weight)
    return out


@torch.no_grad()
def mask_metrics(pred_mask: Tensor, gt_mask: Tensor, thresholds: Sequence[float] = (0.5,),
                 sweep: Sequence[float] = tuple(i / 20 for i in range(1, 20))) -> Dict[str, Tensor]:
    """Per-image agreement of a soft mask (B, 1, H, W) in [0, 1] with a binary ground truth (B, 1, H, W).

    Returns (B,) tensors "iou@t", "precision@t", "recall@t" for each threshold t in ``thresholds``, plus
    "best_iou" (the highest IoU over ``sweep``) and "best_threshold". IoU of two empty masks is 1;
    precision with no predicted pixel is 1 and recall with no true pixel is 1 (nothing missed).
    """
    if pred_mask.shape != gt_mask.shape or pred_mask.ndim != 4 or pred_mask.shape[1] != 1:
        raise ValueError(f"mask_metrics: pred_mask {tuple(pred_mask.shape)} and gt_mask {tuple(gt_mask.shape)} must "
                         f"be equal (B, 1, H, W) shapes")
    gt = gt_mask.detach().float() > 0.5
    pred = pred_mask.detach().float()

    def counts(t: float):
        hit = pred >= t
        tp = (hit & gt).sum(dim=(1, 2, 3)).float()
        fp = (hit & ~gt).sum(dim=(1, 2, 3)).float()
        fn = (~hit & gt).sum(dim=(1, 2, 3)).float()
        return tp, fp, fn

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(num))

    out: Dict[str, Tensor] = {}
    for t in thresholds:
        tp, fp, fn = counts(t)
        out[f"iou@{t:g}"] = ratio(tp, tp + fp + fn)
        out[f"precision@{t:g}"] = ratio(tp, tp + fp)
        out[f"recall@{t:g}"] = ratio(tp, tp + fn)
    ious = []
    for t in sweep:
        tp, fp, fn = counts(t)
        ious.append(ratio(tp, tp + fp + fn))
    ious = torch.stack(ious, dim=1)
    best, index = ious.max(dim=1)
    out["best_iou"] = best
    out["best_threshold"] = torch.tensor(list(sweep), dtype=best.dtype)[index]
    return out


def merge_rank_rows(shards: Sequence[Sequence[dict]], num_items: Optional[int] = None) -> List[dict]:
    """The rows of every DDP process in one list, in dataset order, each item once.

    Lightning's evaluation sampler (``DistributedSampler``, never shuffled at test / validation time) deals
    dataset index ``i`` to rank ``i % W`` in order, and pads the shares to equal length with the first items
    again. So the ``k``-th row of rank ``r`` is dataset position ``k * W + r``, and positions ``>= num_items``
    are the padding. (A ``limit_*_batches`` cut keeps the first ``k`` rows of every rank: still a prefix.)

    Args:
        shards: per rank, in rank order, the rows it produced: one per item, in the order its sampler gave them.
        num_items: dataset size; rows at positions ``>= num_items`` are dropped. None (size unknown): a row
            whose ``"name"`` was already taken is dropped instead.
    Returns:
        The merged rows (the row dicts themselves, not copies).
    """
    world = len(shards)
    merged: List[dict] = []
    seen = set()
    for k in range(max((len(s) for s in shards), default=0)):
        for r, shard in enumerate(shards):
            if k >= len(shard):
                continue
            row = shard[k]
            if num_items is not None:
                if k * world + r >= num_items:
                    continue
            elif row.get("name") in seen:
                continue
            seen.add(row.get("name"))
            merged.append(row)
    return merged


def loader_size(loaders) -> Optional[int]:
    """Number of items of the dataset behind one evaluation DataLoader (e.g. ``trainer.test_dataloaders``).

    Returns None for several loaders, no loader, or a dataset without a length (the caller then falls back to
    names, see ``merge_rank_rows``).
    """
    if isinstance(loaders, (list, tuple)):
        if len(loaders) != 1:
            return None
        loaders = loaders[0]
    try:
        return len(loaders.dataset)
    except (AttributeError, TypeError):
        return None


class MetricTable:
    """Per-image metric rows (``{"name": str, metric: float, ...}``) with NaN-aware means and CSV / JSON output."""

    def __init__(self, rows: Optional[Iterable[dict]] = None):
        self.rows: List[dict] = list(rows or [])

    def add(self, names: Sequence[str], metrics: Dict[str, Tensor]) -> None:
        """Append one row per name; ``metrics`` maps metric -> (B,) tensor (B = len(names))."""
        values = {k: v.detach().float().reshape(-1).cpu().tolist() for k, v in metrics.items()}
        for k, v in values.items():
            if len(v) != len(names):
                raise ValueError(f"MetricTable.add: metric {k!r} has {len(v)} values for {len(names)} names")
        for i, name in enumerate(names):
            self.rows.append({"name": str(name), **{k: v[i] for k, v in values.items()}})

    def merge(self, other: "MetricTable") -> "MetricTable":
        """A new table with this table's rows followed by ``other``'s."""
        return MetricTable(self.rows + other.rows)

    def gathered(self, num_items: Optional[int] = None) -> "MetricTable":
        """Every DDP process's rows in one table, on every process: dataset order, each item once.

        A collective under ``torch.distributed`` (initialised, world size > 1): call it on every rank, e.g. in
        ``on_test_epoch_end``. The rows of each rank are all-gathered and merged by ``merge_rank_rows`` (which
        needs one row per item, in the order the rank's sampler gave them). Without a process group: a copy.

        Args:
            num_items: size of the evaluated dataset (``loader_size(trainer.test_dataloaders)``); positions past
                it are the sampler's padding and are dropped. None: duplicate names are dropped instead.
        Returns:
            A new table.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return MetricTable(self.rows)
        shards: List[Optional[List[dict]]] = [None] * dist.get_world_size()
        dist.all_gather_object(shards, self.rows)
        return MetricTable(merge_rank_rows([s or [] for s in shards], num_items))

    def columns(self) -> List[str]:
        """Metric names in first-seen order (without "name")."""
        cols: List[str] = []
        for row in self.rows:
            cols += [k for k in row if k != "name" and k not in cols and isinstance(row[k], (int, float))]
        return cols

    def mean(self) -> Dict[str, float]:
        """Mean of every metric over the rows, ignoring NaN (NaN when a metric has no finite value)."""
        out = {}
        for col in self.columns():
            vals = [r[col] for r in self.rows if col in r and not math.isnan(r[col])]
            out[col] = sum(vals) / len(vals) if vals else float("nan")
        return out

    def to_csv(self, path) -> Path:
        """Write ``name`` + metric columns, one row per image; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = ["name"] + self.columns()
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=cols, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def to_json(self, path) -> Path:
        """Write ``{"mean": {...}, "rows": [...]}`` (NaN as null); returns the path."""
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"mean": {k: clean(v) for k, v in self.mean().items()},
                "rows": [{k: clean(v) for k, v in r.items()} for r in self.rows]}
        path.write_text(json.dumps(data, indent=1))
        return path


def method_comparison(means: Dict[str, float], methods: Dict[str, str], columns: Sequence[Tuple[str, str]],
                      digits: int = 4) -> str:
    """Markdown table comparing methods whose metrics share one table under different key prefixes.

    Args:
        means: {key: mean} (e.g. ``MetricTable.mean()``).
        methods: {row label: key prefix} (e.g. {"stage 1 (e4e)": "stage1_", "stage 2": ""}).
        columns: [(metric key without prefix, header)]; a column no method has is dropped, a missing cell is "–".
    Returns:
        The table as a string (header, separator, one row per method).
    """
    kept = [(k, h) for k, h in columns if any(p + k in means for p in methods.values())]
    lines = ["| method | " + " | ".join(h for _, h in kept) + " |", "|---" * (len(kept) + 1) + "|"]
    for label, prefix in methods.items():
        cells = [f"{means[prefix + k]:.{digits}g}" if prefix + k in means else "–" for k, _ in kept]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
