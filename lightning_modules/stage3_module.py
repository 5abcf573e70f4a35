"""Stage 3: Domain-Specific Hybrid Refinement (DHR, WACV 2024) and the baselines, as one thin LightningModule.

Nothing is trained: each batch is inverted by a per-image test-time procedure, a ``networks.refine.methods``
object chosen by ``method`` (e4e | pti | feature_only | ood_blend | dhr; built from the config by
``lightning_modules.stage3_build``), run by ``trainer.test`` (metrics against the input, in / out of the
ground-truth OOD mask, edits) or ``trainer.predict`` (``mode=invert``: per-image files through
``lightning_modules.inversion_writer``). Gradients are switched on inside the steps, whatever the trainer's
inference mode. Segmentation (``segmentation.source``, DHR): see ``networks.refine.segmenter.DomainSegmenter``.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch

from lightning_modules.edit_metrics import edit_scores, edited_codes, load_edit_scorer
from lightning_modules.inversion_writer import InversionWriter, failure_reason, ground_truth_metrics
from lightning_modules.metrics import MetricTable, image_metrics, loader_size, mask_metrics, method_comparison
from lightning_modules.perceptual import LPIPSLoss
from lightning_modules.stage1_handoff import FrozenStage1
from lightning_modules.stage1_module import batch_images
from lightning_modules.stage3_build import (SEGMENTATION_DEFAULTS, build_method, build_segmenter,  # noqa: F401
                                            check_segmentation, grid_align_net, load_align_net, needs_align_net,
                                            needs_error_map, segmentation_settings)
from lightning_modules.stage3_edits import GRID_LABELS, edit_grid, grid_edits, grid_strengths  # noqa: F401
from lightning_modules.stage3_edits import edited_codes as output_edits
from lightning_modules.stage3_edits import load_output_edit
from networks.refine.hybrid import WEIGHT_FORMATS, RefineState, state_for_image

Tensor = torch.Tensor
METHODS = ("e4e", "pti", "feature_only", "ood_blend", "dhr")
SUMMARY_COLUMNS = [("psnr", "PSNR"), ("ssim", "SSIM"), ("mse", "MSE"), ("psnr_in", "PSNR in OOD"),
                   ("mse_in", "MSE in OOD"), ("psnr_out", "PSNR out"), ("mse_out", "MSE out"),
                   ("iou@0.5", "mask IoU@0.5"), ("edit_success", "edit success"),
                   ("edit_ood_psnr", "OOD PSNR under edit"), ("seconds", "s / image")]


class RefineModule(FrozenStage1, pl.LightningModule):
    """Per-image inversion + refinement of stage 3 (see the module docstring).

    Args:
        encoder_checkpoint: stage-1 hand-off (e4e layout: encoder, generator, latent_avg).
        method: one of ``METHODS``.
        align_mask_checkpoint: stage-2 hand-off ``align_mask.pt``; required by ``ood_blend`` and by the
            ``align_mask`` / ``both`` segmentation sources. Its generator must be the one in the stage-1 file.
        refine: ``RefineConfig`` kwargs of DHR (official: weights 50 steps at 1.5e-3, feature 100 at 9e-2).
        pti: {steps, lr} of ``networks.refine.methods.PTI`` (official PTI: 350 steps, 3e-4).
        feature_only: {steps, lr} of ``FeatureOnly`` (default: DHR's feature settings).
        segmentation: see ``SEGMENTATION_DEFAULTS`` (its ``lpips``: the DSS net's ``LPIPSLoss`` kwargs, official VGG).
        lpips: ``LPIPSLoss`` kwargs (refinement losses and metric; official AlexNet).
        edit: evaluation edit {direction, strength, attribute, classifier} as in stage 2 (null = none).
        edits: ``mode=invert`` edits written per image (``lightning_modules.stage3_edits.load_output_edit``).
        output_dir: where ``trainer.predict`` writes per-image results (``InversionWriter``); reruns skip them.
        masks_dir: optional ground-truth OOD masks for ``mode=invert`` (``<masks_dir>/<name>.png``, white = OOD).
        save_weights: tuned weights in each ``refine_state.pt``: delta_bf16 (default) | full | none.
        n_grid: images in the grid of the first test batch.
        seed: seed of the coarse projection (image b of a batch uses seed + b).
    """

    def __init__(self, encoder_checkpoint: str, method: str = "dhr", align_mask_checkpoint: Optional[str] = None,
                 refine: Optional[dict] = None, pti: Optional[dict] = None, feature_only: Optional[dict] = None,
                 segmentation: Optional[dict] = None, lpips: Optional[dict] = None, edit: Optional[dict] = None,
                 edits: Optional[list] = None, output_dir: Optional[str] = None, masks_dir: Optional[str] = None,
                 save_weights: str = "delta_bf16", n_grid: int = 8, seed: int = 0):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"model.method={method!r} is not a stage-3 method; choose one of {', '.join(METHODS)}")
        self.save_hyperparameters()
        self.method = method
        self.load_stage1(encoder_checkpoint)
        self.segmentation = seg = segmentation_settings(segmentation)
        G, ckpt = self.generator, self.encoder_checkpoint
        self.align_net = load_align_net(align_mask_checkpoint, G, ckpt, f"model.method={method} with model.segmentation"
                                        f".source={seg['source']}") if needs_align_net(method, seg) else \
            grid_align_net(align_mask_checkpoint, G, ckpt)
        self.lpips = LPIPSLoss(**(lpips or {}))
        segmenter = None
        self.parser, self.class_ids, self.segmentation_lpips = None, {}, None
        if method == "dhr":
            segmenter, self.segmentation_lpips, self.parser, self.class_ids = build_segmenter(
                seg, G, self.latent_avg, self.lpips, self.align_net, seed, needs_error_map(method, seg))
        self.refiner = build_method(method, G, self.lpips, refine, pti, feature_only, self.align_net, segmenter)
        self.edit = load_edit_scorer(edit or {}, G.style_dim)  # a plain dict: the scorer stays out of checkpoints
        self.edits = [load_output_edit(dict(e), G.style_dim) for e in (edits or [])]
        if save_weights not in WEIGHT_FORMATS:
            raise ValueError(f"model.save_weights={save_weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        self.writer = InversionWriter(output_dir, self.result_settings()) if output_dir else None
        self.test_table = MetricTable()
        self.grid_batch: Optional[Dict[str, Tensor]] = None
        # set by callbacks.edit_grid.EditGrid ({"strengths", "n_columns", "n"}); the grid of test batch 0 lands in
        # edit_grid_batch (see edit_grid); no request, no grid (no cost)
        self.edit_grid_request: Optional[Dict[str, Any]] = None
        self.edit_grid_batch: Optional[Dict[str, Dict[str, Any]]] = None

    def result_settings(self) -> Dict[str, Any]:
        """What defines a ``mode=invert`` result (stored in each record; a rerun with other settings is refused):
        every constructor argument but where files go and the evaluation-only ones, plus the resolved refinement."""
        ignored = ("output_dir", "masks_dir", "n_grid", "edit")
        return {**{f"model.{k}": v for k, v in self.hparams.items() if k not in ignored}, **self.refiner.settings()}

    @property
    def refine_config(self):
        """The resolved ``RefineConfig`` of a refining method (None for e4e / ood_blend); settable."""
        return getattr(self.refiner, "config", None)

    @refine_config.setter
    def refine_config(self, config) -> None:
        self.refiner.config = config

    # ------------------------------------------------------------------ the method's two calls
    def segment(self, images: Tensor, codes: Tensor, taps: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """DHR's domain segmentation of images (B, 3, S, S) (``DomainSegmenter``)."""
        return self.refiner.segmenter(images, codes, taps)

    def invert(self, images: Tensor) -> Dict[str, Any]:
        """Invert (and refine) images (B, 3, S, S) in [-1, 1] with ``method``; needs autograd enabled. Returns
        {"output" (B, 3, S, S), "codes" (B, L, D), "taps", "ood_mask" (B, 1, S, S) 1 = OOD or None, "state"
        RefineState or None, "segmentation" dict}."""
        codes, taps = self.encode(images)
        return self.refiner.invert(images, codes, taps)

    def render_edit(self, result: Mapping[str, Any], images: Tensor, edited: Tensor) -> Tensor:
        """Decode edited codes (B, L, D) the way ``method`` decodes (``Method.render``)."""
        return self.refiner.render(result, images, edited)

    def edited_codes(self, codes: Tensor) -> Dict[str, Tensor]:
        """Every configured output edit of codes (B, L, D): {"<edit>_<strength>": (B, L, D)}."""
        return output_edits(self.edits, codes)

    def edit_grid(self, images: Tensor, result: Mapping[str, Any], strengths: Optional[Sequence[float]] = None,
                  n_columns: int = 5) -> Dict[str, Dict[str, Any]]:
        """The dashboard's edit grid of images (B, 3, S, S) (``stage3_edits.edit_grid``): rows ``e4e (stage 1)``,
        ``ood_blend (stage 2)`` when the module holds a stage-2 net, and the module's own method."""
        codes, G = result["codes"], self.generator
        renderers = {GRID_LABELS["e4e"]: lambda c: G.synthesize(c).image}
        if self.align_net is not None and self.method != "ood_blend":  # ood_blend: its own row
            renderers[GRID_LABELS["ood_blend"]] = \
                lambda c: self.align_net(G, c, result["taps"], images, cue_codes=codes).output
        if self.method != "e4e":
            renderers[GRID_LABELS[self.method]] = lambda c: self.render_edit(result, images, c)
        return edit_grid(images, codes, renderers, grid_edits(self.edits, self.edit), strengths, n_columns)

    def summary_markdown(self) -> str:
        """One-row Markdown table of the test means (the benchmark stacks the rows of all methods)."""
        means = self.test_table.mean()
        return method_comparison(means, {self.method: ""}, SUMMARY_COLUMNS) if means else ""

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self):
        return None  # per-image optimisers live inside networks.refine

    def on_test_epoch_start(self) -> None:
        self.test_table = MetricTable()

    def test_step(self, batch, batch_idx: int) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            x = batch_images(batch).clone()
            gt = batch.get("ood_mask") if isinstance(batch, Mapping) else None
            gt = gt.clone() if gt is not None else None
            start = time.perf_counter()
            result = self.invert(x)
            seconds = (time.perf_counter() - start) / x.shape[0]
            self._score(batch, batch_idx, x, gt, result, seconds)

    def on_test_epoch_end(self) -> None:
        # every rank's rows (DDP), so test_table, the summary and the logged means equal one process's
        self.test_table = self.test_table.gathered(loader_size(self.trainer.test_dataloaders))
        means = self.test_table.mean()
        self.log_dict({f"test/{k}": float(v) for k, v in means.items()}, sync_dist=True)

    def predict_step(self, batch, batch_idx: int) -> None:
        """``mode=invert``: invert, refine and edit the unfinished images of the batch; write their folders."""
        if self.writer is None:
            raise ValueError("RefineModule.predict_step needs model.output_dir (run.py sets it from output=DIR)")
        names = list(batch["name"])
        todo = [i for i, n in enumerate(names) if not self.writer.is_done(n)]
        if not todo:
            return
        with torch.inference_mode(False), torch.enable_grad():
            x = batch["image"][todo].clone()
            finite = torch.isfinite(x).flatten(1).all(1)
            for i in torch.nonzero(~finite).flatten().tolist():
                self.writer.write(names[todo[i]], {}, {}, x.new_zeros(0), None, status="failed",
                                  reason="the image holds NaN or inf values", extra={"method": self.method})
            keep = [todo[i] for i in torch.nonzero(finite).flatten().tolist()]
            if not keep:
                return
            x = x[finite]
            start = time.perf_counter()
            result = self.invert(x)
            seconds = (time.perf_counter() - start) / x.shape[0]
            edits = {k: self.render_edit(result, x, c) for k, c in self.edited_codes(result["codes"]).items()}
        state: Optional[RefineState] = result["state"]
        for j, i in enumerate(keep):
            name = names[i]
            failed = bool(state is not None and state.failed[j])
            images = {"input": x[j], "reconstruction": result["output"][j]}
            if result["ood_mask"] is not None:
                images["ood_mask"] = result["ood_mask"][j]
            extra = {"method": self.method, "seconds": seconds, "encoder_checkpoint": self.encoder_checkpoint}
            if failed:
                self.writer.write(name, {}, {}, result["codes"][j], None, status="failed", extra=extra,
                                  reason=failure_reason(state, j))
                continue
            ood = result["ood_mask"][j:j + 1] if result["ood_mask"] is not None else None
            metrics = ground_truth_metrics(self.hparams.masks_dir, name, x[j:j + 1], result["output"][j:j + 1], ood)
            saved = None
            if state is not None:
                saved = state_for_image(state, j, self.generator, weights=self.hparams.save_weights)
                saved["codes"] = result["codes"][j].detach().cpu().clone()
            try:
                self.writer.write(name, images, {k: v[j] for k, v in edits.items()}, result["codes"][j], saved,
                                  metrics=metrics, extra=extra)
            except OSError as err:  # disk full, permissions: stop; finished images stay finished
                raise OSError(f"could not write the results of {name!r} under {self.writer.out_dir} ({err}); the "
                              f"{len(self.writer.records())} finished image(s) are kept; fix the problem and rerun "
                              f"with the same output=... to complete the rest") from err

    def teardown(self, stage: str) -> None:
        """End of ``trainer.predict`` (``mode=invert``), on every rank: wait until every rank's folders are written
        (DDP: each image went to one rank), then rank zero writes the manifest. Not ``on_predict_epoch_end``:
        Lightning skips that hook on a rank whose predict loop has no batch, and the barrier would wait forever."""
        if stage != "predict" or self.writer is None:
            return
        self.trainer.strategy.barrier("inversion_manifest")
        if self.trainer.is_global_zero:
            self.writer.write_manifest()

    # ------------------------------------------------------------------ internals
    @torch.no_grad()
    def _score(self, batch, batch_idx: int, x: Tensor, gt: Optional[Tensor], result: Mapping[str, Any],
               seconds: float) -> None:
        out = result["output"]
        names = list(batch["name"]) if isinstance(batch, Mapping) and "name" in batch else \
            [f"{batch_idx}_{i}" for i in range(x.shape[0])]
        metrics = image_metrics(out, x, gt)
        metrics[self.lpips.metric_name] = self.lpips(out, x)
        metrics["seconds"] = torch.full((x.shape[0],), seconds)
        state: Optional[RefineState] = result["state"]
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
        if self.edit is not None:
            edited = self.render_edit(result, x, edited_codes(self.edit, result["codes"]))
            metrics.update(edit_scores(self.edit, out, edited, x, gt))
            rows["edit"] = edited
        for key, value in metrics.items():  # a failed image reports NaN, not a number from a diverged state
            if key not in ("failed", "seconds") and value.dtype.is_floating_point:
                metrics[key] = torch.where(failed.to(value.device), torch.full_like(value, float("nan")), value)
        self.test_table.add(names, metrics)
        if batch_idx == 0:
            n = self.hparams.n_grid
            self.grid_batch = {k: v[:n].detach() for k, v in rows.items()}
            request = self.edit_grid_request
            if request is not None and self.global_rank == 0:  # the grid is only logged by rank zero
                m = int(request.get("n") or n)
                grids = self.edit_grid(x, result, request.get("strengths"), int(request.get("n_columns", 5)))
                self.edit_grid_batch = {name: {"strengths": g["strengths"],
                                               "rows": {k: v[:, :m] for k, v in g["rows"].items()}}
                                        for name, g in grids.items()}
