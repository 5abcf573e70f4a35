"""Invertibility / OOD masks drawn over their input images, after validation and after testing.

Reads the module's ``grid_batch`` (``"input"`` (N, 3, H, W) in [-1, 1], ``"mask"`` (N, 1, H, W) in [0, 1] with
1 = out of domain, optionally ``"ood_mask"``, the ground truth). Writes one PNG per epoch under
``run_dir/masks/`` (row "input", row "OOD masks": prediction in red, ground truth in green, overlap in yellow; row
labels on the left and a legend of the colours below, ``labelled_overlay``) and, for a W&B logger,
a list of ``wandb.Image`` with W&B's interactive mask overlays ("prediction" and "ground_truth" layers with
class labels), which the dashboard can toggle per class. Rank zero only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch

from callbacks.images import add_legend, grid_to_pil, label_grid, make_grid, save_png

CLASS_LABELS = {0: "in-domain", 1: "out-of-domain"}
# the legend of the overlay's colours (overlay: red = predicted, green = ground truth, yellow = both)
LEGEND = (((255, 0, 0), "predicted OOD"), ((0, 255, 0), "true OOD"), ((255, 255, 0), "both"))


def overlay(images: torch.Tensor, pred: torch.Tensor, gt: Optional[torch.Tensor] = None, threshold: float = 0.5,
            strength: float = 0.55) -> torch.Tensor:
    """Tint images (N, 3, H, W) in [-1, 1]: red where ``pred`` >= threshold, green where ``gt`` >= 0.5, yellow
    where both. Returns (N, 3, H, W) in [-1, 1]."""
    unit = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    p = (pred.detach().float().cpu() >= threshold).float()
    g = (gt.detach().float().cpu() >= 0.5).float() if gt is not None else torch.zeros_like(p)
    colour = torch.cat([p, g, torch.zeros_like(p)], 1)  # red, green; both -> yellow
    any_mask = torch.maximum(p, g)
    tinted = unit * (1 - strength * any_mask) + strength * any_mask * colour
    return tinted * 2 - 1


def labelled_overlay(images: torch.Tensor, pred: torch.Tensor, gt: Optional[torch.Tensor] = None,
                     threshold: float = 0.5):
    """The overlay picture (PIL): the inputs (N, 3, H, W) in [-1, 1] on a row labelled "input", their ``overlay``
    on a row labelled "OOD masks", and a legend below (red: predicted OOD, green: true OOD, yellow: both; only
    red without ``gt``)."""
    images = images.detach().float().cpu()
    tinted = overlay(images, pred, gt, threshold)
    picture = grid_to_pil(make_grid(torch.cat([images, tinted]), nrow=images.shape[0]))
    picture = label_grid(picture, (images.shape[-1], images.shape[-2]), rows=["input", "OOD masks"])
    return add_legend(picture, LEGEND if gt is not None else LEGEND[:1])


def _uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def wandb_mask_images(rows: Dict[str, torch.Tensor], threshold: float = 0.5) -> List:
    """``wandb.Image`` per input with mask layers "prediction" (and "ground_truth" when present)."""
    import wandb

    out = []
    for i in range(rows["input"].shape[0]):
        masks = {"prediction": {"mask_data": (rows["mask"][i, 0] >= threshold).byte().cpu().numpy(),
                                "class_labels": CLASS_LABELS}}
        if "ood_mask" in rows:
            masks["ground_truth"] = {"mask_data": (rows["ood_mask"][i, 0] >= 0.5).byte().cpu().numpy(),
                                     "class_labels": CLASS_LABELS}
        out.append(wandb.Image(_uint8(rows["input"][i]), masks=masks,
                               caption=f"mask mean {float(rows['mask'][i].mean()):.3f}"))
    return out


class MaskOverlay(pl.Callback):
    """Saves mask overlays of ``pl_module.grid_batch`` after validation (``val``) and test (``test``).

    Args: run_dir (default ``trainer.default_root_dir``), key prefix for W&B (``<stage>/masks``), threshold.
    Does nothing when the module's grid has no ``"mask"``.
    """

    def __init__(self, run_dir: Optional[str] = None, key: str = "masks", threshold: float = 0.5):
        super().__init__()
        self.run_dir, self.key, self.threshold = run_dir, key, threshold

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        rows = getattr(pl_module, "grid_batch", None)
        if not rows or "mask" not in rows or "input" not in rows or not trainer.is_global_zero:
            return
        picture = labelled_overlay(rows["input"], rows["mask"], rows.get("ood_mask"), self.threshold)
        step = trainer.global_step
        run_dir = Path(self.run_dir or trainer.default_root_dir)
        save_png(picture, run_dir / "masks" / f"{stage}_step_{step:06d}.png")
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.log({f"{stage}/{self.key}": wandb_mask_images(rows, self.threshold),
                                       "trainer/global_step": step})
