"""Stage-3 edits: the configured output edits (``model.edits``), applied to W+ codes, and the edit grid.

An edit spec is ``{name, kind: interfacegan, path, strengths, layers}`` or ``{name, kind: ganspace, path, component,
start, end, strengths}``; ``load_output_edit`` reads its file once, ``apply_edit`` moves codes (B, L, D).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from networks.editing import apply_ganspace, apply_interfacegan, load_direction, load_ganspace

Tensor = torch.Tensor

# row labels of the edit grid (edit_grid)
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


def apply_edit(edit: Mapping[str, Any], codes: Tensor, strength: float) -> Tensor:
    """One loaded edit (``load_output_edit``) of codes (B, L, D) at ``strength``."""
    if edit["kind"] == "interfacegan":
        return apply_interfacegan(codes, edit["direction"].to(codes.device), strength, edit["layers"])
    return apply_ganspace(codes, edit["pca"].to(codes.device), edit["component"], edit["start"], edit["end"], strength)


def load_output_edit(spec: dict, style_dim: int) -> dict:
    """A ``model.edits`` entry with its direction / PCA loaded; ValueError naming what the entry lacks."""
    kind, name = spec.get("kind", "interfacegan"), spec.get("name")
    if not name or not spec.get("path") or kind not in ("interfacegan", "ganspace"):
        raise ValueError(f"model.edits entry {spec}: needs name, path and kind interfacegan | ganspace")
    strengths = [float(v) for v in spec.get("strengths", [-3.0, 3.0])]
    if kind == "interfacegan":
        return {"name": name, "kind": kind, "strengths": strengths, "layers": spec.get("layers"),
                "direction": load_direction(Path(spec["path"]).expanduser(), dim=style_dim)}
    for key in ("component", "start", "end"):
        if key not in spec:
            raise ValueError(f"model.edits entry {name!r} (ganspace) needs {key}")
    return {"name": name, "kind": kind, "strengths": strengths, "pca": load_ganspace(Path(spec["path"]).expanduser()),
            "component": int(spec["component"]), "start": int(spec["start"]), "end": int(spec["end"])}


def edited_codes(edits: Sequence[Mapping[str, Any]], codes: Tensor) -> Dict[str, Tensor]:
    """Every output edit of codes (B, L, D): {"<edit>_<strength>": (B, L, D)}."""
    return {f"{e['name']}_{k:+g}": apply_edit(e, codes, k) for e in edits for k in e["strengths"]}


def grid_edits(edits: Sequence[Mapping[str, Any]], edit: Optional[Mapping[str, Any]]) -> list:
    """The edits of the grid: every ``model.edits`` entry, else the evaluation edit (strengths -/+ its strength)."""
    if edits:
        return list(edits)
    if edit is None:
        return []
    s = edit["strength"]
    return [{"name": edit["attribute"], "kind": "interfacegan", "direction": edit["direction"], "layers": None,
             "strengths": [-s, s]}]


@torch.no_grad()
def edit_grid(images: Tensor, codes: Tensor, renderers: Mapping[str, Callable[[Tensor], Tensor]],
              edits: Sequence[Mapping[str, Any]], strengths: Optional[Sequence[float]] = None,
              n_columns: int = 5) -> Dict[str, Dict[str, Any]]:
    """Edits of images (B, 3, S, S) with codes (B, L, D) at several strengths, one row per renderer.

    Args:
        renderers: {row label: edited codes -> images (B, 3, S, S)}.
        edits: loaded edits (``grid_edits``).
        strengths: the columns' strengths for every edit; None = ``grid_strengths`` of each edit's own.
    Returns:
        {edit name: {"strengths": [s_1 .. s_K], "rows": {label: (K + 1, B, 3, S, S) on the CPU}}}; column 0 is
        the input, column j the edit at s_j.
    """
    out = {}
    for edit in edits:
        columns = [float(k) for k in strengths] if strengths is not None else \
            grid_strengths(edit["strengths"], n_columns)
        rows: Dict[str, list] = {label: [images] for label in renderers}
        for k in columns:
            edited = apply_edit(edit, codes, k)
            for label, render in renderers.items():
                rows[label].append(render(edited))
        out[edit["name"]] = {"strengths": columns,
                             "rows": {k: torch.stack(v).detach().float().cpu() for k, v in rows.items()}}
    return out


def grid_renderers(method: str, generator, align_net, result: Mapping[str, Any], images: Tensor,
                   render: Callable[[Tensor], Tensor]) -> Dict[str, Callable[[Tensor], Tensor]]:
    """The rows of the edit grid of the method named ``method`` (``Method.name``): ``e4e (stage 1)`` = G(edited codes); ``ood_blend (stage 2)`` = alignment +
    blend when a stage-2 net is there; the method's own row (``render``: edited codes (B, L, D) -> images)."""
    codes = result["codes"]
    renderers = {GRID_LABELS["e4e"]: lambda c: generator.synthesize(c).image}
    if align_net is not None and method != "ood_blend":  # ood_blend: its own row
        renderers[GRID_LABELS["ood_blend"]] = \
            lambda c: align_net(generator, c, result["taps"], images, cue_codes=codes).output
    if method != "e4e":
        renderers[GRID_LABELS.get(method, f"{method} (stage 3)")] = render
    return renderers
