"""Stage 3: Domain-Specific Hybrid Refinement (DHR, WACV 2024) and the baselines, as one LightningModule.

Nothing is trained: each batch is inverted by a per-image test-time procedure chosen by ``method``, run by
``trainer.test`` (metrics against the input, in / out of the ground-truth OOD mask, edits) or
``trainer.predict`` (``mode=invert``: per-image files through ``lightning_modules.inversion_writer``).
Gradients are switched on inside the steps, whatever the trainer's inference mode.

Methods (all start from the stage-1 encoder's W+ code, GANInverter's "embedding" stage):

============  ======================================================================================
e4e           no refinement: G(codes)
pti           weight modulation on the whole image (PTI on the encoder code, GANInverter's variant)
feature_only  feature modulation of one generator feature map on the whole image
ood_blend     stage two alone: alignment + invertibility-mask blend (needs ``align_mask_checkpoint``)
dhr           domain-specific segmentation, then weights on the in-domain part, feature on the rest
============  ======================================================================================

Segmentation (``segmentation.source``): ``error_superpixels`` = the official DSS (a coarse W projection, its
per-layer LPIPS-VGG error maps pooled per SLIC superpixel, per-region thresholds by face-parser class, parser
classes that are always OOD); ``align_mask`` = the stage-2 invertibility mask (no parser needed); ``both`` =
in-domain only where both agree.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lightning_modules.edit_metrics import edit_scores, edited_codes, load_edit_scorer
from lightning_modules.inversion_writer import InversionWriter
from lightning_modules.metrics import MetricTable, image_metrics, loader_size, mask_metrics, method_comparison
from lightning_modules.perceptual import LPIPSLoss
from lightning_modules.plain import to_plain
from lightning_modules.projection import project
from lightning_modules.stage1_handoff import FrozenStage1
from lightning_modules.stage1_module import batch_images
from networks.align_mask import load_align_mask
from networks.checkpoints import CheckpointError, check_same_generator
from networks.domain_segmentation import (ERROR_SCORINGS, SEGMENTATION_SOURCES, SLIC_INPUTS, align_mask_in_domain,
                                          combine_sources, region_error, region_score_mask, superpixels,
                                          upsampled_error)
from networks.editing import apply_ganspace, apply_interfacegan, load_direction, load_ganspace
from networks.hybrid_refine import WEIGHT_FORMATS, RefineConfig, RefineState, decode, hybrid_refine, state_for_image

Tensor = torch.Tensor
METHODS = ("e4e", "pti", "feature_only", "ood_blend", "dhr")
SUMMARY_COLUMNS = [("psnr", "PSNR"), ("ssim", "SSIM"), ("mse", "MSE"), ("psnr_in", "PSNR in OOD"),
                   ("mse_in", "MSE in OOD"), ("psnr_out", "PSNR out"), ("mse_out", "MSE out"),
                   ("iou@0.5", "mask IoU@0.5"), ("edit_success", "edit success"),
                   ("edit_ood_psnr", "OOD PSNR under edit"), ("seconds", "s / image")]
SEGMENTATION_DEFAULTS: Dict[str, Any] = {
    "source": "error_superpixels",
    # official: W only, 40 steps, LPIPS, noise optimised; loss at 256 px on the clamped synthesis; the error map on
    # the last step's image (before its update). resolution null = the image size, no resize
    "coarse": {"steps": 40, "lr": 0.1, "resolution": 256, "clamp": True, "error_image": "last_step"},
    "lpips": {"net": "vgg", "backbone_weights": None, "allow_random_backbone": False},  # null = share model.lpips
    "error_scoring": "official_per_layer",             # | upsampled_sum (see networks.domain_segmentation)
    "superpixels": {"n_segments": 200, "compactness": 30.0, "sigma": 1.0},
    "slic_input": "bgr_uint8",                         # | rgb_float
    "parser": None,                                    # face-parser file; null = no parsing
    "parser_kind": "synthfaces",                       # synthfaces | bisenet (face-parsing.PyTorch 79999_iter.pth)
    "classes": None,                                   # class names in index order (null: the parser's own)
    "thresholds": {},                                  # {class name: threshold}
    "default_threshold": 0.6,
    "ood_classes": [],                                 # parser classes that are always OOD
    "align_threshold": 0.5,
}


# row labels of the edit grid (RefineModule.edit_grid)
GRID_LABELS = {"e4e": "e4e (stage 1)", "ood_blend": "ood_blend (stage 2)", "pti": "pti (stage 3)",
               "feature_only": "feature_only (stage 3)", "dhr": "dhr (stage 3)"}


def grid_strengths(configured: Sequence[float], n_columns: int = 5) -> List[float]:
    """Column strengths of an edit grid: ``n_columns`` evenly spaced values over the configured strengths' range
    extended to 0, plus 0 itself when the spacing misses it (the unedited code), ascending.

    E.g. [-3, 3] -> [-3, -1.5, 0, 1.5, 3]; [1, 3] -> [0, 0.75, 1.5, 2.25, 3]; ValueError when n_columns < 2.
    """
    if int(n_columns) < 2:
        raise ValueError(f"grid_strengths: n_columns must be >= 2, got {n_columns!r}")
    values = [float(k) for k in configured] + [0.0]
    lo, hi = min(values), max(values)
    if lo == hi:
        return [0.0]
    columns = {round(float(k), 6) for k in np.linspace(lo, hi, int(n_columns))} | {0.0}
    return sorted(columns)


def _apply_edit(edit: Mapping[str, Any], codes: Tensor, strength: float) -> Tensor:
    """One loaded edit (``RefineModule._load_output_edit``) of codes (B, L, D) at ``strength``."""
    if edit["kind"] == "interfacegan":
        return apply_interfacegan(codes, edit["direction"].to(codes.device), strength, edit["layers"])
    return apply_ganspace(codes, edit["pca"].to(codes.device), edit["component"], edit["start"], edit["end"], strength)


def check_segmentation(seg: Mapping[str, Any]) -> None:
    """ValueError naming the ``model.segmentation`` key whose value is not valid (checked before any image)."""
    choices = {"error_scoring": (seg["error_scoring"], ERROR_SCORINGS),
               "slic_input": (seg["slic_input"], SLIC_INPUTS),
               "coarse.error_image": (seg["coarse"]["error_image"], ("last_step", "final"))}
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ValueError(f"model.segmentation.{key}={value!r}; choose one of {', '.join(valid)}")
    res = seg["coarse"]["resolution"]
    if res is not None and (isinstance(res, bool) or not isinstance(res, int) or res < 1):
        raise ValueError(f"model.segmentation.coarse.resolution={res!r}; a positive size or null (the image size)")
    for key, value in (("coarse.steps", seg["coarse"]["steps"]),
                       ("superpixels.n_segments", seg["superpixels"]["n_segments"])):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.segmentation.{key}={value!r}; must be an integer >= 1")
    lr = seg["coarse"]["lr"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"model.segmentation.coarse.lr={lr!r}; must be a number > 0")


def failure_reason(state: RefineState, j: int) -> str:
    """Why refinement sample ``j`` failed, for its record."""
    if state.diverged is not None and bool(state.diverged[j]):
        first, last = float(state.losses[0, j]), float(state.losses[-1, j])
        return (f"the refinement diverged (loss {first:.4g} -> {last:.4g}, above model.refine.divergence_factor x its "
                f"start); lower the learning rates")
    return "the refinement loss became NaN / inf; the image was stopped"


def _merge(defaults: Mapping, given: Optional[Mapping]) -> Dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in defaults.items()}
    for k, v in dict(to_plain(given or {})).items():
        out[k] = {**out[k], **v} if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out


class RefineModule(FrozenStage1, pl.LightningModule):
    """Per-image inversion + refinement of stage 3 (see the module docstring for the methods).

    Args:
        encoder_checkpoint: stage-1 hand-off (e4e layout: encoder, generator, latent_avg).
        method: one of ``METHODS``.
        align_mask_checkpoint: stage-2 hand-off ``align_mask.pt``; required by ``ood_blend`` and by the
            ``align_mask`` / ``both`` segmentation sources. Its generator must be the one in the stage-1 file.
        refine: ``networks.hybrid_refine.RefineConfig`` kwargs of DHR (official: weights 50 steps at 1.5e-3,
            feature 100 steps at 9e-2, feature at G.size // 8).
        pti: {steps, lr} of the weights-only baseline (official PTI: 350 steps, 3e-4).
        feature_only: {steps, lr} of the feature-only baseline (default: DHR's feature settings).
        segmentation: see ``SEGMENTATION_DEFAULTS`` (its ``lpips``: the DSS net's ``LPIPSLoss`` kwargs, official VGG).
        lpips: ``LPIPSLoss`` kwargs (refinement losses and metric; official AlexNet).
        edit: evaluation edit {direction, strength, attribute, classifier} as in stage 2 (null = none).
        edits: ``mode=invert`` edits written per image: ``[{name, kind: interfacegan, path, strengths, layers}]``
            or ``[{name, kind: ganspace, path, component, start, end, strengths}]``.
        output_dir: where ``trainer.predict`` writes per-image results (``InversionWriter``); reruns skip
            finished images.
        masks_dir: optional ground-truth OOD masks for ``mode=invert`` (``<masks_dir>/<name>.png``, white = OOD):
            per-image metrics are written when one exists.
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
        self.segmentation = _merge(SEGMENTATION_DEFAULTS, segmentation)
        if self.segmentation["source"] not in SEGMENTATION_SOURCES:
            raise ValueError(f"model.segmentation.source={self.segmentation['source']!r}; choose one of "
                             f"{', '.join(SEGMENTATION_SOURCES)}")
        check_segmentation(self.segmentation)
        self.refine_config = self._refine_config(dict(to_plain(refine or {})), dict(to_plain(pti or {})),
                                                 dict(to_plain(feature_only or {})))
        self.align_net = self._load_align_net(align_mask_checkpoint) if self._needs_align_mask() else \
            self._grid_align_net(align_mask_checkpoint)
        self.parser, self.class_ids = self._load_parser() if self._needs_error_map() else (None, {})
        self.lpips = LPIPSLoss(**to_plain(lpips or {}))
        seg_lpips = self.segmentation["lpips"] if self._needs_error_map() else None
        self.segmentation_lpips = None if seg_lpips is None else \
            LPIPSLoss(**seg_lpips, key="model.segmentation.lpips.backbone_weights")
        # a plain dict, not a submodule: the scorer stays out of checkpoints
        self.edit = load_edit_scorer(to_plain(edit or {}), self.generator.style_dim)
        self.edits = [self._load_output_edit(dict(e)) for e in to_plain(edits or [])]
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
        settings = {f"model.{k}": v for k, v in self.hparams.items() if k not in ignored}
        if self.refine_config is not None:
            settings["refinement"] = asdict(self.refine_config)
        return settings

    # ------------------------------------------------------------------ set-up helpers
    def _refine_config(self, refine: dict, pti: dict, feature_only: dict) -> Optional[RefineConfig]:
        base = RefineConfig(**refine)
        if self.method == "pti":
            # official PTI's loss on the whole image: plain LPIPS (= per_layer with a mask of ones) + F.mse_loss
            return RefineConfig(weight_steps=int(pti.get("steps", 350)), weight_lr=float(pti.get("lr", 3e-4)),
                                feature_steps=0, feature_resolution=base.feature_resolution, l2=base.l2,
                                perceptual=base.perceptual, mse_normalisation="per_channel", lpips_mask="per_layer",
                                divergence_factor=base.divergence_factor)
        if self.method == "feature_only":
            return RefineConfig(weight_steps=0, feature_steps=int(feature_only.get("steps", base.feature_steps)),
                                feature_lr=float(feature_only.get("lr", base.feature_lr)),
                                feature_resolution=feature_only.get("resolution", base.feature_resolution),
                                l2=base.l2, perceptual=base.perceptual, mse_normalisation=base.mse_normalisation,
                                lpips_mask=base.lpips_mask, divergence_factor=base.divergence_factor)
        return base if self.method == "dhr" else None

    def _needs_align_mask(self) -> bool:
        return self.method == "ood_blend" or (self.method == "dhr" and self.segmentation["source"] != "error_superpixels")

    def _needs_error_map(self) -> bool:
        return self.method == "dhr" and self.segmentation["source"] != "align_mask"

    def _load_align_net(self, path: Optional[str]):
        if not path:
            raise ValueError(f"model.method={self.method} with model.segmentation.source="
                             f"{self.segmentation['source']} needs model.align_mask_checkpoint (a stage-2 "
                             f"align_mask.pt, e.g. from +exp=ood_blend)")
        net, meta = load_align_mask(path)
        check_same_generator(self.generator, meta.get("generator"), meta.get("generator_sha1"),
                             theirs=f"model.align_mask_checkpoint={path}",
                             ours=f"model.encoder_checkpoint={self.encoder_checkpoint}")
        return net.requires_grad_(False)

    def _grid_align_net(self, path: Optional[str]):
        # a method that does not need the stage-2 net still shows its edits in the edit grid's stage-2 row; a file
        # that does not fit only costs that row (the method's own results do not depend on it)
        if not path:
            return None
        try:
            return self._load_align_net(path)
        except CheckpointError as err:
            rank_zero_warn(f"The edit grid has no stage-2 row: {err}")
            return None

    def _load_parser(self):
        path = self.segmentation["parser"]
        if not path:
            return None, {}
        from networks.face_parsers import load_face_parsing

        parser = load_face_parsing(self.segmentation["parser_kind"], Path(path).expanduser())
        names = self.segmentation["classes"] or list(parser.class_names)
        if len(names) != parser.num_classes:
            raise ValueError(f"model.segmentation.classes lists {len(names)} names but the parser {path} predicts "
                             f"{parser.num_classes} classes")
        class_ids = {str(n): i for i, n in enumerate(names)}
        wanted = set(self.segmentation["thresholds"]) | set(self.segmentation["ood_classes"])
        unknown = sorted(wanted - set(class_ids))
        if unknown:
            raise ValueError(f"model.segmentation: unknown parser classes {unknown}; the parser {path} has "
                             f"{', '.join(class_ids)}")
        return parser, class_ids

    def _load_output_edit(self, spec: dict) -> dict:
        kind, name = spec.get("kind", "interfacegan"), spec.get("name")
        if not name or not spec.get("path") or kind not in ("interfacegan", "ganspace"):
            raise ValueError(f"model.edits entry {spec}: needs name, path and kind interfacegan | ganspace")
        strengths = [float(v) for v in spec.get("strengths", [-3.0, 3.0])]
        if kind == "interfacegan":
            return {"name": name, "kind": kind, "strengths": strengths, "layers": spec.get("layers"),
                    "direction": load_direction(Path(spec["path"]).expanduser(), dim=self.generator.style_dim)}
        for key in ("component", "start", "end"):
            if key not in spec:
                raise ValueError(f"model.edits entry {name!r} (ganspace) needs {key}")
        return {"name": name, "kind": kind, "strengths": strengths, "pca": load_ganspace(Path(spec["path"]).expanduser()),
                "component": int(spec["component"]), "start": int(spec["start"]), "end": int(spec["end"])}

    def edited_codes(self, codes: Tensor) -> Dict[str, Tensor]:
        """Every configured output edit of codes (B, L, D): {"<edit>_<strength>": (B, L, D)}."""
        return {f"{e['name']}_{k:+g}": _apply_edit(e, codes, k) for e in self.edits for k in e["strengths"]}

    # ------------------------------------------------------------------ public API
    def segment(self, images: Tensor, codes: Tensor, taps: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Domain-specific segmentation of images (B, 3, S, S): {"in_domain" (B, 1, S, S) in {0, 1}, plus the
        sources used: "error_map", "error_in_domain", "align_mask" (1 = OOD)}."""
        seg, out = self.segmentation, {}
        error_in = align_in = None
        if seg["source"] != "align_mask":
            maps = self.coarse_error_maps(images)
            with torch.no_grad():
                labels = superpixels(images, **seg["superpixels"], slic_input=seg["slic_input"])
                probs = self.parser.probabilities(images) if self.parser is not None else None
            thresholds = {self.class_ids[k]: float(v) for k, v in seg["thresholds"].items()}
            scores = region_error(maps, labels, seg["error_scoring"])
            error_in = region_score_mask(scores, labels, probs, thresholds, float(seg["default_threshold"]),
                                         [self.class_ids[c] for c in seg["ood_classes"]])
            out.update(error_map=upsampled_error(maps, images.shape[-2:]), error_in_domain=error_in)
        if seg["source"] != "error_superpixels":
            with torch.no_grad():
                mask = self.align_net(self.generator, codes, taps, images).mask
            align_in = align_mask_in_domain(mask, float(seg["align_threshold"]))
            out["align_mask"] = mask
        out["in_domain"] = combine_sources(seg["source"], error_in, align_in)
        return out

    def coarse_error_maps(self, images: Tensor) -> List[Tensor]:
        """The DSS error cue of images (B, 3, S, S): per-layer LPIPS maps (``model.segmentation.lpips``, null = the
        refinement's net) between a coarse W projection (``model.segmentation.coarse``) and the images."""
        net = self.lpips if self.segmentation_lpips is None else self.segmentation_lpips
        c = self.segmentation["coarse"]
        coarse = project(self.generator, images, perceptual=net, latent_avg=self.latent_avg[0], space="w",
                         steps=int(c["steps"]), lr=float(c["lr"]), seed=self.hparams.seed,
                         loss_resolution=c["resolution"], clamp=bool(c["clamp"]))
        image = coarse.last_step_images if c["error_image"] == "last_step" else coarse.images
        with torch.no_grad():
            return net.layer_maps(image, images)

    def invert(self, images: Tensor) -> Dict[str, Any]:
        """Invert (and refine) images (B, 3, S, S) in [-1, 1] with ``method``; needs autograd enabled.

        Returns {"output" (B, 3, S, S), "codes" (B, L, D), "taps", "ood_mask" (B, 1, S, S) 1 = OOD or None,
        "state" RefineState or None, "segmentation" dict}.
        """
        codes, taps = self.encode(images)
        result: Dict[str, Any] = {"codes": codes, "taps": taps, "ood_mask": None, "state": None, "segmentation": {}}
        if self.method == "e4e":
            with torch.no_grad():
                result["output"] = self.generator.synthesize(codes).image
        elif self.method == "ood_blend":
            with torch.no_grad():
                blended = self.align_net(self.generator, codes, taps, images)
            result.update(output=blended.output, ood_mask=blended.mask)
        else:
            b, _, s, _ = images.shape
            if self.method == "pti":
                in_domain = images.new_ones(b, 1, s, s)
            elif self.method == "feature_only":
                in_domain = images.new_zeros(b, 1, s, s)
            else:
                result["segmentation"] = self.segment(images, codes, taps)
                in_domain = result["segmentation"]["in_domain"]
                result["ood_mask"] = 1 - in_domain
            state = hybrid_refine(self.generator, codes, images, in_domain, self.lpips, self.refine_config)
            with torch.no_grad():
                result["output"] = decode(self.generator, state, codes)
            result["state"] = state
        return result

    @torch.no_grad()
    def render_edit(self, result: Mapping[str, Any], images: Tensor, edited_codes: Tensor) -> Tensor:
        """Decode edited codes (B, L, D) the way ``method`` decodes: tuned weights, f* and mask for the refinements
        (OOD content frozen at the feature level), alignment + blend against the input for ``ood_blend``."""
        if self.method == "e4e":
            return self.generator.synthesize(edited_codes).image
        if self.method == "ood_blend":  # the mask (and its error cue) stay the input's
            return self.align_net(self.generator, edited_codes, result["taps"], images,
                                  cue_codes=result["codes"]).output
        return decode(self.generator, result["state"], edited_codes)

    @torch.no_grad()
    def edit_grid(self, images: Tensor, result: Mapping[str, Any], strengths: Optional[Sequence[float]] = None,
                  n_columns: int = 5) -> Dict[str, Dict[str, Any]]:
        """Edits of images (B, 3, S, S) at several strengths, as each method decodes them (the dashboard's grid).

        Edits: every ``model.edits`` entry, else the evaluation edit ``model.edit`` (strengths -/+ its strength).
        Methods (rows): ``e4e (stage 1)`` = G(edited codes); ``ood_blend (stage 2)`` = alignment + blend, when the
        module holds a stage-2 net; the module's own method (``render_edit`` with its tuned state).

        Args:
            images: the inputs of ``result`` (B, 3, S, S) in [-1, 1].
            result: ``invert(images)``.
            strengths: the columns' strengths for every edit; None = ``grid_strengths`` of each edit's configured
                strengths with ``n_columns``.
            n_columns: see ``grid_strengths``.
        Returns:
            {edit name: {"strengths": [s_1 .. s_K], "rows": {method: (K + 1, B, 3, S, S) on the CPU}}}; column 0 is
            the input, column j the edit at s_j; {} without edits.
        """
        codes = result["codes"]
        stage2 = self.align_net is not None and self.method != "ood_blend"  # ood_blend: its own row
        out = {}
        for edit in self._grid_edits():
            columns = [float(k) for k in strengths] if strengths is not None else \
                grid_strengths(edit["strengths"], n_columns)
            renderers = {GRID_LABELS["e4e"]: lambda c: self.generator.synthesize(c).image}
            if stage2:
                renderers[GRID_LABELS["ood_blend"]] = \
                    lambda c: self.align_net(self.generator, c, result["taps"], images, cue_codes=codes).output
            if self.method != "e4e":
                renderers[GRID_LABELS[self.method]] = lambda c: self.render_edit(result, images, c)
            rows: Dict[str, list] = {label: [images] for label in renderers}
            for k in columns:
                edited = _apply_edit(edit, codes, k)
                for label, render in renderers.items():
                    rows[label].append(render(edited))
            out[edit["name"]] = {"strengths": columns,
                                 "rows": {k: torch.stack(v).detach().float().cpu() for k, v in rows.items()}}
        return out

    def _grid_edits(self) -> list:
        if self.edits:
            return self.edits
        if self.edit is None:
            return []
        s = self.edit["strength"]
        return [{"name": self.edit["attribute"], "kind": "interfacegan", "direction": self.edit["direction"],
                 "layers": None, "strengths": [-s, s]}]

    def summary_markdown(self) -> str:
        """One-row Markdown table of the test means (the benchmark stacks the rows of all methods)."""
        means = self.test_table.mean()
        return method_comparison(means, {self.method: ""}, SUMMARY_COLUMNS) if means else ""

    # ------------------------------------------------------------------ Lightning hooks
    def configure_optimizers(self):
        return None  # per-image optimisers live inside networks.hybrid_refine / lightning_modules.projection

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
            metrics = self._gt_metrics(name, x[j:j + 1], result["output"][j:j + 1], result["ood_mask"], j)
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

    def _gt_metrics(self, name: str, x: Tensor, out: Tensor, ood_mask: Optional[Tensor], j: int):
        if not self.hparams.masks_dir:
            return None
        path = Path(self.hparams.masks_dir).expanduser() / f"{name}.png"
        if not path.is_file():
            return None
        from PIL import Image

        try:
            with Image.open(path) as im:
                gt = torch.from_numpy(np.asarray(im.convert("L").resize(x.shape[-2:][::-1], Image.NEAREST)) >= 128)
        except (OSError, ValueError) as err:  # a corrupt mask costs this image its metrics, not the run
            rank_zero_warn(f"masks: cannot read the ground-truth mask {path} ({type(err).__name__}: {err}); "
                           f"{name!r} gets no metrics.json")
            return None
        gt = gt.float().view(1, 1, *x.shape[-2:]).to(x.device)
        metrics = {k: float(v[0]) for k, v in image_metrics(out, x, gt).items()}
        if ood_mask is not None:
            metrics.update({k: float(v[0]) for k, v in mask_metrics(ood_mask[j:j + 1], gt).items()})
        return metrics

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
