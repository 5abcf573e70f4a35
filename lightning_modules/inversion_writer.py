"""Per-image results of ``mode=invert``: files on disk, one folder per image, resumable.

Layout under ``out_dir`` (``name`` = the image's path relative to the input folder, without extension)::

    <name>/input.png  reconstruction.png  ood_mask.png (1 = out of domain; when the method has one)
    <name>/edits/<edit>_<strength>.png     every configured edit, decoded the way the method decodes
    <name>/latent.pt                       W+ code (L, D)
    <name>/refine_state.pt                 what re-editing needs (f*, masks, weight delta in bf16 by default)
    <name>/metrics.json                    only when a ground-truth OOD mask exists
    <name>/record.json                     written last: the image is finished (status ok | failed)
    manifest.json                          every record, rebuilt at the end of each run

Every file is written to a temporary name and renamed, and ``record.json`` comes last, so a killed or
disk-full run leaves no folder that looks finished; a rerun skips exactly the finished images.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

from callbacks.sample_grid import _save_png, grid_to_pil
from networks.checkpoints import save_atomic

Tensor = torch.Tensor
RECORD = "record.json"
MANIFEST = "manifest.json"


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True))
    os.replace(tmp, path)
    return path


def _image(t: Tensor):
    """(3, H, W) in [-1, 1] or (1, H, W) in [0, 1] -> PIL image."""
    t = t.detach().float().cpu()
    return grid_to_pil((t + 1) / 2 if t.shape[0] == 3 else t)


class InversionWriter:
    """Writes and finds the per-image results of ``mode=invert`` under ``out_dir`` (layout in the module doc)."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir).expanduser()

    def folder(self, name: str) -> Path:
        """The image's folder; names are relative paths, so '..' and absolute parts are refused."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"InversionWriter: image name {name!r} must be a relative path inside the input folder")
        return self.out_dir / rel

    def is_done(self, name: str) -> bool:
        """True when ``name`` has a record (finished or failed) from an earlier run."""
        return (self.folder(name) / RECORD).is_file()

    def write(self, name: str, images: Mapping[str, Tensor], edits: Mapping[str, Tensor], latent: Tensor,
              state: Optional[dict], metrics: Optional[Mapping[str, float]] = None, status: str = "ok",
              reason: str = "", extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write one image's results and its record last; returns the record path.

        Args:
            name: the image's relative name.
            images: {"input", "reconstruction", "ood_mask", ...}: (3, H, W) images in [-1, 1] or (1, H, W) masks.
            edits: {"<edit>_<strength>": (3, H, W)}.
            latent: (L, D) W+ code.
            state: ``networks.hybrid_refine.state_for_image`` dict (None for methods without refinement).
            metrics: per-image numbers (written when given).
            status: "ok" or "failed" (then ``reason`` says why; failed images get a record and no pictures).
            extra: more plain fields for the record (method, producer, ...).
        """
        folder = self.folder(name)
        files: List[str] = []
        if status == "ok":
            for key, tensor in images.items():
                files.append(_save_png(_image(tensor), folder / f"{key}.png").name)
            for key, tensor in edits.items():
                files.append("edits/" + _save_png(_image(tensor), folder / "edits" / f"{key}.png").name)
            save_atomic(latent.detach().cpu().clone(), folder / "latent.pt")
            files.append("latent.pt")
            if state is not None:
                save_atomic(state, folder / "refine_state.pt")
                files.append("refine_state.pt")
        if metrics:
            _write_json(folder / "metrics.json", {k: float(v) for k, v in metrics.items()})
            files.append("metrics.json")
        record = {"name": name, "status": status, "reason": reason, "files": files, **dict(extra or {})}
        return _write_json(folder / RECORD, record)

    def records(self) -> List[Dict[str, Any]]:
        """Every record under ``out_dir``, sorted by name."""
        found = [json.loads(p.read_text()) for p in self.out_dir.rglob(RECORD)]
        return sorted(found, key=lambda r: r["name"])

    def write_manifest(self) -> Path:
        """``manifest.json``: counts and every record (call on one process after all images are done)."""
        records = self.records()
        failed = [r["name"] for r in records if r["status"] != "ok"]
        return _write_json(self.out_dir / MANIFEST, {"images": len(records), "ok": len(records) - len(failed),
                                                     "failed": failed, "records": records})
