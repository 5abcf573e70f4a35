"""Stage 3: Domain-Specific Hybrid Refinement (DHR, WACV 2024) and the baselines, as one thin LightningModule.

Nothing is trained: a ``networks.refine.methods`` object chosen by ``method`` (built by ``stage3_build``) inverts each
batch by a per-image test-time procedure, run by ``trainer.test`` (metrics against the input, in / out of the
ground-truth OOD mask, edits: ``stage3_scoring``) or ``trainer.predict`` (``mode=invert``: ``predict_step`` returns
per-image results (``contracts.WritesInversions``) that the ``InversionWriter`` callback from run.py writes).
Gradients are switched on inside the steps, whatever the trainer's inference mode.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch

from lightning_modules.edit_metrics import load_edit_scorer
from lightning_modules.metrics import MetricTable, loader_size, method_comparison
from lightning_modules.stage1_handoff import FrozenStage1
from lightning_modules.stage3_build import as_config, build_parts, method_class
from lightning_modules.stage3_edits import (edit_grid, edited_codes, grid_edits, grid_renderers,  # noqa: F401
                                            grid_strengths, load_output_edit)
from lightning_modules.stage3_scoring import SUMMARY_COLUMNS, score_batch
from networks.refine.hybrid import WEIGHT_FORMATS, RefineConfig, image_states
from networks.refine.methods import FeatureOnlyConfig, PTIConfig
from networks.refine.segmenter import SegmentationConfig, ground_truth_missing

Tensor = torch.Tensor
METHODS = ("e4e", "pti", "feature_only", "ood_blend", "dhr")  # the built-in methods (the benchmark runs them all)


class RefineModule(FrozenStage1, pl.LightningModule):
    """Per-image inversion + refinement of stage 3 (see the module docstring).

    Args (every key is commented in ``experiments/configs/model/refine.yaml``):
        encoder_checkpoint: stage-1 hand-off (e4e layout); method: one of ``METHODS``.
        align_mask_checkpoint: stage-2 ``align_mask.pt`` (ood_blend, segmentation.source align_mask / both).
        refine, pti, feature_only, segmentation: ``RefineConfig``, ``PTIConfig``, ``FeatureOnlyConfig``,
            ``SegmentationConfig`` (Hydra instantiates them; a mapping of some fields also works, None = defaults).
        lpips: ``LPIPSLoss`` kwargs (refinement and metric).
        edit: evaluation edit {direction, strength, attribute, classifier}; edits: ``mode=invert`` edits.
        save_weights: tuned weights in each ``refine_state.pt``: delta_bf16 | full | none.
        n_grid: images in the grid of the first test batch; seed: of the coarse projection (image b: seed + b).
    """

    def __init__(self, encoder_checkpoint: str, method: str = "dhr", align_mask_checkpoint: Optional[str] = None,
                 refine: Optional[RefineConfig] = None, pti: Optional[PTIConfig] = None,
                 feature_only: Optional[FeatureOnlyConfig] = None, segmentation: Optional[SegmentationConfig] = None,
                 lpips: Optional[dict] = None, edit: Optional[dict] = None, edits: Optional[list] = None,
                 save_weights: str = "delta_bf16", n_grid: int = 8, seed: int = 0):
        super().__init__()
        method_class(method)  # ValueError naming model.method when it is not a method
        configs = [as_config(c, cls) for c, cls in ((refine, RefineConfig), (pti, PTIConfig), (feature_only,
                                                   FeatureOnlyConfig), (segmentation, SegmentationConfig))]
        refine, pti, feature_only, segmentation = map(asdict, configs)  # plain dicts in hparams (loggers, records)
        self.save_hyperparameters()
        self.method = method
        self.load_stage1(encoder_checkpoint)
        parts = build_parts(method, self.generator, self.latent_avg, self.encoder_checkpoint, align_mask_checkpoint,
                            *configs, lpips or {}, seed)
        self.segmentation, self.align_net, self.lpips = parts.segmentation, parts.align_net, parts.lpips
        self.segmentation_lpips, self.parser, self.class_ids = parts.segmentation_lpips, parts.parser, parts.class_ids
        self.refiner = parts.refiner  # a networks.refine.methods.Method: invert / render
        self.edit = load_edit_scorer(edit or {}, self.generator.style_dim)  # a plain dict, out of checkpoints
        self.edits = [load_output_edit(dict(e), self.generator.style_dim) for e in (edits or [])]
        if save_weights not in WEIGHT_FORMATS:
            raise ValueError(f"model.save_weights={save_weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
        self.is_finished: Optional[Callable[[str], bool]] = None  # set by the InversionWriter (WritesInversions)
        self.test_table, self.grid_batch = MetricTable(), None  # grid_batch: {row: (n, C, S, S)} of test batch 0
        # contracts.DrawsEditGrids: set by callbacks.edit_grid.EditGrid; no request, no grid (no cost)
        self.edit_grid_request: Optional[Dict[str, Any]] = None
        self.edit_grid_batch: Optional[Dict[str, Dict[str, Any]]] = None

    def result_settings(self) -> Dict[str, Any]:
        """What defines a ``mode=invert`` result (stored in each record; a rerun with other settings is refused):
        every constructor argument but the evaluation-only ones, plus the resolved refinement."""
        ignored = ("n_grid", "edit")
        return {**{f"model.{k}": v for k, v in self.hparams.items() if k not in ignored}, **self.refiner.settings()}

    # ------------------------------------------------------------------ the method's two calls
    def segment(self, images: Tensor, codes: Tensor, taps: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """DHR's domain segmentation of images (B, 3, S, S) (``DomainSegmenter``)."""
        return self.refiner.segmenter(images, codes, taps)

    @property
    def uses_ground_truth(self) -> bool:
        """Whether the method segments with the ground-truth OOD mask (``model.segmentation.source=ground_truth``,
        the evaluation oracle): a method with a segmenter (DHR) and that source."""
        return self.segmentation.source == "ground_truth" and \
            callable(getattr(getattr(self.refiner, "segmenter", None), "given_ood_mask", None))

    def invert(self, images: Tensor, ood_mask: Optional[Tensor] = None) -> Dict[str, Any]:
        """Invert (and refine) images (B, 3, S, S) in [-1, 1] with ``method``; needs autograd enabled. Returns
        {"output" (B, 3, S, S), "codes" (B, L, D), "taps", "ood_mask" (B, 1, S, S) 1 = OOD or None, "state"
        RefineState or None, "segmentation" dict}.

        ``ood_mask`` (B, 1, S, S), 1 = OOD: the ground truth, used only by the oracle source
        (``model.segmentation.source=ground_truth``; ValueError naming it when the mask is None)."""
        if self.uses_ground_truth and ood_mask is None:
            raise ValueError(ground_truth_missing("the batch has no ground-truth OOD mask ('ood_mask')"))
        codes, taps = self.encode(images)
        if not self.uses_ground_truth:
            return self.refiner.invert(images, codes, taps)
        with self.refiner.segmenter.given_ood_mask(ood_mask.to(images.device)):
            return self.refiner.invert(images, codes, taps)

    def render_edit(self, result: Mapping[str, Any], images: Tensor, edited: Tensor) -> Tensor:
        """Decode edited codes (B, L, D) the way ``method`` decodes (``Method.render``)."""
        return self.refiner.render(result, images, edited)

    def edit_grid(self, images: Tensor, result: Mapping[str, Any], strengths: Optional[Sequence[float]] = None,
                  n_columns: int = 5) -> Dict[str, Dict[str, Any]]:
        """The dashboard's edit grid of images (B, 3, S, S) and their ``invert`` result (``stage3_edits``)."""
        renderers = grid_renderers(self.refiner.name, self.generator, self.align_net, result, images,
                                   lambda c: self.render_edit(result, images, c))
        return edit_grid(images, result["codes"], renderers, grid_edits(self.edits, self.edit), strengths, n_columns)

    def summary_markdown(self) -> str:
        """One-row Markdown table of the test means (the benchmark stacks the rows of all methods)."""
        means = self.test_table.mean()
        return method_comparison(means, {self.refiner.name: ""}, SUMMARY_COLUMNS) if means else ""

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self):
        return None  # per-image optimisers live inside networks.refine

    def on_test_epoch_start(self) -> None:
        self.test_table = MetricTable()

    def test_step(self, batch, batch_idx: int) -> Dict[str, Any]:
        """Invert and score one batch; returns its names, metrics and pictures (``contracts.StepPictures``, read by
        ``callbacks.wandb_tables.WandbMetricTable``)."""
        with torch.inference_mode(False), torch.enable_grad():
            x = batch["image"].clone()
            gt = batch.get("ood_mask")
            gt = gt.clone() if gt is not None else None
            start = time.perf_counter()
            result = self.invert(x, gt)
            seconds = (time.perf_counter() - start) / x.shape[0]
            return self._score(batch, batch_idx, x, gt, result, seconds)

    def on_test_epoch_end(self) -> None:
        # every rank's rows (DDP), so test_table, the summary and the logged means equal one process's
        self.test_table = self.test_table.gathered(loader_size(self.trainer.test_dataloaders))
        means = self.test_table.mean()
        self.log_dict({f"test/{k}": float(v) for k, v in means.items()}, sync_dist=True)

    def predict_step(self, batch, batch_idx: int) -> Optional[Dict[str, Any]]:
        """``mode=invert``: invert, refine and edit the batch's images not finished yet (``is_finished``); returns what
        the ``InversionWriter`` writes (``write_on_batch_end``), None when every image is finished."""
        names, truth = list(batch["name"]), batch.get("ood_mask")
        if self.uses_ground_truth and truth is None:  # refused before any image
            raise ValueError(ground_truth_missing("mode=invert was given no ground-truth masks (masks=DIR)"))
        todo = [i for i, n in enumerate(names) if not (self.is_finished and self.is_finished(n))]
        if not todo:
            return None
        with torch.inference_mode(False), torch.enable_grad():
            x = batch["image"][todo].clone()
            finite = torch.isfinite(x).flatten(1).all(1)
            rows = [todo[i] for i in torch.nonzero(finite).flatten().tolist()]
            out: Dict[str, Any] = {"invalid": [names[todo[i]] for i in torch.nonzero(~finite).flatten().tolist()],
                                   "names": [names[i] for i in rows], "extra": {"method": self.method}}
            if not rows:
                return out
            x, gt = x[finite], truth[rows].to(x.device) if truth is not None else None
            missing = [n for n, m in zip(out["names"], gt if self.uses_ground_truth else []) if m.isnan().any()]
            if missing:  # the data gives an image without a (readable) mask an all-NaN one: unknown
                raise ValueError(ground_truth_missing(f"masks=DIR has no readable mask {missing[0]}.png for the image "
                                                      f"{missing[0]!r}"))
            start = time.perf_counter()
            result = self.invert(x, gt)
            seconds = (time.perf_counter() - start) / x.shape[0]
            edits = {k: self.render_edit(result, x, c) for k, c in edited_codes(self.edits, result["codes"]).items()}
        states = image_states(result["state"], result["codes"], self.generator, self.hparams.save_weights)
        out["extra"].update(seconds=seconds, encoder_checkpoint=self.encoder_checkpoint)
        return {**out, "images": x, "result": result, "edits": edits, "states": states, "ground_truth": gt}

    # ------------------------------------------------------------------ internals
    def _score(self, batch, batch_idx: int, x: Tensor, gt: Optional[Tensor], result: Mapping[str, Any],
               seconds: float) -> Dict[str, Any]:
        names = list(batch["name"])
        metrics, rows = score_batch(x, gt, result, seconds, self.lpips, self.lpips.metric_name, self.edit,
                                    lambda codes: self.render_edit(result, x, codes))
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
        # the output edits (model.edits) of this batch, rendered only if the W&B table keeps one of its images
        return {"names": names, "metrics": metrics, "pictures": rows,
                "edit_pictures": lambda: {k: self.render_edit(result, x, c)
                                          for k, c in edited_codes(self.edits, result["codes"]).items()}}
