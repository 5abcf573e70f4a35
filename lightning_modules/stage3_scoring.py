"""Stage-3 test metrics of one batch: image quality (whole, in and out of the ground-truth OOD mask), perceptual
distance, mask quality, edit success, seconds; a failed image reports NaN instead of numbers from a diverged state."""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from lightning_modules.edit_metrics import edit_scores, edited_codes
from lightning_modules.metrics import image_metrics, mask_metrics

Tensor = torch.Tensor
# the columns of the summary table (benchmark.md stacks one row per method)
SUMMARY_COLUMNS = [("psnr", "PSNR"), ("ssim", "SSIM"), ("mse", "MSE"), ("psnr_in", "PSNR in OOD"),
                   ("mse_in", "MSE in OOD"), ("psnr_out", "PSNR out"), ("mse_out", "MSE out"),
                   ("iou@0.5", "mask IoU@0.5"), ("edit_success", "edit success"),
                   ("edit_ood_psnr", "OOD PSNR under edit"), ("seconds", "s / image")]


@torch.no_grad()
def score_batch(x: Tensor, gt: Optional[Tensor], result: Mapping[str, Any], seconds: float,
                perceptual: Callable[[Tensor, Tensor], Tensor], metric_name: str, edit: Optional[Mapping[str, Any]],
                render: Callable[[Tensor], Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Per-image metrics of a method's ``result`` for inputs ``x`` (B, 3, S, S), and the rows of the test grid.

    Args:
        gt: ground-truth OOD mask (B, 1, S, S), 1 = OOD, or None.
        result: ``Method.invert`` output ("output", "codes", "ood_mask", "state").
        seconds: time per image.
        perceptual, metric_name: the refinement's LPIPS and its column name.
        edit: the evaluation edit scorer (``load_edit_scorer``) or None.
        render: edited codes (B, L, D) -> images (B, 3, S, S), as the method decodes.
    Returns:
        ({metric: (B,)}, {"input", "output", "mask", "ood_mask", "edit": (B, C, S, S)} as available).
    """
    out = result["output"]
    metrics = image_metrics(out, x, gt)
    metrics[metric_name] = perceptual(out, x)
    metrics["seconds"] = torch.full((x.shape[0],), seconds)
    state = result["state"]
    failed = state.failed.cpu() if state is not None else torch.zeros(x.shape[0], dtype=torch.bool)
    metrics["failed"] = failed.float()
    if result["ood_mask"] is not None:
        metrics["mask_mean"] = result["ood_mask"].mean(dim=(1, 2, 3))
        if gt is not None and gt.sum() > 0:
            metrics.update(mask_metrics(result["ood_mask"], gt))
    rows = {"input": x, "output": out}
    if result["ood_mask"] is not None:
        rows["mask"] = result["ood_mask"]
    if gt is not None:
        rows["ood_mask"] = gt
    if edit is not None:
        edited = render(edited_codes(edit, result["codes"]))
        metrics.update(edit_scores(edit, out, edited, x, gt))
        rows["edit"] = edited
    for key, value in metrics.items():  # a failed image reports NaN, not a number from a diverged state
        if key not in ("failed", "seconds") and value.dtype.is_floating_point:
            metrics[key] = torch.where(failed.to(value.device), torch.full_like(value, float("nan")), value)
    return metrics, rows
