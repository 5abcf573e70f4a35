"""Per-image results of ``mode=invert``: files on disk, one folder per image, resumable; a Lightning
``BasePredictionWriter`` (``write_interval="batch"``) that ``experiments/run.py`` builds for ``mode=invert`` and
hands to the Trainer. The stage module (``lightning_modules.contracts.WritesInversions``) only returns results:
at predict start the writer gives it ``is_finished`` (which images an earlier run finished, skipped), its
``predict_step`` returns what to write (``RefineModule.predict_step``) and ``write_on_batch_end`` writes it; at the
end of ``trainer.predict`` every rank waits for the others, then rank zero writes the manifest.

Layout under ``out_dir`` (``name`` = the image's path relative to the input folder, without extension)::

    <name>/input.png  reconstruction.png  ood_mask.png (1 = out of domain; when the method has one)
    <name>/edits/<edit>_<strength>.png     every configured edit, decoded the way the method decodes
    <name>/latent.pt                       W+ code (L, D)
    <name>/refine_state.pt                 what re-editing needs (f*, masks, weight delta in bf16 by default)
    <name>/metrics.json                    only when the batch holds the image's ground-truth OOD mask (masks=DIR)
    <name>/record.json                     written last: status ok | failed, and the settings that made it
    manifest.json                          every record and the skipped input files, rebuilt after each run

``name`` must be unique within a run (run.py refuses ``face.png`` beside ``face.jpg``). Every file is written
to a unique temporary name and renamed, and ``record.json`` comes last, so a killed or disk-full run leaves no
folder that looks finished. A rerun skips exactly the images finished ``ok`` with the same settings; failed
images are retried, and images made with other settings are refused by ``check_settings`` (run.py) unless the
user asks to redo them. Writing an image first clears what an earlier attempt left in its folder.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from callbacks.images import grid_to_pil, save_png
from lightning_modules.contracts import WritesInversions
from lightning_modules.metrics import image_metrics, mask_metrics
from networks.checkpoints import TMP_SUFFIX, atomic_target, plain_containers, save_atomic

Tensor = torch.Tensor
RECORD = "record.json"
MANIFEST = "manifest.json"
RESULT_FILES = ("input.png", "reconstruction.png", "ood_mask.png", "latent.pt", "refine_state.pt", "metrics.json",
                RECORD)


def _write_json(path: Path, obj: Any) -> Path:
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=True))
    return path


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (lists stay values)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def settings_difference(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 5) -> str:
    """``"model.method: dhr -> pti; model.refine.weight_steps: 50 -> 350"`` for two settings dicts ('' if equal)."""
    a, b = _flatten(plain_containers(old)), _flatten(plain_containers(new))
    changed = [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
               if a.get(k, "(unset)") != b.get(k, "(unset)")]
    more = f"; and {len(changed) - limit} more" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


def failure_reason(state, j: int) -> str:
    """Why refinement sample ``j`` of a ``RefineState`` failed, for its record."""
    if state.diverged is not None and bool(state.diverged[j]):
        first, last = float(state.losses[0, j]), float(state.losses[-1, j])
        return (f"the refinement diverged (loss {first:.4g} -> {last:.4g}, above model.refine.divergence_factor x its "
                f"start); lower the learning rates")
    return "the refinement loss became NaN / inf; the image was stopped"


def ground_truth_metrics(x: Tensor, out: Tensor, ood_mask: Optional[Tensor],
                         truth: Optional[Tensor]) -> Optional[Dict[str, float]]:
    """Per-image metrics of output ``out`` (1, 3, S, S) against input ``x`` (1, 3, S, S) in and out of the ground-truth
    OOD mask ``truth`` (1, 1, S, S), 1 = OOD (the batch's ``ood_mask``), and of the predicted ``ood_mask``
    (1, 1, S, S) against it; None without a ground truth (None, or all-NaN: the image has no readable mask)."""
    if truth is None or not bool(torch.isfinite(truth).all()):
        return None
    truth = truth.to(x.device)
    metrics = {k: float(v[0]) for k, v in image_metrics(out, x, truth).items()}
    if ood_mask is not None:
        metrics.update({k: float(v[0]) for k, v in mask_metrics(ood_mask, truth).items()})
    return metrics


def _image(t: Tensor):
    """(3, H, W) in [-1, 1] or (1, H, W) in [0, 1] -> PIL image."""
    t = t.detach().float().cpu()
    return grid_to_pil((t + 1) / 2 if t.shape[0] == 3 else t)


class InversionWriter(BasePredictionWriter):
    """Writes and finds the per-image results of ``mode=invert`` under ``out_dir`` (layout in the module doc).

    Args:
        out_dir: the output folder.
        settings: what defines a result (the module's ``result_settings()``), stored in every record.
    """

    def __init__(self, out_dir, settings: Optional[Mapping[str, Any]] = None):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir).expanduser()
        # what defines a result (method, checkpoints, refinement, segmentation, edits): stored in every record
        self.settings: Dict[str, Any] = plain_containers(dict(settings or {}))

    def folder(self, name: str) -> Path:
        """The image's folder; names are relative paths, so '..' and absolute parts are refused."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"InversionWriter: image name {name!r} must be a relative path inside the input folder")
        return self.out_dir / rel

    def record(self, name: str) -> Optional[Dict[str, Any]]:
        """``name``'s record from an earlier run, or None (no record, or an unreadable one)."""
        try:
            return json.loads((self.folder(name) / RECORD).read_text())
        except (OSError, ValueError):
            return None

    def is_done(self, name: str) -> bool:
        """True when ``name`` was finished ``ok`` by an earlier run with the same settings (failed images and
        images made with other settings are done again)."""
        rec = self.record(name)
        return rec is not None and rec.get("status") == "ok" and \
            plain_containers(rec.get("settings", {})) == self.settings

    def conflicts(self) -> List[tuple]:
        """[(name, difference)] for every image finished ``ok`` with other settings than this writer's."""
        found = []
        for rec in self.records():
            if rec.get("status") == "ok" and plain_containers(rec.get("settings", {})) != self.settings:
                found.append((rec["name"], settings_difference(rec.get("settings", {}), self.settings)))
        return found

    def clear(self, name: str) -> None:
        """Removes what an earlier attempt at ``name`` left in its folder: its result files, its ``edits/`` and
        temporary files of a killed write (other images' sub-folders are kept)."""
        folder = self.folder(name)
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if path.is_file() and (path.name in RESULT_FILES or path.name.endswith(TMP_SUFFIX)):
                path.unlink(missing_ok=True)
        shutil.rmtree(folder / "edits", ignore_errors=True)

    def write(self, name: str, images: Mapping[str, Tensor], edits: Mapping[str, Tensor], latent: Tensor,
              state: Optional[dict], metrics: Optional[Mapping[str, float]] = None, status: str = "ok",
              reason: str = "", extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write one image's results and its record last; returns the record path.

        Args:
            name: the image's relative name.
            images: {"input", "reconstruction", "ood_mask", ...}: (3, H, W) images in [-1, 1] or (1, H, W) masks.
            edits: {"<edit>_<strength>": (3, H, W)}.
            latent: (L, D) W+ code.
            state: ``networks.refine.hybrid.state_for_image`` dict (None for methods without refinement).
            metrics: per-image numbers (written when given).
            status: "ok" or "failed" (then ``reason`` says why; failed images get a record and no pictures).
            extra: more plain fields for the record (method, producer, ...).
        """
        folder = self.folder(name)
        self.clear(name)
        files: List[str] = []
        if status == "ok":
            for key, tensor in images.items():
                files.append(save_png(_image(tensor), folder / f"{key}.png").name)
            for key, tensor in edits.items():
                files.append("edits/" + save_png(_image(tensor), folder / "edits" / f"{key}.png").name)
            save_atomic(latent.detach().cpu().clone(), folder / "latent.pt")
            files.append("latent.pt")
            if state is not None:
                save_atomic(state, folder / "refine_state.pt")
                files.append("refine_state.pt")
        if metrics:
            _write_json(folder / "metrics.json", {k: float(v) for k, v in metrics.items()})
            files.append("metrics.json")
        record = {"name": name, "status": status, "reason": reason, "files": files, **dict(extra or {}),
                  "settings": self.settings}
        return _write_json(folder / RECORD, record)

    def records(self) -> List[Dict[str, Any]]:
        """Every record under ``out_dir``, sorted by name."""
        found = []
        for path in self.out_dir.rglob(RECORD):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # a record being replaced right now, or damaged: not finished
                continue
        return sorted(found, key=lambda r: r["name"])

    def write_manifest(self, skipped: Sequence[str] = ()) -> Path:
        """``manifest.json``: counts, every record, and ``skipped``: input files that could not be read (call on one
        process after all images are done)."""
        records = self.records()
        failed = [r["name"] for r in records if r["status"] != "ok"]
        return _write_json(self.out_dir / MANIFEST, {"images": len(records), "ok": len(records) - len(failed),
                                                     "failed": failed, "skipped": list(skipped), "records": records})

    # ------------------------------------------------------------------ Lightning hooks
    def on_predict_start(self, trainer, pl_module) -> None:
        """Hands the module ``is_finished`` (``is_done``): it skips the images an earlier run finished."""
        if not isinstance(pl_module, WritesInversions):
            raise TypeError(f"InversionWriter: {type(pl_module).__name__} does not write inversions (it needs the "
                            f"lightning_modules.contracts.WritesInversions members)")
        pl_module.is_finished = self.is_done

    def write_on_batch_end(self, trainer, pl_module, prediction: Optional[Mapping[str, Any]], batch_indices,
                           batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Write one ``predict_step`` output: {"invalid": [names of inputs with NaN / inf], "names": [B names],
        "extra": record fields, "images" (B, 3, S, S), "result": the method's result (``output``, ``codes``,
        ``ood_mask``, ``state``), "edits": {edit: (B, 3, S, S)}, "states": [B state dicts or None], "ground_truth":
        the batch's OOD masks (B, 1, S, S) of those images or None}; None = nothing to do (every image finished)."""
        if prediction is None:
            return
        for name in prediction["invalid"]:
            self.write(name, {}, {}, torch.zeros(0), None, status="failed",
                       reason="the image holds NaN or inf values", extra={"method": prediction["extra"]["method"]})
        if not prediction["names"]:
            return
        x, result, extra = prediction["images"], prediction["result"], prediction["extra"]
        state, ood, truth = result["state"], result["ood_mask"], prediction.get("ground_truth")
        for j, name in enumerate(prediction["names"]):
            if state is not None and bool(state.failed[j]):
                self.write(name, {}, {}, result["codes"][j], None, status="failed", extra=extra,
                           reason=failure_reason(state, j))
                continue
            images = {"input": x[j], "reconstruction": result["output"][j]}
            if ood is not None:
                images["ood_mask"] = ood[j]
            metrics = ground_truth_metrics(x[j:j + 1], result["output"][j:j + 1],
                                           ood[j:j + 1] if ood is not None else None,
                                           truth[j:j + 1] if truth is not None else None)
            try:
                self.write(name, images, {k: v[j] for k, v in prediction["edits"].items()}, result["codes"][j],
                           prediction["states"][j], metrics=metrics, extra=extra)
            except OSError as err:  # disk full, permissions: stop; finished images stay finished
                raise OSError(f"could not write the results of {name!r} under {self.out_dir} ({err}); the "
                              f"{len(self.records())} finished image(s) are kept; fix the problem and rerun "
                              f"with the same output=... to complete the rest") from err

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """End of ``trainer.predict``, on every rank: wait until every rank's folders are written (DDP: each image
        went to one rank), then rank zero writes the manifest. Not ``on_predict_epoch_end``: Lightning skips that
        hook on a rank whose predict loop has no batch, and the barrier would wait forever."""
        if stage != "predict":
            return
        if isinstance(pl_module, WritesInversions):
            pl_module.is_finished = None
        trainer.strategy.barrier("inversion_manifest")
        if trainer.is_global_zero:
            self.write_manifest()
