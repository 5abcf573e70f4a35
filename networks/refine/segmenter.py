"""DHR's domain-specific segmentation as one object: coarse inversion, error maps, superpixels, parsing, sources.

``DomainSegmenter(images, codes, taps)`` returns the in-domain mask of a batch with the cues it used; the
stage-3 LightningModule and ``experiments/calibrate_segmentation.py`` both call it. The maths are the functions of
``networks.refine.segmentation``; the coarse inversion is ``networks.refine.projection.project``.

Settings: ``SegmentationConfig`` (``model.segmentation``, a Hydra ``_target_``; the one place of every default):
``source`` (error_superpixels | align_mask | both | ground_truth), ``coarse`` (``CoarseConfig``), ``lpips``
(``PerceptualConfig`` or None), ``error_scoring``, ``superpixels`` (``SuperpixelConfig``), ``slic_input``, the
parser, ``thresholds`` {class name: threshold}, ``default_threshold``, ``ood_classes``, ``align_threshold``.

``source: ground_truth`` is the oracle for evaluation: the in-domain mask is 1 - the data's ground-truth OOD mask,
which the caller hands over for one batch with ``with segmenter.given_ood_mask(mask): ...``; without it the
segmenter raises ``ValueError(ground_truth_missing(...))``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol, Tuple

import torch
from torch import nn

from networks.refine.projection import project
from networks.refine.segmentation import (align_mask_in_domain, combine_sources, ground_truth_in_domain,
                                          region_error, region_score_mask, superpixels, upsampled_error)

Tensor = torch.Tensor


def ground_truth_missing(detail: str) -> str:
    """The one message of the oracle source without a ground-truth mask (``detail``: what was missing where)."""
    return (f"model.segmentation.source=ground_truth is the evaluation oracle: it takes each image's ground-truth OOD "
            f"mask as the segmentation, but {detail}. Use it with mode=evaluate on data with OOD masks (SynthFaces "
            f"batches carry 'ood_mask') or with mode=invert masks=DIR; otherwise choose another source "
            f"(error_superpixels | align_mask | both)")


@dataclass
class CoarseConfig:
    """The DSS coarse inversion (a W projection whose perceptual error maps measure invertibility); defaults: the
    official GANInverter settings.

    Attributes:
        steps, lr: Adam steps / learning rate of the projection (official 40, 0.1; noise optimised).
        resolution: loss resolution (official 256); None = the image size, no resize.
        clamp: the synthesis clamped to [-1, 1] for the loss (official) or not.
        error_image: "last_step" (official: the last step's image, before its update) | "final" (the returned code's).
        start: "sampled_mean" (official: the mean of 10k mapped z) | "latent_avg" (the stage-1 file's average).
        noise_std: "unbiased" (official: noise renormalised by torch.std) | "biased" (PTI's population std).
        target_resize: "pil_uint8" (official: the 8-bit image resized by PIL) | "antialiased" (the float tensor).
    """

    steps: int = 40
    lr: float = 0.1
    resolution: Optional[int] = 256
    clamp: bool = True
    error_image: str = "last_step"
    start: str = "sampled_mean"
    noise_std: str = "unbiased"
    target_resize: str = "pil_uint8"


@dataclass
class PerceptualConfig:
    """The DSS net (``LPIPSLoss`` keyword arguments; official: LPIPS-VGG). Attributes: net, backbone_weights (a
    torchvision vgg16 / alexnet file), allow_random_backbone."""

    net: str = "vgg"
    backbone_weights: Optional[str] = None
    allow_random_backbone: bool = False


@dataclass
class SuperpixelConfig:
    """SLIC superpixels (``networks.refine.segmentation.superpixels``; official 200, 30, 1)."""

    n_segments: int = 200
    compactness: float = 30.0
    sigma: float = 1.0


@dataclass
class SegmentationConfig:
    """DHR's domain-specific segmentation settings (``model.segmentation``); defaults: the official DSS.

    Attributes:
        source: error_superpixels (official DSS) | align_mask (stage 2) | both (AND) | ground_truth (the oracle).
        coarse: ``CoarseConfig``; lpips: ``PerceptualConfig`` of the DSS net, None = share the refinement's net.
        error_scoring: official_per_layer | upsampled_sum (see ``networks.refine.segmentation.region_error``).
        superpixels: ``SuperpixelConfig``; slic_input: bgr_uint8 (official) | rgb_float.
        parser: face-parser file or None (no parsing: every region gets ``default_threshold``); parser_kind:
            synthfaces | bisenet; classes: class names in index order (None: the parser's own).
        thresholds: {class name: error threshold}; regions above it are OOD; default_threshold: the others'.
        ood_classes: parser classes always OOD; align_threshold: the stage-2 mask >= this is OOD.
    Nested settings may be given as mappings (Hydra passes plain dicts): they become the nested dataclasses.
    """

    source: str = "error_superpixels"
    coarse: CoarseConfig = field(default_factory=CoarseConfig)
    lpips: Optional[PerceptualConfig] = field(default_factory=PerceptualConfig)
    error_scoring: str = "official_per_layer"
    superpixels: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    slic_input: str = "bgr_uint8"
    parser: Optional[str] = None
    parser_kind: str = "synthfaces"
    classes: Optional[List[str]] = None
    thresholds: Dict[str, float] = field(default_factory=dict)
    default_threshold: float = 0.6
    ood_classes: List[str] = field(default_factory=list)
    align_threshold: float = 0.5

    def __post_init__(self):
        for name, cls in (("coarse", CoarseConfig), ("lpips", PerceptualConfig), ("superpixels", SuperpixelConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, cls(**value))


class LayerPerceptual(Protocol):
    """A perceptual distance with per-layer maps (``lightning_modules.perceptual.LPIPSLoss``)."""

    def __call__(self, x: Tensor, y: Tensor) -> Tensor: ...

    def layer_maps(self, x: Tensor, y: Tensor) -> List[Tensor]: ...


def load_parser(kind: str, path: str, classes: Optional[list], wanted: set) -> Tuple[nn.Module, Dict[str, int]]:
    """The face parser of ``model.segmentation.parser`` and its {class name: channel}; ValueError naming the key
    when ``classes`` does not fit the parser or ``wanted`` (thresholds and OOD classes) names an unknown class."""
    from networks.face_parsers import load_face_parsing

    parser = load_face_parsing(kind, Path(path).expanduser())
    names = classes or list(parser.class_names)
    if len(names) != parser.num_classes:
        raise ValueError(f"model.segmentation.classes lists {len(names)} names but the parser {path} predicts "
                         f"{parser.num_classes} classes")
    class_ids = {str(n): i for i, n in enumerate(names)}
    unknown = sorted(set(wanted) - set(class_ids))
    if unknown:
        raise ValueError(f"model.segmentation: unknown parser classes {unknown}; the parser {path} has "
                         f"{', '.join(class_ids)}")
    return parser, class_ids


class DomainSegmenter(nn.Module):
    """In-domain masks of images by the official DSS (error superpixels), the stage-2 mask, both, or the ground truth
    (the evaluation oracle; see ``given_ood_mask``).

    Args:
        generator: the frozen generator (the coarse W projection runs through it).
        latent_avg: (L, D) or (D,) average latent (the projection starts from its first row).
        settings: ``SegmentationConfig`` (``model.segmentation``), or a mapping of its fields.
        perceptual: the DSS net (coarse inversion loss and error maps); needed by error_superpixels and both.
        parser: face parser (``probabilities(images)`` (B, K, S, S)) or None (every region: the default threshold).
        class_ids: {class name: parser channel}.
        align_net: the stage-2 ``AlignMaskNet``; needed by align_mask and both.
        seed: seed of the coarse projection (image b of a batch uses seed + b).
    """

    def __init__(self, generator: nn.Module, latent_avg: Tensor, settings: SegmentationConfig | Mapping[str, Any],
                 perceptual: Optional[LayerPerceptual] = None, parser: Optional[nn.Module] = None,
                 class_ids: Optional[Mapping[str, int]] = None, align_net: Optional[nn.Module] = None, seed: int = 0):
        super().__init__()
        self.settings = settings if isinstance(settings, SegmentationConfig) else SegmentationConfig(**settings)
        self.source = self.settings.source
        self.generator, self.seed = generator, int(seed)
        self.register_buffer("latent_avg", latent_avg.reshape(-1, latent_avg.shape[-1]), persistent=False)
        self.perceptual, self.parser, self.align_net = perceptual, parser, align_net
        self.class_ids = dict(class_ids or {})
        self._ood_mask: Optional[Tensor] = None  # the oracle's mask of the current batch (given_ood_mask)
        if self.source in ("error_superpixels", "both") and perceptual is None:
            raise ValueError(f"DomainSegmenter: source {self.source!r} needs a perceptual net for its error maps")
        if self.source in ("align_mask", "both") and align_net is None:
            raise ValueError(f"DomainSegmenter: source {self.source!r} needs the stage-2 align_net")

    @contextmanager
    def given_ood_mask(self, ood_mask: Optional[Tensor]) -> Iterator["DomainSegmenter"]:
        """Within the block, ``source: ground_truth`` segments with ``ood_mask`` (B, 1, S, S), 1 = OOD (the batch's
        ground truth; None = no mask: segmenting raises). Other sources ignore it."""
        previous, self._ood_mask = self._ood_mask, ood_mask
        try:
            yield self
        finally:
            self._ood_mask = previous

    def error_maps(self, images: Tensor) -> List[Tensor]:
        """The DSS error cue of images (B, 3, S, S): per-layer perceptual maps [(B, 1, h_l, w_l)] between a coarse
        W projection (``settings.coarse``) and the images. Needs autograd enabled (the projection)."""
        c = self.settings.coarse
        # start "sampled_mean": the mean of 10,000 mapped z (what GANInverter's coarse inversion starts from when it
        # is given an encoder checkpoint); "latent_avg": the stage-1 file's average latent
        start = self.latent_avg[0] if c.start == "latent_avg" else None
        coarse = project(self.generator, images, perceptual=self.perceptual, latent_avg=start, space="w",
                         steps=int(c.steps), lr=float(c.lr), seed=self.seed, loss_resolution=c.resolution,
                         clamp=bool(c.clamp), noise_std=c.noise_std, target_resize=c.target_resize)
        image = coarse.last_step_images if c.error_image == "last_step" else coarse.images
        with torch.no_grad():
            return self.perceptual.layer_maps(image, images)

    @torch.no_grad()
    def regions(self, images: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """SLIC superpixel labels (B, S, S) int64 and the parser's class probabilities (B, K, S, S) or None."""
        s = self.settings
        labels = superpixels(images, **asdict(s.superpixels), slic_input=s.slic_input)
        probs = self.parser.probabilities(images) if self.parser is not None else None
        return labels, probs

    def error_in_domain(self, maps: List[Tensor], labels: Tensor, probs: Optional[Tensor],
                        thresholds: Optional[Mapping[str, float]] = None,
                        default_threshold: Optional[float] = None) -> Tensor:
        """(B, 1, S, S) in {0, 1}: superpixels whose error score is under their class's threshold (parser classes
        in ``ood_classes`` always OOD). ``thresholds`` / ``default_threshold`` replace the settings' (calibration)."""
        s = self.settings
        thresholds = s.thresholds if thresholds is None else thresholds
        default = s.default_threshold if default_threshold is None else default_threshold
        scores = region_error(maps, labels, s.error_scoring)
        return region_score_mask(scores, labels, probs, {self.class_ids[k]: float(v) for k, v in thresholds.items()},
                                 float(default), [self.class_ids[c] for c in s.ood_classes])

    def forward(self, images: Tensor, codes: Tensor, taps: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Segment images (B, 3, S, S) in [-1, 1] with their W+ codes (B, L, D) and encoder taps.

        Returns {"in_domain" (B, 1, S, S) in {0, 1}, plus the cues used: "error_map" (B, 1, S, S),
        "error_in_domain" (B, 1, S, S), "align_mask" (B, 1, S, S) 1 = OOD, "ground_truth" (B, 1, S, S) 1 = OOD}.
        """
        out: Dict[str, Tensor] = {}
        if self.source == "ground_truth":
            gt = self._ood_mask
            if gt is None:
                raise ValueError(ground_truth_missing("no ground-truth OOD mask was given for this batch"))
            if gt.ndim != 4 or gt.shape[0] != images.shape[0] or gt.shape[1] != 1 or \
                    gt.shape[-2:] != images.shape[-2:]:
                raise ValueError(f"model.segmentation.source=ground_truth: the ground-truth OOD mask "
                                 f"{tuple(gt.shape)} does not fit the images {tuple(images.shape)} (need (B, 1, H, W))")
            gt = gt.to(images.device)
            out["ground_truth"] = gt
            out["in_domain"] = combine_sources(self.source, truth_in=ground_truth_in_domain(gt))
            return out
        error_in = align_in = None
        if self.source != "align_mask":
            maps = self.error_maps(images)
            labels, probs = self.regions(images)
            error_in = self.error_in_domain(maps, labels, probs)
            out.update(error_map=upsampled_error(maps, images.shape[-2:]), error_in_domain=error_in)
        if self.source != "error_superpixels":
            with torch.no_grad():
                mask = self.align_net(self.generator, codes, taps, images).mask
            align_in = align_mask_in_domain(mask, float(self.settings.align_threshold))
            out["align_mask"] = mask
        out["in_domain"] = combine_sources(self.source, error_in, align_in)
        return out
