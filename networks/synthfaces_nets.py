"""Auxiliary SynthFaces networks: an attribute classifier, a face parser and an FID feature network.

Plain ``nn.Module``s (no Lightning, no Hydra). All take images ``(B, 3, H, W)`` float in [-1, 1]
(the generator's range); inputs whose size differs from the training ``resolution`` are resized to
it first (bilinear, antialiased), so the nets also accept generator outputs of other sizes.

* ``AttributeClassifier``: a small CNN with one output head per SynthFaces label
  (``labels.synthfaces.FACTORS``): categorical labels (hair_style, glasses, ...) get
  logits, continuous ones a regression output, and periodic ones (bg_angle, bg_hue, shirt_hue) a
  (cos, sin) pair. ``predict`` returns labels in the units of ``labels.json``; ``features`` the
  penultimate activations.
* ``FaceParser``: a tiny U-Net predicting the 12 part classes of ``labels.synthfaces``.
* ``SynthFacesFeatures``: a frozen classifier exposing ``num_features`` and taking images the way
  ``torchmetrics.image.fid.FrechetInceptionDistance(feature=...)`` passes them (uint8 in [0, 255],
  or float in [0, 1] when the metric is built with ``normalize=True``).

Files (``save_aux_net`` / ``load_attribute_classifier`` / ``load_face_parser``) are dicts
``{"state_dict", "config", "meta"}`` readable with ``torch.load(weights_only=True)``; ``config`` holds
the constructor kwargs and ``meta["kind"]`` says which network the file holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from labels.synthfaces import FACTOR_NAMES, FACTORS, NUM_PARTS, PART_CLASSES
from networks.checkpoints import CheckpointError, load_strict, safe_load, save_atomic

Tensor = torch.Tensor

# Labels whose values live on a circle (value range = one period): regressed as (cos, sin).
CIRCULAR_FACTORS = ("bg_angle", "bg_hue", "shirt_hue")
# A label is only visible in an image when another label has one of the given values; elsewhere it
# is ignored by the loss and the metrics (e.g. a frame colour is drawn only on faces with glasses,
# sunglasses hide the eyes).
VISIBLE_IF: Dict[str, Tuple[str, Tuple[int, ...]]] = {
    "frame_color": ("glasses", (1, 2, 3)),
    "eye_color": ("glasses", (0, 1, 2)),
    "gaze": ("glasses", (0, 1, 2)),
    "eye_size": ("glasses", (0, 1, 2)),
}
REGRESSION_SCALE = 3.0  # MSE of targets in [-1, 1] is multiplied by this (~1 / variance of a uniform target)


@dataclass(frozen=True)
class AttributeHead:
    """One output head: ``kind`` is "categorical" (``width`` = number of classes, logits),
    "regression" (width 1, target ``2 * (v - low) / (high - low) - 1``) or "circular" (width 2,
    target ``(cos, sin)`` of ``2 pi (v - low) / (high - low)``). ``column`` is the label's column in
    the label vector (``FACTOR_NAMES`` order), ``offset`` the head's first output channel."""

    name: str
    kind: str
    low: float
    high: float
    width: int
    column: int
    offset: int
    categories: Optional[Tuple[str, ...]] = None


def build_heads(attributes: Optional[Sequence[str]] = None) -> List[AttributeHead]:
    """The heads for ``attributes`` (label names; None = all ``FACTOR_NAMES``, in that order).

    Raises ValueError naming unknown or repeated labels.
    """
    names = list(FACTOR_NAMES) if attributes is None else [str(a) for a in attributes]
    unknown = [n for n in names if n not in FACTOR_NAMES]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"attributes must be distinct SynthFaces labels (from {list(FACTOR_NAMES)}), got {names}")
    by_name = {f.name: (i, f) for i, f in enumerate(FACTORS)}
    heads, offset = [], 0
    for name in names:
        column, f = by_name[name]
        if f.kind == "int":
            kind, width = "categorical", len(f.probs)
        elif name in CIRCULAR_FACTORS:
            kind, width = "circular", 2
        else:
            kind, width = "regression", 1
        cats = tuple(f.categories) if f.categories else None
        heads.append(AttributeHead(name, kind, float(f.low), float(f.high), width, column, offset, cats))
        offset += width
    return heads


def visibility_mask(labels: Tensor, heads: Sequence[AttributeHead]) -> Tensor:
    """Boolean (B, len(heads)): whether head k's label is visible in image b (see ``VISIBLE_IF``).

    labels: (B, len(FACTOR_NAMES)) float label vectors in ``FACTOR_NAMES`` order.
    """
    mask = torch.ones(labels.shape[0], len(heads), dtype=torch.bool, device=labels.device)
    for k, head in enumerate(heads):
        if head.name in VISIBLE_IF:
            other, allowed = VISIBLE_IF[head.name]
            value = labels[:, FACTOR_NAMES.index(other)].round().long()
            mask[:, k] = torch.isin(value, torch.tensor(allowed, device=labels.device))
    return mask


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _check_images(x: Tensor, who: str) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{who} expects images (B, 3, H, W), got {shape}")


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class AttributeClassifier(nn.Module):
    """Multi-head SynthFaces label predictor.

    Args:
        resolution: training image size; other input sizes are resized to it.
        widths: channels of the stages; stage 0 runs at full resolution, every stage ends with a
            stride-2 convolution (a 64 px input ends at 64 / 2**len(widths) px).
        feature_dim: size of the penultimate feature vector (the FID features).
        attributes: label names to predict (None = all 36 of ``FACTOR_NAMES``).
    ``forward(x)`` (B, 3, H, W) in [-1, 1] -> raw head outputs (B, out_dim); ``split``, ``predict``,
    ``features`` and ``loss`` interpret them.
    """

    def __init__(self, resolution: int = 64, widths: Sequence[int] = (16, 32, 64, 128), feature_dim: int = 128,
                 attributes: Optional[Sequence[str]] = None):
        super().__init__()
        widths = [int(w) for w in widths]
        if resolution < 2 ** len(widths) or not widths or min(widths) < 1 or feature_dim < 1:
            raise ValueError(f"AttributeClassifier: need widths >= 1, feature_dim >= 1 and resolution >= "
                             f"2**len(widths); got resolution={resolution}, widths={widths}, feature_dim={feature_dim}")
        self.config = {"resolution": int(resolution), "widths": widths, "feature_dim": int(feature_dim),
                       "attributes": None if attributes is None else [str(a) for a in attributes]}
        self.resolution, self.feature_dim = int(resolution), int(feature_dim)
        self.heads = build_heads(attributes)
        self.head_index = {h.name: k for k, h in enumerate(self.heads)}
        self.out_dim = sum(h.width for h in self.heads)
        layers, cin = [], 3
        for w in widths:
            layers += [_conv(cin, w), _conv(w, w, stride=2)]
            cin = w
        self.body = nn.Sequential(*layers)
        # A 2x2 pool keeps coarse layout (head position, yaw side) that a global average would lose.
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Sequential(nn.Linear(4 * cin, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Linear(feature_dim, self.out_dim)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim) of images (B, 3, H, W) in [-1, 1]."""
        _check_images(x, "AttributeClassifier")
        h = self.body(_resize(x, self.resolution))
        return self.fc(self.pool(h).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        """Raw head outputs (B, out_dim) for images (B, 3, H, W) in [-1, 1]."""
        return self.head(self.features(x))

    def split(self, raw: Tensor) -> Dict[str, Tensor]:
        """Per-head slices of ``raw`` (B, out_dim): categorical (B, C) logits, regression (B,) in
        target units ([-1, 1] spans [low, high]), circular (B, 2) (cos, sin)."""
        out = {}
        for h in self.heads:
            part = raw[:, h.offset:h.offset + h.width]
            out[h.name] = part[:, 0] if h.kind == "regression" else part
        return out

    def decode(self, raw: Tensor) -> Dict[str, Tensor]:
        """Raw outputs (B, out_dim) -> predicted labels in ``labels.json`` units: categorical heads
        (B,) int64 class indices, others (B,) float (circular ones wrapped into [low, high))."""
        out = {}
        for h in self.heads:
            part = raw[:, h.offset:h.offset + h.width]
            span = h.high - h.low
            if h.kind == "categorical":
                out[h.name] = part.argmax(1)
            elif h.kind == "regression":
                out[h.name] = h.low + (part[:, 0] + 1.0) * 0.5 * span
            else:
                turn = torch.atan2(part[:, 1], part[:, 0]) / (2 * math.pi)
                out[h.name] = h.low + torch.remainder(turn, 1.0) * span
        return out

    def predict(self, x: Tensor) -> Dict[str, Tensor]:
        """Labels predicted for images (B, 3, H, W) in [-1, 1]; see ``decode``. Differentiable for the
        continuous labels (e.g. ``predict(x)["smile"]`` as an edit-success score)."""
        return self.decode(self(x))

    def probabilities(self, x: Tensor) -> Dict[str, Tensor]:
        """Softmax class probabilities (B, C) of every categorical head for images (B, 3, H, W)."""
        parts = self.split(self(x))
        return {h.name: parts[h.name].softmax(1) for h in self.heads if h.kind == "categorical"}

    def targets(self, labels: Tensor) -> Dict[str, Tensor]:
        """Training targets from label vectors (B, len(FACTOR_NAMES)) in ``FACTOR_NAMES`` order:
        categorical (B,) int64, regression (B,) in [-1, 1], circular (B, 2)."""
        if labels.dim() != 2 or labels.shape[1] != len(FACTOR_NAMES):
            raise ValueError(f"labels must be (B, {len(FACTOR_NAMES)}) in FACTOR_NAMES order, got {tuple(labels.shape)}")
        out = {}
        for h in self.heads:
            v = labels[:, h.column].float()
            u = (v - h.low) / (h.high - h.low)
            if h.kind == "categorical":
                out[h.name] = v.round().long()
            elif h.kind == "regression":
                out[h.name] = u * 2.0 - 1.0
            else:
                out[h.name] = torch.stack([torch.cos(2 * math.pi * u), torch.sin(2 * math.pi * u)], 1)
        return out

    def loss(self, raw: Tensor, labels: Tensor, weights: Optional[Mapping[str, float]] = None
             ) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Weighted mean over heads of cross-entropy (categorical) and ``REGRESSION_SCALE`` x MSE
        (regression, circular), each over the images where the label is visible.

        raw: (B, out_dim); labels: (B, len(FACTOR_NAMES)); weights: per-label multipliers (default 1).
        Returns (scalar loss, {label name: scalar loss of that head}).
        """
        weights = dict(weights or {})
        unknown = [k for k in weights if k not in self.head_index]
        if unknown:
            raise ValueError(f"loss weights name labels this classifier does not predict: {unknown}")
        parts, targets = self.split(raw), self.targets(labels)
        visible = visibility_mask(labels, self.heads)
        per_head, total, norm = {}, raw.new_zeros(()), 0.0
        for k, h in enumerate(self.heads):
            keep = visible[:, k]
            if not bool(keep.any()):
                continue
            pred, tgt = parts[h.name][keep], targets[h.name][keep]
            if h.kind == "categorical":
                value = F.cross_entropy(pred, tgt)
            else:
                value = REGRESSION_SCALE * F.mse_loss(pred, tgt, reduction="none").reshape(len(tgt), -1).sum(1).mean()
            per_head[h.name] = value
            w = float(weights.get(h.name, 1.0))
            total = total + w * value
            norm += w
        return total / max(norm, 1e-8), per_head


class FaceParser(nn.Module):
    """Tiny U-Net for SynthFaces part maps.

    Args:
        resolution: training image size; inputs are resized to it and the logits back to the input size.
        widths: channels at full, 1/2, 1/4, 1/8 ... resolution (encoder; the decoder mirrors them).
        num_classes: number of part classes (12 = ``PART_CLASSES``).
    ``forward(x)`` (B, 3, H, W) in [-1, 1] -> logits (B, num_classes, H, W); ``predict`` -> (B, H, W) int64.
    """

    def __init__(self, resolution: int = 64, widths: Sequence[int] = (12, 24, 48, 64), num_classes: int = NUM_PARTS):
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1 or num_classes < 2 or resolution < 2 ** (len(widths) - 1):
            raise ValueError(f"FaceParser: need >= 2 widths >= 1, num_classes >= 2 and resolution >= "
                             f"2**(len(widths)-1); got resolution={resolution}, widths={widths}, num_classes={num_classes}")
        self.config = {"resolution": int(resolution), "widths": widths, "num_classes": int(num_classes)}
        self.resolution, self.num_classes = int(resolution), int(num_classes)
        self.down = nn.ModuleList([_conv(3, widths[0])])
        for cin, cout in zip(widths[:-1], widths[1:]):
            self.down.append(nn.Sequential(_conv(cin, cout, stride=2), _conv(cout, cout)))
        self.up = nn.ModuleList([_conv(widths[k + 1] + widths[k], widths[k]) for k in reversed(range(len(widths) - 1))])
        self.out = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Part logits (B, num_classes, H, W) for images (B, 3, H, W) in [-1, 1]."""
        _check_images(x, "FaceParser")
        size = x.shape[-2:]
        h = _resize(x, self.resolution)
        skips = []
        for block in self.down:
            h = block(h)
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], 1))
        logits = self.out(h)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def predict(self, x: Tensor) -> Tensor:
        """Part map (B, H, W) int64 of class indices (``PART_CLASSES``)."""
        return self(x).argmax(1)


class SynthFacesFeatures(nn.Module):
    """Frozen ``AttributeClassifier`` penultimate features for ``FrechetInceptionDistance(feature=...)``.

    Input follows torchmetrics' contract: uint8 images (B, 3, H, W) in [0, 255], or float images in
    [0, 1] (build the metric with ``normalize=True``). Output (B, num_features) float32. Always in eval
    mode (BatchNorm running statistics), whatever mode the metric is switched to.
    """

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        if not isinstance(classifier, AttributeClassifier):
            raise TypeError(f"SynthFacesFeatures wraps an AttributeClassifier, got {type(classifier).__name__}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.feature_dim

    @classmethod
    def from_file(cls, path, map_location="cpu") -> "SynthFacesFeatures":
        """Feature network from an ``attribute_classifier.pt`` file."""
        return cls(load_attribute_classifier(path, map_location=map_location))

    def train(self, mode: bool = True) -> "SynthFacesFeatures":
        """Ignores ``mode``: the feature network stays in eval mode."""
        return super().train(False)

    def forward(self, imgs: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 [0, 255] or float [0, 1] -> features (B, num_features) float32."""
        _check_images(imgs, "SynthFacesFeatures")
        x = imgs.float() / 255.0 if imgs.dtype == torch.uint8 else imgs.float()
        with torch.no_grad():
            return self.classifier.features(x * 2.0 - 1.0)


# ---------------------------------------------------------------------------------------------- files
KINDS = {"attribute_classifier": AttributeClassifier, "face_parser": FaceParser}


def save_aux_net(path, net: nn.Module, meta: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``{"state_dict", "config", "meta"}`` for an AttributeClassifier or FaceParser to ``path``.

    ``meta`` must hold plain Python values (it is stored as given, plus ``kind``); returns the path.
    """
    kind = next((k for k, cls in KINDS.items() if type(net) is cls), None)
    if kind is None:
        raise TypeError(f"save_aux_net saves an AttributeClassifier or a FaceParser, got {type(net).__name__}")
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    payload = {"state_dict": state, "config": dict(net.config), "meta": {**dict(meta or {}), "kind": kind}}
    return save_atomic(payload, path)


def _load(path, kind: str, map_location) -> nn.Module:
    ckpt = safe_load(path, map_location=map_location)
    if not isinstance(ckpt, dict) or not {"state_dict", "config"} <= set(ckpt):
        raise CheckpointError(f"{path} is not an auxiliary-network file (expected a dict with 'state_dict', "
                              f"'config', 'meta')")
    found = (ckpt.get("meta") or {}).get("kind")
    if found is not None and found != kind:
        raise CheckpointError(f"{path} holds a '{found}' network, expected '{kind}'")
    try:
        net = KINDS[kind](**ckpt["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot build {KINDS[kind].__name__} from its config {ckpt['config']}: {err}") from None
    load_strict(net, ckpt["state_dict"], str(path))
    return net.eval()


def load_attribute_classifier(path, map_location="cpu") -> AttributeClassifier:
    """Strictly load an ``attribute_classifier.pt`` (weights_only); returns the net in eval mode.

    Raises ``networks.checkpoints.CheckpointError`` naming the file if it is missing, unsafe, another
    kind of network, or does not fit its config.
    """
    return _load(path, "attribute_classifier", map_location)


def load_face_parser(path, map_location="cpu") -> FaceParser:
    """Strictly load a ``face_parser.pt`` (weights_only); returns the net in eval mode (errors as
    ``load_attribute_classifier``)."""
    return _load(path, "face_parser", map_location)


def read_meta(path) -> Dict[str, Any]:
    """The ``meta`` dict of an auxiliary-network file (training metrics, label spec, producer)."""
    ckpt = safe_load(path)
    return dict(ckpt.get("meta") or {}) if isinstance(ckpt, dict) else {}


__all__ = ["AttributeClassifier", "AttributeHead", "FaceParser", "SynthFacesFeatures", "build_heads",
           "visibility_mask", "save_aux_net", "load_attribute_classifier", "load_face_parser", "read_meta",
           "CIRCULAR_FACTORS", "VISIBLE_IF", "PART_CLASSES"]
