"""Edit success measured by the SynthFaces attribute classifier, and OOD preservation under an edit.

Used by every stage's evaluation, so an edit is scored the same way for e4e codes, stage-two blends and
stage-three refinements.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from lightning_modules.metrics import image_metrics
from networks.synthfaces_nets import AttributeClassifier

Tensor = torch.Tensor


@torch.no_grad()
def attribute_change(classifier: AttributeClassifier, before: Tensor, after: Tensor, attribute: str = "smile",
                     direction: float = 1.0, min_change: float = 0.1) -> Dict[str, Tensor]:
    """Score an edit: the classifier's attribute on ``before`` and ``after`` images (B, 3, H, W) in [-1, 1].

    Returns per-image tensors (B,): ``before``, ``after``, ``change`` (after - before) and ``success``
    (float 0/1: the attribute moved by at least ``min_change`` in the sign of ``direction``; for "smile",
    whose labels span [0, 1], 0.1 is a tenth of the range).
    """
    if attribute not in classifier.head_index:
        raise ValueError(f"attribute_change: the classifier has no {attribute!r} head "
                         f"(it predicts {', '.join(classifier.head_index)})")
    was_training = classifier.training
    classifier.eval()
    b = classifier.predict(before)[attribute].float()
    a = classifier.predict(after)[attribute].float()
    classifier.train(was_training)
    change = a - b
    sign = 1.0 if direction >= 0 else -1.0
    return {"before": b, "after": a, "change": change, "success": (sign * change >= min_change).float()}


@torch.no_grad()
def ood_preservation(source: Tensor, edited: Tensor, ood_mask: Tensor) -> Tensor:
    """PSNR (dB, images in [-1, 1] read as [0, 1]) inside the OOD mask (B, 1, H, W) between the input and its
    edited output, (B,): how well an edit keeps the out-of-domain content. NaN where the mask is empty."""
    return image_metrics(edited, source, ood_mask)["psnr_in"]


def load_edit_scorer(cfg: Mapping, style_dim: int) -> Optional[dict]:
    """The evaluation edit of the inversion stages from ``model.edit`` = {direction, strength, attribute,
    classifier}: None without a direction, else {"direction" (1, D), "strength", "attribute", "classifier"}.

    ValueError when a direction comes without the classifier file that scores it.
    """
    cfg = dict(cfg or {})
    if not cfg.get("direction"):
        return None
    if not cfg.get("classifier"):
        raise ValueError("model.edit.direction is set but model.edit.classifier is not: the edit is scored by the "
                         "SynthFaces attribute classifier (experiments/weights/synthfaces/attribute_classifier.pt)")
    from networks.editing import load_direction
    from networks.synthfaces_nets import load_attribute_classifier

    classifier = load_attribute_classifier(Path(cfg["classifier"]).expanduser()).eval().requires_grad_(False)
    return {"direction": load_direction(Path(cfg["direction"]).expanduser(), dim=style_dim),
            "strength": float(cfg.get("strength", 3.0)), "attribute": str(cfg.get("attribute", "smile")),
            "classifier": classifier}


def edited_codes(scorer: Mapping, codes: Tensor) -> Tensor:
    """The evaluation edit of ``load_edit_scorer`` applied to W+ codes (B, L, D)."""
    from networks.editing import apply_interfacegan

    return apply_interfacegan(codes, scorer["direction"].to(codes.device), scorer["strength"])


@torch.no_grad()
def edit_scores(scorer: Mapping, before: Tensor, after: Tensor, source: Tensor,
                ood_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Per-image (B,) scores of one edit: "edit_success" and "edit_change" (``attribute_change`` of the
    scorer's attribute between ``before`` and ``after``) and, with a non-empty OOD mask, "edit_ood_psnr"
    (``ood_preservation`` of the input ``source``)."""
    score = attribute_change(scorer["classifier"].to(after.device), before, after, scorer["attribute"],
                             direction=scorer["strength"])
    out = {"edit_success": score["success"], "edit_change": score["change"]}
    if ood_mask is not None and ood_mask.sum() > 0:
        out["edit_ood_psnr"] = ood_preservation(source, after, ood_mask)
    return out
