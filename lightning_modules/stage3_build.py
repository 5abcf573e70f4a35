"""From the ``model`` config of stage 3 to a method object (``networks.refine.methods``), checked before any image.

``model.refine`` / ``pti`` / ``feature_only`` / ``segmentation`` are dataclasses (``RefineConfig``, ``PTIConfig``,
``FeatureOnlyConfig``, ``SegmentationConfig``) that Hydra instantiates from their ``_target_``: each default has one
place, the dataclass. ``as_config`` takes such an instance or a mapping of its fields (Python callers);
``check_segmentation`` checks ``model.segmentation``; ``load_align_net`` reads a stage-2 hand-off made for the same
generator; ``build_segmenter`` / ``build_method`` assemble the parts a method needs.
"""
from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any, Mapping, Optional, Type, TypeVar

from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_modules.perceptual import LPIPSLoss
from networks.align_mask import load_align_mask
from networks.checkpoints import CheckpointError, check_same_generator
from networks.refine.hybrid import RefineConfig
from networks.refine.projection import NOISE_STDS, TARGET_RESIZES
from networks.refine.methods import (DHR, E4E, METHODS, PTI, FeatureOnly, FeatureOnlyConfig, Method, OODBlend,
                                     PTIConfig)
from networks.refine.segmentation import ERROR_SCORINGS, SEGMENTATION_SOURCES, SLIC_INPUTS
from networks.refine.segmenter import DomainSegmenter, SegmentationConfig, load_parser

C = TypeVar("C")

def as_config(value: Any, cls: Type[C]) -> C:
    """``value`` as the settings dataclass ``cls``: Hydra passes an instance (``_target_``); a mapping holds some of
    its fields (nested settings may be mappings too), None means all the dataclass's defaults."""
    return value if isinstance(value, cls) else cls(**(value or {}))


def check_segmentation(seg: SegmentationConfig) -> SegmentationConfig:
    """``seg``, or ValueError naming the ``model.segmentation`` key whose value is not valid (before any image)."""
    if seg.source not in SEGMENTATION_SOURCES:
        raise ValueError(f"model.segmentation.source={seg.source!r}; choose one of {', '.join(SEGMENTATION_SOURCES)}")
    c = seg.coarse
    choices = {"error_scoring": (seg.error_scoring, ERROR_SCORINGS), "slic_input": (seg.slic_input, SLIC_INPUTS),
               "coarse.error_image": (c.error_image, ("last_step", "final")),
               "coarse.start": (c.start, ("sampled_mean", "latent_avg")),
               "coarse.noise_std": (c.noise_std, NOISE_STDS), "coarse.target_resize": (c.target_resize, TARGET_RESIZES)}
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ValueError(f"model.segmentation.{key}={value!r}; choose one of {', '.join(valid)}")
    if c.resolution is not None and (isinstance(c.resolution, bool) or not isinstance(c.resolution, int)
                                     or c.resolution < 1):
        raise ValueError(f"model.segmentation.coarse.resolution={c.resolution!r}; a positive size or null (the image "
                         f"size)")
    for key, value in (("coarse.steps", c.steps), ("superpixels.n_segments", seg.superpixels.n_segments)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model.segmentation.{key}={value!r}; must be an integer >= 1")
    if isinstance(c.lr, bool) or not isinstance(c.lr, (int, float)) or not math.isfinite(c.lr) or c.lr <= 0:
        raise ValueError(f"model.segmentation.coarse.lr={c.lr!r}; must be a number > 0")
    return seg


def method_class(method: str) -> type:
    """The ``Method`` subclass of ``model.method``: a name in ``networks.refine.methods.METHODS``, or the dotted path
    of a class (``my_package.my_module.MyMethod``); ValueError naming the key otherwise."""
    if method in METHODS:
        return METHODS[method]
    module, _, name = str(method).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"model.method={method!r} is not a stage-3 method; choose one of {', '.join(METHODS)} "
                         f"(or the dotted path of a networks.refine.methods.Method subclass)")
    return cls


def needs_align_net(method: str, seg: SegmentationConfig) -> bool:
    """Whether ``method`` with segmentation ``seg`` needs the stage-2 net."""
    return method_class(method).needs_align_net or (method == "dhr" and seg.source in ("align_mask", "both"))


def needs_error_map(method: str, seg: SegmentationConfig) -> bool:
    """Whether ``method`` runs the DSS error cue (coarse inversion, superpixels, parser)."""
    return seg.source in ("error_superpixels", "both") and (method == "dhr" or "segmenter" in inspect.signature(
        method_class(method)).parameters)


def load_align_net(path: Optional[str], generator: nn.Module, encoder_checkpoint: str, why: str) -> nn.Module:
    """The frozen stage-2 net of ``model.align_mask_checkpoint``, refused when made for another generator."""
    if not path:
        raise ValueError(f"{why} needs model.align_mask_checkpoint (a stage-2 align_mask.pt, e.g. from +exp=ood_blend)")
    net, meta = load_align_mask(path)
    check_same_generator(generator, meta.get("generator"), meta.get("generator_sha1"),
                         theirs=f"model.align_mask_checkpoint={path}",
                         ours=f"model.encoder_checkpoint={encoder_checkpoint}")
    return net.requires_grad_(False)


def grid_align_net(path: Optional[str], generator: nn.Module, encoder_checkpoint: str) -> Optional[nn.Module]:
    """The stage-2 net for the edit grid's stage-2 row of a method that does not need it: a file that does not fit
    only costs that row (the method's own results do not depend on it)."""
    if not path:
        return None
    try:
        return load_align_net(path, generator, encoder_checkpoint, "the edit grid")
    except CheckpointError as err:
        rank_zero_warn(f"The edit grid has no stage-2 row: {err}")
        return None


def build_segmenter(seg: SegmentationConfig, generator: nn.Module, latent_avg, lpips: nn.Module,
                    align_net: Optional[nn.Module], seed: int, error_map: bool):
    """(``DomainSegmenter``, its DSS perceptual net or None when it shares ``lpips``, parser or None, class ids)."""
    parser, class_ids, seg_lpips = None, {}, None
    if error_map:
        if seg.parser:
            parser, class_ids = load_parser(seg.parser_kind, seg.parser, seg.classes,
                                            set(seg.thresholds) | set(seg.ood_classes))
        if seg.lpips is not None:
            seg_lpips = LPIPSLoss(**asdict(seg.lpips), key="model.segmentation.lpips.backbone_weights")
    segmenter = DomainSegmenter(generator, latent_avg, seg, perceptual=(seg_lpips or lpips) if error_map else None,
                                parser=parser, class_ids=class_ids, align_net=align_net, seed=seed)
    return segmenter, seg_lpips, parser, class_ids


def build_method(method: str, generator: nn.Module, lpips: nn.Module, config: RefineConfig, pti: PTIConfig,
                 feature_only: FeatureOnlyConfig, align_net: Optional[nn.Module],
                 segmenter: Optional[DomainSegmenter]) -> Method:
    """The ``networks.refine.methods`` object of ``model.method`` with its settings."""
    if method == "e4e":
        return E4E(generator)
    if method == "ood_blend":
        return OODBlend(generator, align_net)
    if method == "pti":
        return PTI(generator, lpips, config, **asdict(pti))
    if method == "feature_only":
        return FeatureOnly(generator, lpips, config, **asdict(feature_only))
    if method == "dhr":
        return DHR(generator, lpips, config, segmenter)
    cls = method_class(method)  # another method: the parts its constructor names
    parts = {"generator": generator, "perceptual": lpips, "config": config, "align_net": align_net,
             "segmenter": segmenter}
    return cls(**{k: v for k, v in parts.items() if k in inspect.signature(cls).parameters})


def build_parts(method: str, generator: nn.Module, latent_avg, encoder_checkpoint: str,
                align_mask_checkpoint: Optional[str], refine: RefineConfig, pti: PTIConfig,
                feature_only: FeatureOnlyConfig, segmentation: SegmentationConfig, lpips: Mapping,
                seed: int) -> SimpleNamespace:
    """Everything ``RefineModule`` holds for ``model.method``, checked before any image: ``segmentation`` (settings),
    ``align_net`` (or None), ``lpips`` (the refinement's net), ``segmentation_lpips`` / ``parser`` (or None),
    ``class_ids`` and ``refiner`` (the ``Method``)."""
    seg = check_segmentation(segmentation)
    if needs_align_net(method, seg):
        align_net = load_align_net(align_mask_checkpoint, generator, encoder_checkpoint,
                                   f"model.method={method} with model.segmentation.source={seg.source}")
    else:
        align_net = grid_align_net(align_mask_checkpoint, generator, encoder_checkpoint)
    net = LPIPSLoss(**lpips)
    segmenter, seg_lpips, parser, class_ids = None, None, None, {}
    if method == "dhr" or "segmenter" in inspect.signature(method_class(method)).parameters:
        segmenter, seg_lpips, parser, class_ids = build_segmenter(seg, generator, latent_avg, net, align_net, seed,
                                                                  needs_error_map(method, seg))
    refiner = build_method(method, generator, net, refine, pti, feature_only, align_net, segmenter)
    return SimpleNamespace(segmentation=seg, align_net=align_net, lpips=net, segmentation_lpips=seg_lpips,
                           parser=parser, class_ids=class_ids, refiner=refiner)
