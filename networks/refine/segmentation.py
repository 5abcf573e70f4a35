"""Domain-specific segmentation for DHR (methods.md §3.3 stage B): which pixels are "in domain".

Mask polarity (everything in this module): **in_domain = 1 means "the generator can represent this pixel:
refine it by weight modulation"**; 0 means out of domain (text, accessories, background clutter: refine it by
feature modulation). Note that the stage-two alignment mask (``networks.align_mask``) has the opposite polarity
(1 = OOD); ``align_mask_in_domain`` converts it.

The official decision, per SLIC superpixel s: score(s) = mean inversion error (spatial LPIPS of a coarse,
editable W inversion) inside s; class c(s) = argmax of the face-parsing probability summed inside s;
in_domain(s) = score(s) < tau(c(s)); then AND with "the parsing does not call this pixel background / cloth /
hat / earring / necklace". The caller computes the per-layer LPIPS maps and the parsing probabilities; this module
only does the per-region arithmetic (vectorised over all regions and images at once).

Official by default (caopulan/GANInverter ``inference/dhr_infer.py``; same masks, ``tests/test_dss_official.py``):
the score of s sums, over the LPIPS layers, the mean of that layer's map over s's cells on the superpixel labels
nearest-downsampled to the map (``ERROR_SCORINGS[0]``); a superpixel with no cell on some map scores NaN and is out
of domain. SLIC runs on the image as cv2 reads its file: BGR uint8 (``SLIC_INPUTS[0]``). Named variants:
``upsampled_sum`` scores the per-pixel mean of the bilinearly upsampled sum of the maps (reason: on small images,
e.g. 64 px, most superpixels vanish on the coarse maps and would all be OOD); ``rgb_float`` runs SLIC on RGB in
[0, 1] (reason: scikit-image's Lab conversion expects RGB). Robustness fixes (no switch): ``start_label=1`` is
pinned so no segment goes unscored; the no-parsing case is an explicit branch (every region gets
``default_threshold``) instead of a zero tensor that works by accident.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# FaRL CelebM parsing label order (19 classes: 0 background, 1 neck, 2 face, 3 cloth, 4 r-ear, 5 l-ear,
# 6 r-brow, 7 l-brow, 8 r-eye, 9 l-eye, 10 nose, 11 inner mouth, 12 lower lip, 13 upper lip, 14 hair,
# 15 glasses, 16 hat, 17 earring, 18 necklace) and DHR's official thresholds for it.
DHR_THRESHOLDS = {2: 0.7, **{c: 0.8 for c in range(4, 14)}}
DHR_DEFAULT_THRESHOLD = 0.6
DHR_OOD_CLASSES = (0, 3, 16, 17, 18)

# ground_truth: the oracle, the data's own OOD mask (evaluation only; the caller passes it, see ``combine_sources``)
SEGMENTATION_SOURCES = ("error_superpixels", "align_mask", "both", "ground_truth")
ERROR_SCORINGS = ("official_per_layer", "upsampled_sum")
SLIC_INPUTS = ("bgr_uint8", "rgb_float")


# ------------------------------------------------------------------------------------------------ checks
def _check_map(name: str, t: torch.Tensor, channels: Optional[int] = 1) -> None:
    if not isinstance(t, torch.Tensor) or t.ndim != 4 or (channels is not None and t.shape[1] != channels):
        want = f"(B, {channels}, H, W)" if channels is not None else "(B, K, H, W)"
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a {want} tensor, got {got}")


def _check_labels(labels: torch.Tensor, like: Optional[torch.Tensor], like_name: str = "") -> None:
    if not isinstance(labels, torch.Tensor) or labels.ndim != 3:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a (B, H, W) integer tensor, got {got}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if like is not None and (labels.shape[0] != like.shape[0] or labels.shape[-2:] != like.shape[-2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match {like_name} {tuple(like.shape)} "
                         f"(need the same B, H, W)")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got a minimum of {int(labels.min())}")


def _flat_region_index(labels: torch.Tensor, device: torch.device):
    """(B, H, W) labels -> (flat index into B * n regions (B*H*W,), n): one id space for the whole batch."""
    lab = labels.to(device=device, dtype=torch.long).reshape(labels.shape[0], -1)
    n = int(lab.max()) + 1 if lab.numel() else 1
    offsets = torch.arange(labels.shape[0], device=device, dtype=torch.long).unsqueeze(1) * n
    return (lab + offsets).reshape(-1), n


# ------------------------------------------------------------------------------------------------ regions
def slic_image(image: torch.Tensor, slic_input: str = "bgr_uint8") -> np.ndarray:
    """The array SLIC sees for one image.

    Args:
        image: (3, H, W) RGB in [-1, 1] (values outside are clipped).
        slic_input: "bgr_uint8" (official: the image as ``cv2.imread`` returns its 8-bit file, B, G, R) or
            "rgb_float" (RGB float32 in [0, 1]).
    Returns:
        (H, W, 3) uint8 or float32 array.
    """
    if slic_input not in SLIC_INPUTS:
        raise ValueError(f"slic_input must be one of {', '.join(SLIC_INPUTS)}, got {slic_input!r}")
    unit = (image.detach().float().clamp(-1, 1) + 1) / 2
    if slic_input == "rgb_float":
        return np.ascontiguousarray(unit.permute(1, 2, 0).cpu().numpy())
    u8 = (unit * 255).round().to(torch.uint8).flip(0)  # RGB -> BGR
    return np.ascontiguousarray(u8.permute(1, 2, 0).cpu().numpy())


def superpixels(images: torch.Tensor, n_segments: int = 200, compactness: float = 30.0,
                sigma: float = 1.0, slic_input: str = "bgr_uint8") -> torch.Tensor:
    """SLIC superpixels of each image (scikit-image), labels starting at 1.

    Args:
        images: (B, 3, H, W) RGB in [-1, 1] (values outside are clipped).
        n_segments, compactness, sigma: ``skimage.segmentation.slic`` settings (DHR: 200, 30, 1).
        slic_input: see ``slic_image`` (official "bgr_uint8").
    Returns:
        LongTensor (B, H, W) on ``images.device``; every pixel has a label >= 1.
    """
    _check_map("superpixels: images", images, channels=3)
    from skimage.segmentation import slic

    labels = [slic(slic_image(img, slic_input), n_segments=n_segments, compactness=compactness, sigma=sigma,
                   channel_axis=-1, start_label=1) for img in images]
    return torch.from_numpy(np.stack(labels).astype(np.int64)).to(images.device)


def region_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Replace every pixel by the mean of ``values`` over its region.

    Args:
        values: (B, 1, H, W) float map (e.g. the inversion error).
        labels: (B, H, W) integer region labels >= 0 (regions are per image: label 3 of image 0 and label 3
            of image 1 are different regions).
    Returns:
        (B, 1, H, W) region means (differentiable w.r.t. ``values``).
    """
    _check_map("region_mean: values", values)
    _check_labels(labels, values, "values")
    B, _, H, W = values.shape
    flat, n = _flat_region_index(labels, values.device)
    v = values.reshape(-1)
    sums = v.new_zeros(B * n).index_add(0, flat, v)
    counts = v.new_zeros(B * n).index_add(0, flat, torch.ones_like(v))
    return (sums / counts.clamp_min(1))[flat].reshape(B, 1, H, W)


def region_class(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Class of each pixel's region: argmax over K of the probability summed inside the region.

    Args:
        probs: (B, K, H, W) per-pixel class probabilities (e.g. face-parsing softmax).
        labels: (B, H, W) integer region labels >= 0.
    Returns:
        LongTensor (B, H, W) (ties go to the lowest class index).
    """
    _check_map("region_class: probs", probs, channels=None)
    _check_labels(labels, probs, "probs")
    B, K, H, W = probs.shape
    flat, n = _flat_region_index(labels, probs.device)
    per_pixel = probs.detach().permute(0, 2, 3, 1).reshape(-1, K)
    sums = per_pixel.new_zeros(B * n, K).index_add(0, flat, per_pixel)
    return sums.argmax(dim=1)[flat].reshape(B, H, W)


def threshold_map(classes: torch.Tensor, thresholds: Mapping[int, float], default: float) -> torch.Tensor:
    """Per-pixel threshold looked up by class.

    Args:
        classes: (B, H, W) integer class per pixel (>= 0).
        thresholds: {class index: threshold}; classes not listed get ``default``.
        default: threshold of every other class.
    Returns:
        (B, 1, H, W) float thresholds.
    """
    if not isinstance(classes, torch.Tensor) or classes.ndim != 3:
        got = tuple(classes.shape) if isinstance(classes, torch.Tensor) else type(classes).__name__
        raise ValueError(f"threshold_map: classes must be a (B, H, W) integer tensor, got {got}")
    if classes.dtype.is_floating_point or classes.dtype == torch.bool:
        raise ValueError(f"threshold_map: classes must be integers, got dtype {classes.dtype}")
    keys = list(thresholds)
    bad = [k for k in keys if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0]
    if bad:
        raise ValueError(f"threshold_map: threshold keys must be class indices >= 0, got {bad}")
    if classes.numel() and int(classes.min()) < 0:
        raise ValueError(f"threshold_map: classes must be >= 0, got {int(classes.min())}")
    size = max([int(classes.max()) if classes.numel() else 0] + [int(k) for k in keys]) + 1
    table = torch.full((size,), float(default), dtype=torch.float32, device=classes.device)
    for k, v in thresholds.items():
        table[int(k)] = float(v)
    return table[classes.long()].unsqueeze(1)


def _check_layer_maps(layer_maps: Sequence[torch.Tensor], batch: int) -> None:
    if not isinstance(layer_maps, (list, tuple)) or not layer_maps:
        raise ValueError(f"layer_maps must be a non-empty list of (B, 1, h, w) maps, got {type(layer_maps).__name__}")
    for i, m in enumerate(layer_maps):
        _check_map(f"layer_maps[{i}]", m)
        if m.shape[0] != batch:
            raise ValueError(f"layer_maps[{i}] has batch {m.shape[0]}, the labels {batch}")


def upsampled_error(layer_maps: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """Sum of the per-layer maps, each bilinearly upsampled to ``size`` (the lpips ``spatial=True`` map).

    Args:
        layer_maps: list of (B, 1, h_l, w_l) per-layer LPIPS maps (``LPIPSLoss.layer_maps``).
        size: (H, W).
    Returns:
        (B, 1, H, W) float error map.
    """
    _check_layer_maps(layer_maps, layer_maps[0].shape[0] if layer_maps else 0)
    total = 0
    for m in layer_maps:
        total = total + F.interpolate(m.detach().float(), size=tuple(size), mode="bilinear", align_corners=False)
    return total


def layer_region_scores(layer_maps: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Official DSS score per superpixel: sum over layers of the layer map's mean over the superpixel's cells.

    For each map, the labels are nearest-downsampled to the map's size (``F.interpolate`` "nearest", as the official
    code resizes each superpixel's mask); a superpixel with no cell on some map gets NaN (0 / 0), which no
    threshold accepts. Accumulated in float64.

    Args:
        layer_maps: list of (B, 1, h_l, w_l) per-layer LPIPS maps.
        labels: (B, H, W) integer superpixel labels >= 0.
    Returns:
        (B, 1, H, W) float64: every pixel holds its superpixel's score (possibly NaN).
    """
    _check_labels(labels, None)
    _check_layer_maps(layer_maps, labels.shape[0])
    B, H, W = labels.shape
    device = layer_maps[0].device
    n = int(labels.max()) + 1 if labels.numel() else 1
    offsets = torch.arange(B, device=device, dtype=torch.long).view(B, 1, 1) * n
    score = torch.zeros(B * n, dtype=torch.float64, device=device)
    for m in layer_maps:
        small = F.interpolate(labels.unsqueeze(1).float().to(device), size=m.shape[-2:], mode="nearest")
        flat = (small[:, 0].long() + offsets).reshape(-1)
        values = m.detach().to(torch.float64).reshape(-1)
        sums = torch.zeros(B * n, dtype=torch.float64, device=device).index_add(0, flat, values)
        counts = torch.zeros(B * n, dtype=torch.float64, device=device).index_add(0, flat, torch.ones_like(values))
        score = score + sums / counts  # 0 / 0 = NaN: the superpixel vanished on this map
    full = (labels.to(device=device, dtype=torch.long) + offsets).reshape(-1)
    return score[full].reshape(B, 1, H, W)


def region_error(layer_maps: Sequence[torch.Tensor], labels: torch.Tensor,
                 scoring: str = "official_per_layer") -> torch.Tensor:
    """Per-superpixel inversion error, broadcast to its pixels.

    Args:
        layer_maps: list of (B, 1, h_l, w_l) per-layer LPIPS maps.
        labels: (B, H, W) integer superpixel labels >= 0.
        scoring: "official_per_layer" (``layer_region_scores``; NaN for vanished superpixels) or "upsampled_sum"
            (mean over the superpixel of ``upsampled_error``).
    Returns:
        (B, 1, H, W) scores.
    """
    if scoring not in ERROR_SCORINGS:
        raise ValueError(f"error scoring must be one of {', '.join(ERROR_SCORINGS)}, got {scoring!r}")
    if scoring == "official_per_layer":
        return layer_region_scores(layer_maps, labels)
    return region_mean(upsampled_error(layer_maps, labels.shape[-2:]), labels)


# ------------------------------------------------------------------------------------------------ masks
def error_superpixel_mask(error_map: torch.Tensor, labels: torch.Tensor, parsing_probs: Optional[torch.Tensor],
                          thresholds: Mapping[int, float], default_threshold: float,
                          ood_classes: Sequence[int] = ()) -> torch.Tensor:
    """DHR's in-domain mask from a per-pixel error map: ``region_score_mask`` of its per-superpixel mean.

    Args:
        error_map: (B, 1, H, W) per-pixel inversion error (e.g. ``upsampled_error``).
        labels, parsing_probs, thresholds, default_threshold, ood_classes: see ``region_score_mask``.
    Returns:
        (B, 1, H, W) float mask in {0, 1}, 1 = in domain.
    """
    _check_map("error_superpixel_mask: error_map", error_map)
    _check_labels(labels, error_map, "error_map")
    return region_score_mask(region_mean(error_map.detach().float(), labels), labels, parsing_probs, thresholds,
                             default_threshold, ood_classes)


def region_score_mask(scores: torch.Tensor, labels: torch.Tensor, parsing_probs: Optional[torch.Tensor],
                      thresholds: Mapping[int, float], default_threshold: float,
                      ood_classes: Sequence[int] = ()) -> torch.Tensor:
    """DHR's in-domain mask from per-superpixel scores (and face parsing when available).

    A region is in domain where its score is below the threshold of its class (NaN never is). With
    ``parsing_probs`` the class is ``region_class(parsing_probs, labels)`` and a pixel must also have
    sum(parsing_probs[ood_classes]) < 0.5 (the official ``mask_parsing``). Without parsing (no face found)
    every region uses ``default_threshold`` and ``thresholds`` / ``ood_classes`` are unused.

    Args:
        scores: (B, 1, H, W) each pixel's region score (``region_error``).
        labels: (B, H, W) superpixel labels.
        parsing_probs: (B, K, H, W) class probabilities, or None.
        thresholds: {class: threshold} (see ``DHR_THRESHOLDS`` for FaRL CelebM).
        default_threshold: threshold of unlisted classes / of every region without parsing.
        ood_classes: classes that are out of domain by definition (see ``DHR_OOD_CLASSES``).
    Returns:
        (B, 1, H, W) float mask in {0, 1}, 1 = in domain.
    """
    _check_map("region_score_mask: scores", scores)
    _check_labels(labels, scores, "scores")
    score = scores.detach()
    if parsing_probs is None:
        return (score < float(default_threshold)).float()
    _check_map("region_score_mask: parsing_probs", parsing_probs, channels=None)
    if parsing_probs.shape[0] != scores.shape[0] or parsing_probs.shape[-2:] != scores.shape[-2:]:
        raise ValueError(f"region_score_mask: parsing_probs {tuple(parsing_probs.shape)} do not match "
                         f"scores {tuple(scores.shape)} (need the same B, H, W)")
    K = parsing_probs.shape[1]
    ood = [int(c) for c in ood_classes]
    if any(c < 0 or c >= K for c in ood):
        raise ValueError(f"region_score_mask: ood_classes {ood} out of range for {K} parsing classes")
    tau = threshold_map(region_class(parsing_probs, labels), thresholds, default_threshold).to(score.device)
    keep = score < tau
    if ood:
        keep = keep & (parsing_probs.detach()[:, ood].float().sum(dim=1, keepdim=True) < 0.5)
    return keep.float()


def align_mask_in_domain(align_mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Convert a stage-two alignment mask (1 = OOD, copy the input) to an in-domain mask.

    Args:
        align_mask: (B, 1, H, W) in [0, 1], 1 = out of domain.
        threshold: pixels with align_mask >= threshold are out of domain.
    Returns:
        (B, 1, H, W) float in {0, 1}, 1 = in domain.
    """
    _check_map("align_mask_in_domain: align_mask", align_mask)
    return 1.0 - (align_mask.detach() >= threshold).float()


def ground_truth_in_domain(ood_mask: torch.Tensor) -> torch.Tensor:
    """The oracle in-domain mask: 1 - the ground-truth OOD mask (1 = OOD), binarised at 0.5.

    Args:
        ood_mask: (B, 1, H, W) in [0, 1], 1 = out of domain (e.g. a SynthFaces batch's ``ood_mask``).
    Returns:
        (B, 1, H, W) float in {0, 1}, 1 = in domain (equal to ``1 - ood_mask`` for a binary mask).
    """
    _check_map("ground_truth_in_domain: ood_mask", ood_mask)
    return 1.0 - (ood_mask.detach().float() >= 0.5).float()


def combine_sources(source: str, error_in: Optional[torch.Tensor] = None,
                    align_in: Optional[torch.Tensor] = None, truth_in: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pick / combine in-domain masks by source name.

    Args:
        source: one of ``SEGMENTATION_SOURCES``: "error_superpixels" (``error_in``), "align_mask"
            (``align_in``), "both" (logical AND: in domain only where both say so; for soft masks the
            elementwise minimum) or "ground_truth" (``truth_in``, the oracle: ``ground_truth_in_domain``).
        error_in, align_in, truth_in: (B, 1, H, W) in-domain masks (1 = in domain).
    Returns:
        (B, 1, H, W) float in-domain mask.
    """
    if source not in SEGMENTATION_SOURCES:
        raise ValueError(f"unknown segmentation source {source!r}; valid sources: {', '.join(SEGMENTATION_SOURCES)}")
    needed = {"error_superpixels": ("error_in",), "align_mask": ("align_in",),
              "both": ("error_in", "align_in"), "ground_truth": ("truth_in",)}[source]
    given = {"error_in": error_in, "align_in": align_in, "truth_in": truth_in}
    missing = [n for n in needed if given[n] is None]
    if missing:
        raise ValueError(f"segmentation source {source!r} needs {' and '.join(missing)} "
                         f"(valid sources: {', '.join(SEGMENTATION_SOURCES)})")
    for n in needed:
        _check_map(f"combine_sources: {n}", given[n])
    if source == "error_superpixels":
        return error_in.float()
    if source == "align_mask":
        return align_in.float()
    if source == "ground_truth":
        return truth_in.float()
    if error_in.shape != align_in.shape:
        raise ValueError(f"combine_sources('both'): error_in {tuple(error_in.shape)} and align_in "
                         f"{tuple(align_in.shape)} must have the same shape")
    return torch.minimum(error_in.float(), align_in.float().to(error_in.device))
