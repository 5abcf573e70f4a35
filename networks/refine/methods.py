"""The stage-3 methods: one class each, the same two calls.

Every method starts from the stage-1 encoder's W+ code (GANInverter's "embedding" stage) and offers

* ``invert(images, codes, taps)`` -> a result dict for a batch: {"output" (B, 3, S, S), "codes" (B, L, D), "taps",
  "ood_mask" (B, 1, S, S) 1 = OOD or None, "state" ``RefineState`` or None, "segmentation" dict};
* ``render(result, images, codes=None)`` -> (B, 3, S, S): the result decoded the way the method decodes, at
  ``codes`` (an edit of ``result["codes"]``; None = the unedited output).

============  ======================================================================================
E4E           no refinement: G(codes)
OODBlend      stage two alone: alignment + invertibility-mask blend (the stage-2 ``AlignMaskNet``)
DHR           domain segmentation, then weights on the in-domain part and the feature on the rest
PTI           DHR with an all-in-domain mask: weights only, on the whole image (PTI's loss, official steps)
FeatureOnly   DHR with an all-OOD mask: the feature only, on the whole image
============  ======================================================================================

``METHODS`` maps the config names (``model.method``) to the classes. A new method is one subclass of ``Method``
(plus one config file); see the README's "Add a method". Plain PyTorch: the perceptual net, parser and stage-2
net are passed in.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from networks.refine.hybrid import RefineConfig, decode, hybrid_refine

Tensor = torch.Tensor


class Method(nn.Module):
    """Base of the stage-3 methods (see the module docstring). Subclasses set ``name`` and override ``invert``
    and, when they do not decode with ``generator.synthesize``, ``render``.

    Args:
        generator: the frozen stage-1 generator.
    """

    name = ""
    #: the method's segmentation needs these (the LightningModule loads them only then)
    needs_align_net = False

    def __init__(self, generator: nn.Module):
        super().__init__()
        self.generator = generator

    def settings(self) -> Dict[str, Any]:
        """What, beyond the config, defines this method's results (stored in each ``mode=invert`` record)."""
        return {}

    def invert(self, images: Tensor, codes: Tensor, taps: Mapping[str, Tensor]) -> Dict[str, Any]:
        """Images (B, 3, S, S) in [-1, 1], their W+ codes (B, L, D) and encoder taps -> the result dict."""
        with torch.no_grad():
            output = self.generator.synthesize(codes).image
        return {"output": output, "codes": codes, "taps": taps, "ood_mask": None, "state": None, "segmentation": {}}

    @torch.no_grad()
    def render(self, result: Mapping[str, Any], images: Tensor, codes: Optional[Tensor] = None) -> Tensor:
        """The result at ``codes`` (B, L, D) (None = its own codes): (B, 3, S, S)."""
        return self.generator.synthesize(result["codes"] if codes is None else codes).image


class E4E(Method):
    """Stage 1 alone: G(codes)."""

    name = "e4e"


class OODBlend(Method):
    """Stage 2 alone: the ``AlignMaskNet`` aligns the input to G(codes) and blends where its mask says OOD; an edit
    keeps the input's mask (and its error cue)."""

    name = "ood_blend"
    needs_align_net = True

    def __init__(self, generator: nn.Module, align_net: nn.Module):
        super().__init__(generator)
        self.align_net = align_net

    def invert(self, images, codes, taps):
        with torch.no_grad():
            blended = self.align_net(self.generator, codes, taps, images)
        return {"output": blended.output, "codes": codes, "taps": taps, "ood_mask": blended.mask, "state": None,
                "segmentation": {}}

    @torch.no_grad()
    def render(self, result, images, codes=None):
        if codes is None:
            return result["output"]
        return self.align_net(self.generator, codes, result["taps"], images, cue_codes=result["codes"]).output


class HybridRefinement(Method):
    """Per-image hybrid modulation (``networks.refine.hybrid``): tuned weights on the in-domain part, a tuned
    feature f* on the rest. Subclasses say where the domain is (``in_domain``).

    Args:
        generator: the frozen generator.
        perceptual: the refinement's perceptual net (``LPIPSLoss``: ``__call__`` and ``masked_layer_distance``).
        config: ``RefineConfig``.
    """

    def __init__(self, generator: nn.Module, perceptual: nn.Module, config: RefineConfig):
        super().__init__(generator)
        self.perceptual, self.config = perceptual, config

    def settings(self) -> Dict[str, Any]:
        return {"refinement": asdict(self.config)}

    def in_domain(self, images: Tensor, codes: Tensor, taps) -> tuple:
        """(in-domain mask (B, 1, S, S), OOD mask to report or None, segmentation dict)."""
        raise NotImplementedError

    def invert(self, images, codes, taps):
        in_domain, ood_mask, segmentation = self.in_domain(images, codes, taps)
        state = hybrid_refine(self.generator, codes, images, in_domain, self.perceptual, self.config)
        with torch.no_grad():
            output = decode(self.generator, state, codes)
        return {"output": output, "codes": codes, "taps": taps, "ood_mask": ood_mask, "state": state,
                "segmentation": segmentation}

    @torch.no_grad()
    def render(self, result, images, codes=None):
        """Tuned weights, f* and its mask at ``codes``: the OOD content stays frozen at the feature level."""
        if codes is None:
            return result["output"]
        return decode(self.generator, result["state"], codes)


class DHR(HybridRefinement):
    """Domain-Specific Hybrid Refinement: ``segmenter`` (a ``DomainSegmenter``) decides the domain."""

    name = "dhr"

    def __init__(self, generator: nn.Module, perceptual: nn.Module, config: RefineConfig,
                 segmenter: Callable[..., Dict[str, Tensor]]):
        super().__init__(generator, perceptual, config)
        self.segmenter = segmenter

    def in_domain(self, images, codes, taps):
        segmentation = self.segmenter(images, codes, taps)
        return segmentation["in_domain"], 1 - segmentation["in_domain"], segmentation


class PTI(HybridRefinement):
    """Pivotal tuning on the encoder code (GANInverter's variant): DHR with everything in domain, weights only,
    official PTI's loss on the whole image (plain LPIPS = per_layer with a mask of ones, plus ``F.mse_loss``).

    Args:
        generator, perceptual: as ``HybridRefinement``.
        config: the DHR ``RefineConfig`` (its loss weights, feature resolution and divergence check are kept).
        steps, lr: Adam steps / learning rate of the weights (official PTI: 350, 3e-4).
    """

    name = "pti"

    def __init__(self, generator: nn.Module, perceptual: nn.Module, config: RefineConfig, steps: int = 350,
                 lr: float = 3e-4):
        super().__init__(generator, perceptual, self.refine_config(config, steps, lr))

    @staticmethod
    def refine_config(config: RefineConfig, steps: int = 350, lr: float = 3e-4) -> RefineConfig:
        """PTI's ``RefineConfig`` from DHR's ``config``: weights only, official PTI's whole-image loss."""
        return RefineConfig(
            weight_steps=int(steps), weight_lr=float(lr), feature_steps=0, feature_resolution=config.feature_resolution,
            l2=config.l2, perceptual=config.perceptual, mse_normalisation="per_channel", lpips_mask="per_layer",
            divergence_factor=config.divergence_factor)

    def in_domain(self, images, codes, taps):
        b, _, s, _ = images.shape
        return images.new_ones(b, 1, s, s), None, {}


@dataclass
class PTIConfig:
    """``model.pti``: Adam steps / learning rate of PTI's weights (official PTI: 350, 3e-4)."""

    steps: int = 350
    lr: float = 3e-4


@dataclass
class FeatureOnlyConfig:
    """``model.feature_only``: Adam steps / learning rate of the feature map (default: DHR's official feature settings,
    ``RefineConfig``'s 100 steps at 0.09)."""

    steps: int = RefineConfig.feature_steps
    lr: float = RefineConfig.feature_lr


class FeatureOnly(HybridRefinement):
    """Feature modulation of one generator feature map on the whole image: DHR with everything OOD.

    Args:
        generator, perceptual: as ``HybridRefinement``.
        config: the DHR ``RefineConfig``; steps, lr, resolution: override its feature settings (None = DHR's).
    """

    name = "feature_only"

    def __init__(self, generator: nn.Module, perceptual: nn.Module, config: RefineConfig,
                 steps: Optional[int] = None, lr: Optional[float] = None, resolution: Optional[int] = None):
        super().__init__(generator, perceptual, self.refine_config(config, steps, lr, resolution))

    @staticmethod
    def refine_config(config: RefineConfig, steps: Optional[int] = None, lr: Optional[float] = None,
                      resolution: Optional[int] = None) -> RefineConfig:
        """Feature-only's ``RefineConfig`` from DHR's ``config``: no weight steps; feature settings overridable."""
        return RefineConfig(
            weight_steps=0, feature_steps=int(config.feature_steps if steps is None else steps),
            feature_lr=float(config.feature_lr if lr is None else lr),
            feature_resolution=config.feature_resolution if resolution is None else resolution, l2=config.l2,
            perceptual=config.perceptual, mse_normalisation=config.mse_normalisation, lpips_mask=config.lpips_mask,
            divergence_factor=config.divergence_factor)

    def in_domain(self, images, codes, taps):
        b, _, s, _ = images.shape
        return images.new_zeros(b, 1, s, s), None, {}


METHODS: Dict[str, type] = {cls.name: cls for cls in (E4E, PTI, FeatureOnly, OODBlend, DHR)}
