"""Training and evaluation of the auxiliary SynthFaces networks (attribute classifier, face parser).

* ``AttributeClassifierModule`` trains ``networks.synthfaces_nets.AttributeClassifier`` on labelled
  batches (``datamodules.synthfaces_labelled``) and reports, on the validation split, per-label
  accuracy (categorical labels; ``acc`` = plain, ``bacc`` = class-balanced) and MAE / Pearson
  correlation (continuous labels, in ``labels.json`` units; periodic labels: MAE of the wrapped
  difference). Hand-off: ``<run_dir>/attribute_classifier.pt``.
* ``FaceParserModule`` trains ``FaceParser`` and reports per-class IoU, mIoU and pixel accuracy.
  Hand-off: ``<run_dir>/face_parser.pt``.

Both hand-off files are ``{"state_dict", "config", "meta"}`` (see ``networks.synthfaces_nets``);
``meta`` records the last validation metrics. ``python -m lightning_modules.synthfaces_aux`` evaluates
exported files on a split (default: the clean test images) and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanMetric, PearsonCorrCoef
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from labels.synthfaces import PART_CLASSES
from lightning_modules.plain import to_plain
from networks.synthfaces_nets import (AttributeClassifier, FaceParser, load_attribute_classifier, load_face_parser,
                                      save_aux_net, visibility_mask)

Tensor = torch.Tensor


class AttributeMetrics(nn.Module):
    """Per-label metrics of an ``AttributeClassifier`` (torchmetrics states; sums over updates).

    ``update(raw, labels)`` with raw outputs (B, out_dim) and label vectors (B, 36); labels hidden in
    an image (``networks.synthfaces_nets.VISIBLE_IF``) are skipped. ``compute()`` -> flat dict of floats:
    ``acc/<label>``, ``bacc/<label>`` (categorical), ``mae/<label>``, ``corr/<label>`` (continuous;
    periodic labels have no ``corr``), ``mean_acc``, ``mean_corr``.
    """

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.heads = list(classifier.heads)
        self.decode = classifier.decode
        self.acc, self.bacc, self.mae, self.corr = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        for h in self.heads:
            if h.kind == "categorical":
                self.acc[h.name] = MulticlassAccuracy(h.width, average="micro", ignore_index=-1)
                self.bacc[h.name] = MulticlassAccuracy(h.width, average="macro", ignore_index=-1)
            elif h.kind == "circular":
                self.mae[h.name] = MeanMetric()
            else:
                self.mae[h.name] = MeanAbsoluteError()
                self.corr[h.name] = PearsonCorrCoef()

    @torch.no_grad()
    def update(self, raw: Tensor, labels: Tensor) -> None:
        """Accumulate one batch (see the class docstring)."""
        pred = self.decode(raw.float())
        visible = visibility_mask(labels, self.heads)
        for k, h in enumerate(self.heads):
            keep = visible[:, k]
            target = labels[:, h.column]
            if h.kind == "categorical":
                t = torch.where(keep, target.round().long(), torch.full_like(target, -1, dtype=torch.long))
                self.acc[h.name].update(pred[h.name], t)
                self.bacc[h.name].update(pred[h.name], t)
                continue
            if int(keep.sum()) == 0:
                continue
            p, t = pred[h.name][keep].float(), target[keep].float()
            if h.kind == "circular":
                span = h.high - h.low
                diff = torch.remainder(p - t + span / 2, span) - span / 2
                self.mae[h.name].update(diff.abs())
            else:
                self.mae[h.name].update(p, t)
                self.corr[h.name].update(p, t)

    def compute(self) -> Dict[str, float]:
        """Flat dict of metric values (floats; NaN where nothing was accumulated)."""
        out: Dict[str, float] = {}
        for kind, group in (("acc", self.acc), ("bacc", self.bacc), ("mae", self.mae), ("corr", self.corr)):
            for name, metric in group.items():
                try:
                    out[f"{kind}/{name}"] = float(metric.compute())
                except (RuntimeError, ValueError):
                    out[f"{kind}/{name}"] = float("nan")
        accs = [v for k, v in out.items() if k.startswith("acc/") and not math.isnan(v)]
        corrs = [v for k, v in out.items() if k.startswith("corr/") and not math.isnan(v)]
        out["mean_acc"] = sum(accs) / len(accs) if accs else float("nan")
        out["mean_corr"] = sum(corrs) / len(corrs) if corrs else float("nan")
        return out

    def reset(self) -> None:
        """Clear the accumulated states."""
        for group in (self.acc, self.bacc, self.mae, self.corr):
            for metric in group.values():
                metric.reset()


class PartMetrics(nn.Module):
    """Per-class IoU, mIoU and pixel accuracy of part maps.

    ``update(logits_or_labels, target)``: (B, C, H, W) logits or (B, H, W) predicted classes, and
    (B, H, W) int64 targets. ``compute()`` -> ``{"iou/<class>", "miou", "pixel_acc"}`` (floats; mIoU
    averages the classes that occur in the targets or predictions).
    """

    def __init__(self, num_classes: int = len(PART_CLASSES), class_names=PART_CLASSES):
        super().__init__()
        self.class_names = list(class_names)[:num_classes]
        self.iou = MulticlassJaccardIndex(num_classes, average="none")
        self.pixel_acc = MulticlassAccuracy(num_classes, average="micro")
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool), persistent=False)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Accumulate one batch."""
        labels = pred.argmax(1) if pred.dim() == 4 else pred
        self.iou.update(labels, target)
        self.pixel_acc.update(labels, target)
        self.seen |= torch.bincount(torch.cat([labels.flatten(), target.flatten()]),
                                    minlength=len(self.seen))[:len(self.seen)] > 0

    def compute(self) -> Dict[str, float]:
        """Per-class IoU (NaN for classes never seen), mIoU over seen classes, pixel accuracy."""
        iou = self.iou.compute()
        out = {f"iou/{name}": (float(iou[k]) if bool(self.seen[k]) else float("nan"))
               for k, name in enumerate(self.class_names)}
        seen = [v for v in out.values() if not math.isnan(v)]
        out["miou"] = sum(seen) / len(seen) if seen else float("nan")
        out["pixel_acc"] = float(self.pixel_acc.compute())
        return out

    def reset(self) -> None:
        """Clear the accumulated states."""
        self.iou.reset()
        self.pixel_acc.reset()
        self.seen.zero_()


class _AuxModule(pl.LightningModule):
    """Shared optimisation (AdamW + one-cycle schedule over the run), metric logging and hand-off."""

    handoff_name = ""
    kind = ""

    def _setup_common(self, lr: float, weight_decay: float, pct_start: float) -> None:
        if not lr > 0 or weight_decay < 0 or not 0 < pct_start < 1:
            raise ValueError(f"{type(self).__name__}: need model.lr > 0, model.weight_decay >= 0 and "
                             f"0 < model.pct_start < 1; got {lr}, {weight_decay}, {pct_start}")
        self.lr, self.weight_decay, self.pct_start = float(lr), float(weight_decay), float(pct_start)
        self.last_val_metrics: Dict[str, float] = {}

    def configure_optimizers(self):
        """AdamW with a one-cycle learning-rate schedule over ``trainer.estimated_stepping_batches``."""
        decay = [p for n, p in self.net.named_parameters() if p.dim() > 1]
        rest = [p for n, p in self.net.named_parameters() if p.dim() <= 1]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=self.lr)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        if not total or not math.isfinite(total) or total < 2:
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=int(total),
                                                    pct_start=self.pct_start)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def validation_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        """Loss and metric states on a validation batch (``_eval_step`` of the subclass)."""
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Dict[str, Tensor], batch_idx: int) -> None:
        """Loss and metric states on a test batch."""
        self._eval_step(batch, self.test_metrics, "test")

    def on_validation_epoch_end(self) -> None:
        """Log and keep the validation metrics (they go into the hand-off's meta)."""
        self.last_val_metrics = self.val_metrics.compute()
        self._log_metrics("val", self.last_val_metrics)
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        """Log the test metrics."""
        self._log_metrics("test", self.test_metrics.compute())
        self.test_metrics.reset()

    def _log_metrics(self, prefix: str, metrics: Dict[str, float]) -> None:
        values = {f"{prefix}/{k}": v for k, v in metrics.items() if not math.isnan(v)}
        if values:
            self.log_dict(values, on_step=False, on_epoch=True)

    def _data_meta(self) -> Dict[str, Any]:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        hp = getattr(dm, "hparams", None)
        if not hp:
            return {}
        return {k: to_plain(hp[k]) for k in ("root", "resolution", "n_images", "render_size", "render_seed",
                                            "train_limit") if k in hp}

    def export_handoff(self, run_dir) -> Path:
        """Write ``<run_dir>/<handoff_name>`` ({"state_dict", "config", "meta"}); returns its path."""
        meta = {
            "produced_by": f"{type(self).__name__} (lightning_modules.synthfaces_aux)",
            "global_step": int(self.global_step),
            "epoch": int(self.current_epoch),
            "val_metrics": dict(self.last_val_metrics),
            "data": self._data_meta(),
            "module": to_plain(dict(self.hparams)),
            "input": "float images (B, 3, H, W) in [-1, 1]; resized to config.resolution when H, W differ",
            **self._extra_meta(),
        }
        return save_aux_net(Path(run_dir) / self.handoff_name, self.net, meta)

    def _extra_meta(self) -> Dict[str, Any]:
        return {}


class AttributeClassifierModule(_AuxModule):
    """Trains an ``AttributeClassifier`` on dict batches (``image`` (B,3,R,R) in [-1,1], ``labels`` (B,36)).

    Args:
        net: ``AttributeClassifier`` kwargs (resolution, widths, feature_dim, attributes).
        lr: peak AdamW learning rate of the one-cycle schedule; weight_decay: on weights (not BN/bias);
        pct_start: share of the run spent warming up;
        loss_weights: per-label loss multipliers (e.g. ``{"smile": 2.0}``; others 1).
    Logs ``train/loss``, ``val/loss`` and ``val/<metric>`` (see ``AttributeMetrics``); ``test/...`` in ``trainer.test``.
    """

    handoff_name = "attribute_classifier.pt"
    kind = "attribute_classifier"

    def __init__(self, net: Optional[dict] = None, lr: float = 3e-3, weight_decay: float = 1e-4,
                 pct_start: float = 0.15, loss_weights: Optional[dict] = None):
        super().__init__()
        net, loss_weights = to_plain(net or {}), to_plain(loss_weights or {})
        self.save_hyperparameters({"net": net, "lr": lr, "weight_decay": weight_decay, "pct_start": pct_start,
                                   "loss_weights": loss_weights})
        self._setup_common(lr, weight_decay, pct_start)
        try:
            self.net = AttributeClassifier(**net)
        except (TypeError, ValueError) as err:
            raise type(err)(f"AttributeClassifierModule: cannot build the classifier from model.net={net}: {err}") from None
        bad = [k for k in loss_weights if k not in self.net.head_index]
        if bad:
            raise ValueError(f"model.loss_weights names labels the classifier does not predict: {bad}")
        self.loss_weights = {k: float(v) for k, v in loss_weights.items()}
        self.val_metrics = AttributeMetrics(self.net)
        self.test_metrics = AttributeMetrics(self.net)

    def forward(self, x: Tensor) -> Tensor:
        """Raw head outputs (B, out_dim) of images (B, 3, H, W) in [-1, 1]."""
        return self.net(x)

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        """Weighted multi-head loss on one batch."""
        loss, per_head = self.net.loss(self.net(batch["image"]), batch["labels"], self.loss_weights)
        logs = {"train/loss": loss}
        for name in ("smile", "mouth_open", "glasses", "hair_style", "yaw"):
            if name in per_head:
                logs[f"train/loss_{name}"] = per_head[name]
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False, batch_size=len(batch["image"]))
        return loss

    def _eval_step(self, batch: Dict[str, Tensor], metrics: AttributeMetrics, prefix: str) -> None:
        raw = self.net(batch["image"])
        loss, _ = self.net.loss(raw, batch["labels"], self.loss_weights)
        self.log(f"{prefix}/loss", loss, on_step=False, on_epoch=True, batch_size=len(raw))
        metrics.update(raw, batch["labels"])

    def _extra_meta(self) -> Dict[str, Any]:
        heads = [{"name": h.name, "kind": h.kind, "low": h.low, "high": h.high,
                  "categories": list(h.categories) if h.categories else None} for h in self.net.heads]
        return {"labels": heads, "feature_dim": self.net.feature_dim}


class FaceParserModule(_AuxModule):
    """Trains a ``FaceParser`` on dict batches (``image`` (B,3,R,R) in [-1,1], ``parts`` (B,R,R) int64).

    Args:
        net: ``FaceParser`` kwargs (resolution, widths, num_classes).
        lr, weight_decay, pct_start: as ``AttributeClassifierModule``.
        class_weight_power: cross-entropy class weights ``freq ** -power`` (normalised to mean 1),
            with pixel frequencies counted on up to 2,000 training part maps when fit starts; 0 = plain
            CE. Small parts (mouth interior, ears: ~0.2% of pixels) are missed without it.
    Loss: pixel-wise (weighted) cross-entropy. Logs ``val/miou``, ``val/iou/<class>``, ``val/pixel_acc``.
    """

    handoff_name = "face_parser.pt"
    kind = "face_parser"

    def __init__(self, net: Optional[dict] = None, lr: float = 3e-3, weight_decay: float = 1e-4,
                 pct_start: float = 0.15, class_weight_power: float = 0.0):
        super().__init__()
        net = to_plain(net or {})
        self.save_hyperparameters({"net": net, "lr": lr, "weight_decay": weight_decay, "pct_start": pct_start,
                                   "class_weight_power": class_weight_power})
        self._setup_common(lr, weight_decay, pct_start)
        if not 0 <= class_weight_power <= 2:
            raise ValueError(f"FaceParserModule: model.class_weight_power must be in [0, 2], got {class_weight_power}")
        self.class_weight_power = float(class_weight_power)
        try:
            self.net = FaceParser(**net)
        except (TypeError, ValueError) as err:
            raise type(err)(f"FaceParserModule: cannot build the parser from model.net={net}: {err}") from None
        self.register_buffer("class_weights", torch.ones(self.net.num_classes))
        self.val_metrics = PartMetrics(self.net.num_classes)
        self.test_metrics = PartMetrics(self.net.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Part logits (B, num_classes, H, W)."""
        return self.net(x)

    def on_fit_start(self) -> None:
        """Set ``class_weights`` from the training part maps (when ``class_weight_power`` > 0)."""
        dm = getattr(self.trainer, "datamodule", None)
        if self.class_weight_power == 0 or dm is None or not hasattr(dm, "dataset"):
            return
        freq = part_frequencies(dm.dataset("train"), self.net.num_classes)
        weights = freq.clamp(min=1e-6) ** -self.class_weight_power
        self.class_weights.copy_(weights / weights.mean())

    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits, target, weight=self.class_weights.to(logits.dtype))

    def _parts(self, batch: Dict[str, Tensor]) -> Tensor:
        if "parts" not in batch:
            raise KeyError("FaceParserModule needs batches with 'parts' (set data.with_parts=true)")
        return batch["parts"]

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        """Pixel-wise cross-entropy on one batch."""
        loss = self._ce(self.net(batch["image"]), self._parts(batch))
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(batch["image"]))
        return loss

    def _eval_step(self, batch: Dict[str, Tensor], metrics: PartMetrics, prefix: str) -> None:
        logits, target = self.net(batch["image"]), self._parts(batch)
        loss = self._ce(logits, target)
        self.log(f"{prefix}/loss", loss, on_step=False, on_epoch=True, batch_size=len(logits))
        metrics.update(logits, target)

    def _extra_meta(self) -> Dict[str, Any]:
        return {"part_classes": list(PART_CLASSES[:self.net.num_classes]),
                "class_weights": [float(w) for w in self.class_weights]}


def part_frequencies(dataset, num_classes: int, limit: int = 2000) -> Tensor:
    """Pixel share (num_classes,) of each part class over the first ``limit`` part maps of a
    ``SynthFacesLabelledDataset`` (its preloaded ``parts`` when present)."""
    parts = getattr(dataset, "parts", None)
    if parts is None:
        parts = torch.stack([dataset[k]["parts"] for k in range(min(limit, len(dataset)))])
    counts = torch.bincount(parts[:limit].flatten().long(), minlength=num_classes)[:num_classes].double()
    return (counts / counts.sum().clamp(min=1)).float()


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_classifier(net: AttributeClassifier, batches: Iterable[Dict[str, Tensor]]) -> Dict[str, float]:
    """``AttributeMetrics`` of ``net`` (eval mode) over dict batches with ``image`` and ``labels``."""
    net.eval()
    metrics = AttributeMetrics(net)
    for batch in batches:
        metrics.update(net(batch["image"]), batch["labels"])
    return metrics.compute()


@torch.no_grad()
def evaluate_parser(net: FaceParser, batches: Iterable[Dict[str, Tensor]]) -> Dict[str, float]:
    """``PartMetrics`` of ``net`` (eval mode) over dict batches with ``image`` and ``parts``."""
    net.eval()
    metrics = PartMetrics(net.num_classes)
    for batch in batches:
        metrics.update(net(batch["image"]), batch["parts"])
    return metrics.compute()


def format_classifier_report(m: Mapping[str, float]) -> str:
    """Markdown tables of classifier metrics (categorical accuracy; continuous MAE / correlation)."""
    cat = sorted({k.split("/", 1)[1] for k in m if k.startswith("acc/")})
    cont = sorted({k.split("/", 1)[1] for k in m if k.startswith("mae/")})
    lines = ["| label | accuracy | balanced accuracy |", "|---|---|---|"]
    lines += [f"| {n} | {m[f'acc/{n}']:.3f} | {m[f'bacc/{n}']:.3f} |" for n in cat]
    lines += ["", "| label | MAE | Pearson r |", "|---|---|---|"]
    lines += [f"| {n} | {m[f'mae/{n}']:.4g} | {m.get(f'corr/{n}', float('nan')):.3f} |" for n in cont]
    return "\n".join(lines)


def format_parser_report(m: Mapping[str, float]) -> str:
    """Markdown table of per-class IoU plus mIoU and pixel accuracy."""
    lines = ["| class | IoU |", "|---|---|"]
    lines += [f"| {k.split('/', 1)[1]} | {v:.3f} |" for k, v in m.items() if k.startswith("iou/")]
    lines += [f"| **mIoU** | **{m['miou']:.3f}** |", f"| pixel accuracy | {m['pixel_acc']:.3f} |"]
    return "\n".join(lines)


def main(argv=None) -> Dict[str, Dict[str, float]]:
    """CLI: evaluate exported files on a SynthFaces split and print markdown tables (optionally JSON)."""
    from datamodules.synthfaces_labelled import SynthFacesLabelledDataModule

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--classifier", help="attribute_classifier.pt")
    p.add_argument("--parser", help="face_parser.pt")
    p.add_argument("--data-root", default="data/synthfaces")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--ood", action="store_true", help="use the corrupted twins (ood/images) of the test split")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--json", help="also write the metrics to this JSON file")
    args = p.parse_args(argv)
    if not (args.classifier or args.parser):
        p.error("give --classifier and/or --parser")
    if args.ood and args.split != "test":
        p.error("--ood exists for the test split only")
    results: Dict[str, Dict[str, float]] = {}
    for key, path, loader_fn, evaluate, report in (
            ("classifier", args.classifier, load_attribute_classifier, evaluate_classifier, format_classifier_report),
            ("parser", args.parser, load_face_parser, evaluate_parser, format_parser_report)):
        if not path:
            continue
        net = loader_fn(path)
        dm = SynthFacesLabelledDataModule.from_existing(args.data_root, resolution=net.resolution, batch_size=args.batch_size,
                                          with_parts=key == "parser")
        ds = dm.dataset(args.split, "ood/images" if args.ood else "images")
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size)
        results[key] = evaluate(net, loader)
        print(f"\n## {key}: {path} on {args.split}{' (OOD twins)' if args.ood else ''} ({len(ds)} images)\n")
        print(report(results[key]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
