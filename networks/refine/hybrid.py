"""Hybrid modulation refinement, DHR stage C (methods.md §3.3), batched and per-sample independent.

Given W+ codes, target images and an in-domain mask m (1 = in domain, see ``networks.refine.segmentation``):

- a feature f* at one generator resolution r (default ``G.size // 8``: 128 for a 1024 px G) is initialised with
  G's own output of the r block and swapped in where the next block receives it (``Generator.next_block_input``:
  "convs.10.in" at 1024 px, the official ``feature_idx`` 11; the r block's own ToRGB keeps G's feature) as
  ``h <- h * m_r + f* * (1 - m_r)``, where m_r = adaptive-average-pooled m (soft at region borders);
- f* is tuned (Adam) on the out-of-domain loss L_ood = LPIPS and MSE inside 1 - m;
- a per-image copy of the synthesis weights is tuned (Adam) on the in-domain loss L_id = the same inside m,
  for the first ``weight_steps`` steps only;
- by default both losses are normalised as the official code does (``RefineConfig.lpips_mask`` "per_layer",
  ``mse_normalisation`` "official"): with a batch of one the result equals the official one to round-off
  (``tests/test_dhr_official.py``).

Differences from the official ``DHRInference`` (methods.md §3.8), none of which changes a single image's result:
- any batch size: each image has its own weights (``networks.stylegan2.per_sample``) and f*; the losses are
  per-sample and summed, and Adam is elementwise, so a batch of N gives the N single-image results;
- one forward per step and one backward per variable set (``torch.autograd.grad`` of L_ood w.r.t. f* and of
  L_id w.r.t. the weights), not two backward passes through everything;
- an empty mask gives a 0 loss term (the official code divides by 0);
- a sample whose loss or gradients become non-finite is marked ``failed`` and frozen at its last finite
  state while the rest of the batch continues;
- the hand-off per image stores the weight delta in bfloat16 instead of a full generator state dict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F

from networks.resolution import is_power_of_two
from networks.stylegan2 import Generator, call_with_params, expand_params


class Perceptual(Protocol):
    """A masked perceptual distance such as ``LPIPSLoss`` (see ``domain_losses`` for which method is used)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def masked_layer_distance(self, x: torch.Tensor, y: torch.Tensor,
                              masks: Sequence[torch.Tensor]) -> torch.Tensor: ...


TUNE_CHOICES = ("synthesis",)
MSE_NORMALISATIONS = ("official", "per_channel")
LPIPS_MASKS = ("per_layer", "full_resolution")
WEIGHT_FORMATS = ("delta_bf16", "full", "none")


# ------------------------------------------------------------------------------------------------ config
@dataclass
class RefineConfig:
    """DHR refinement settings (defaults: the official ``dhr.yaml``).

    Attributes:
        weight_steps, weight_lr: Adam steps / learning rate of the per-image generator weights (in-domain loss).
        feature_steps, feature_lr: Adam steps / learning rate of f* (out-of-domain loss). The loop runs
            max(weight_steps, feature_steps) steps; each variable set is updated during its first N steps.
        feature_resolution: r of f* (power of two, 4 <= r < G.size); None = G.size // 8.
        l2, perceptual: weights of the masked MSE and of the masked perceptual distance in both losses.
        tune: which weights are tuned: "synthesis" = every parameter except the mapping network.
        mse_normalisation: "official" = sum((out - x)^2 m) / sum(m) (summed over the 3 channels);
            "per_channel" = the same / 3 (ours: a per-channel mean, so ``l2`` weighs it like a plain MSE; it is
            a third of the official L2 weight).
        lpips_mask: "per_layer" (official) = each LPIPS layer's map averaged inside m_r nearest-resized to that
            layer, summed over layers (``LPIPSLoss.masked_layer_distance``); "full_resolution" = the summed
            full-resolution map averaged inside the binary m (ours: no soft border at the coarse layers).
        divergence_factor: an image whose last loss ends above this factor x its first loss is marked failed
            ("diverged") instead of being saved as a result (ours, the official code has no check; it changes no
            image that converges); None = off.
    """

    weight_steps: int = 50
    weight_lr: float = 1.5e-3
    feature_steps: int = 100
    feature_lr: float = 9e-2
    feature_resolution: Optional[int] = None
    l2: float = 1.0
    perceptual: float = 1.0
    tune: str = "synthesis"
    mse_normalisation: str = "official"
    lpips_mask: str = "per_layer"
    divergence_factor: Optional[float] = 10.0

    def __post_init__(self):
        for name in ("weight_steps", "feature_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"RefineConfig.{name} must be an int >= 0, got {v!r}")
        for name in ("weight_lr", "feature_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"RefineConfig.{name} must be a finite number > 0, got {v!r}")
        for name in ("l2", "perceptual"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"RefineConfig.{name} must be a finite number >= 0, got {v!r}")
        d = self.divergence_factor
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not d > 1):
            raise ValueError(f"RefineConfig.divergence_factor must be None or a number > 1, got {d!r}")
        r = self.feature_resolution
        if r is not None and not (is_power_of_two(r) and r >= 4):
            raise ValueError(f"RefineConfig.feature_resolution must be None or a power of two >= 4, got {r!r}")
        for name, choices in (("tune", TUNE_CHOICES), ("mse_normalisation", MSE_NORMALISATIONS),
                              ("lpips_mask", LPIPS_MASKS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"RefineConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")

    def resolution_for(self, G: Generator) -> int:
        """The feature resolution r used with generator ``G`` (checks 4 <= r < G.size: f* enters the next block)."""
        r = self.feature_resolution if self.feature_resolution is not None else G.size // 8
        if not (is_power_of_two(r) and 4 <= r < G.size):
            raise ValueError(f"RefineConfig.feature_resolution={r} must be a power of two from 4 to half the "
                             f"generator size {G.size}")
        return r


@dataclass
class RefineState:
    """Result of ``hybrid_refine`` for a batch of B images (everything detached).

    Attributes:
        params: {name: (B, *shape)} tuned synthesis parameters, or None (weights not tuned: G's own).
        feature: (B, C, r, r) f*, or None (no feature modulation).
        mask_r: (B, 1, r, r) in-domain mask pooled to r (blend weight of G's own feature).
        in_domain: (B, 1, S, S) full-resolution in-domain mask.
        point: generator hook point of f* (``Generator.next_block_input(r)``).
        losses: (steps, B) per-sample total loss L_ood + L_id of every step's forward (before its update).
        failed: (B,) bool, True where the loss or gradients became non-finite (state frozen from then on) or the
            refinement diverged.
        diverged: (B,) bool, True where the last loss ended above ``divergence_factor`` x the first (also failed).
    """

    params: Optional[Dict[str, torch.Tensor]]
    feature: Optional[torch.Tensor]
    mask_r: torch.Tensor
    in_domain: torch.Tensor
    point: str
    losses: torch.Tensor
    failed: torch.Tensor
    diverged: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        """B."""
        return self.mask_r.shape[0]


# ------------------------------------------------------------------------------------------------ pieces
def feature_mask(in_domain: torch.Tensor, r: int) -> torch.Tensor:
    """Pool an in-domain mask (B, 1, S, S) to (B, 1, r, r) by adaptive averaging (soft at region borders).

    Floating masks keep their dtype; others become float32."""
    if not isinstance(in_domain, torch.Tensor) or in_domain.ndim != 4 or in_domain.shape[1] != 1:
        got = tuple(in_domain.shape) if isinstance(in_domain, torch.Tensor) else type(in_domain).__name__
        raise ValueError(f"feature_mask: in_domain must be (B, 1, S, S), got {got}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"feature_mask: r must be a positive int, got {r!r}")
    m = in_domain if in_domain.is_floating_point() else in_domain.float()
    return F.adaptive_avg_pool2d(m, (r, r))


def masked_mse(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
               normalisation: str = "official") -> torch.Tensor:
    """Per-sample squared error inside a mask, 0 for an empty mask.

    x, y: (B, C, H, W); mask: (B, 1, H, W) in [0, 1]. ``normalisation`` "official": sum((x - y)^2 * mask) / sum(mask)
    (DHR's masked MSE: summed over channels); "per_channel": the same / C (a mean). Returns (B,).
    """
    if normalisation not in MSE_NORMALISATIONS:
        raise ValueError(f"masked_mse: normalisation must be one of {MSE_NORMALISATIONS}, got {normalisation!r}")
    num = ((x - y) ** 2 * mask).sum(dim=(1, 2, 3))
    den = mask.sum(dim=(1, 2, 3)) * (x.shape[1] if normalisation == "per_channel" else 1)
    return num / den.clamp_min(1e-8)


def _perceptual_terms(out, images, in_domain, mask_r, perceptual, config) -> Tuple[torch.Tensor, torch.Tensor]:
    if config.lpips_mask == "full_resolution":
        return (perceptual(out, images, 1 - in_domain).reshape(-1),
                perceptual(out, images, in_domain).reshape(-1))
    if mask_r is None:
        raise ValueError("domain_losses: lpips_mask='per_layer' needs mask_r (the in-domain mask pooled to r)")
    ood, idd = perceptual.masked_layer_distance(out, images, [1 - mask_r, mask_r]).unbind(0)
    return ood, idd


def domain_losses(out: torch.Tensor, images: torch.Tensor, in_domain: torch.Tensor, perceptual: Perceptual,
                  config: RefineConfig, mask_r: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two DHR losses per sample: (L_ood (B,), L_id (B,)).

    L_ood = P_ood * config.perceptual + masked_mse(out, images, 1 - m, config.mse_normalisation) * config.l2,
    L_id = the same inside m = ``in_domain`` (B, 1, S, S). The perceptual terms P: ``config.lpips_mask``
    "per_layer": ``perceptual.masked_layer_distance(out, images, [1 - mask_r, mask_r])`` with mask_r (B, 1, r, r)
    = ``feature_mask(in_domain, r)`` (required); "full_resolution": ``perceptual(out, images, 1 - m)`` and
    ``perceptual(out, images, m)``. A zero weight skips that term's computation.
    """
    l_ood, l_id = out.new_zeros(out.shape[0]), out.new_zeros(out.shape[0])
    if config.perceptual:
        p_ood, p_id = _perceptual_terms(out, images, in_domain, mask_r, perceptual, config)
        l_ood, l_id = l_ood + p_ood * config.perceptual, l_id + p_id * config.perceptual
    if config.l2:
        l_ood = l_ood + masked_mse(out, images, 1 - in_domain, config.mse_normalisation) * config.l2
        l_id = l_id + masked_mse(out, images, in_domain, config.mse_normalisation) * config.l2
    return l_ood, l_id


def _render(G: Generator, params: Optional[Dict[str, torch.Tensor]], feature: Optional[torch.Tensor],
            mask_r: torch.Tensor, point: str, codes: torch.Tensor, noise: Sequence[torch.Tensor]) -> torch.Tensor:
    if params is None:
        # G's own weights, detached so that no graph (and no grad) ever reaches G's parameters.
        params = {n: p.detach() for n, p in G.named_parameters() if not n.startswith("style.")}
    edits = {}
    if feature is not None:
        edits[point] = lambda h: h * mask_r + feature * (1 - mask_r)
    return call_with_params(G, params, "synthesize", codes, noise=list(noise), edits=edits).image


def _noise_list(G: Generator, noise, device) -> List[torch.Tensor]:
    if noise is None:
        return [n.detach() for n in G.stored_noise()]
    noise = list(noise)
    if len(noise) != G.num_layers or any(not isinstance(n, torch.Tensor) for n in noise):
        raise ValueError(f"noise must be a list of {G.num_layers} tensors (one per noise layer; None entries would "
                         f"draw random noise and make refinement non-deterministic)")
    return [n.detach().to(device) for n in noise]


def _check_inputs(G: Generator, codes, images, in_domain) -> None:
    if not isinstance(codes, torch.Tensor) or codes.ndim != 3 or codes.shape[1] != G.n_latent \
            or codes.shape[2] != G.style_dim:
        got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"hybrid_refine: codes must be (B, {G.n_latent}, {G.style_dim}) W+ codes, got {got}")
    B, S = codes.shape[0], G.size
    if not isinstance(images, torch.Tensor) or tuple(images.shape) != (B, 3, S, S):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"hybrid_refine: images must be ({B}, 3, {S}, {S}) (batch of codes, generator size), "
                         f"got {got}")
    if not isinstance(in_domain, torch.Tensor) or tuple(in_domain.shape) != (B, 1, S, S):
        got = tuple(in_domain.shape) if isinstance(in_domain, torch.Tensor) else type(in_domain).__name__
        raise ValueError(f"hybrid_refine: in_domain must be ({B}, 1, {S}, {S}), got {got}")
    if in_domain.numel() and (float(in_domain.min()) < 0 or float(in_domain.max()) > 1):
        raise ValueError(f"hybrid_refine: in_domain must lie in [0, 1] (1 = in domain), got values in "
                         f"[{float(in_domain.min()):g}, {float(in_domain.max()):g}]")


def _per_sample_finite(tensors: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
    ok = torch.ones(batch, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.reshape(batch, -1)).all(dim=1)
    return ok


def _adam_step(opt: torch.optim.Optimizer, variables: Dict[str, torch.Tensor],
               grads: Optional[Dict[str, torch.Tensor]], failed: torch.Tensor) -> None:
    """One optimiser step with explicit gradients (None = zeros); samples marked ``failed`` keep their values."""
    B = failed.shape[0]
    frozen = failed.nonzero().flatten() if bool(failed.any()) else None
    saved = {}
    for n, v in variables.items():
        g = torch.zeros_like(v) if grads is None else grads[n]
        if frozen is not None:
            g = torch.where(failed.view(B, *([1] * (g.ndim - 1))), torch.zeros_like(g), g)
            saved[n] = v.detach()[frozen].clone()
        v.grad = g
    opt.step()
    for n, v in variables.items():
        v.grad = None
    if frozen is not None:
        # Adam keeps moving on zero gradients (momentum): put the failed samples back explicitly.
        with torch.no_grad():
            for n, v in variables.items():
                v[frozen] = saved[n]


# ------------------------------------------------------------------------------------------------ refine
def hybrid_refine(G: Generator, codes: torch.Tensor, images: torch.Tensor, in_domain: torch.Tensor,
                  perceptual: Perceptual, config: Optional[RefineConfig] = None,
                  noise: Optional[Sequence[torch.Tensor]] = None) -> RefineState:
    """Run DHR's hybrid modulation refinement on a batch; G itself is not modified.

    Args:
        G: generator (its parameters are copied per image; never written, never given gradients).
        codes: (B, n_latent, style_dim) W+ codes (the embedding; kept fixed).
        images: (B, 3, S, S) targets in [-1, 1], S = G.size.
        in_domain: (B, 1, S, S) in [0, 1], 1 = in domain (weight modulation), 0 = OOD (feature modulation).
        perceptual: masked perceptual distance, e.g. ``lightning_modules.perceptual.LPIPSLoss("alex")``: needs
            ``masked_layer_distance(x, y, masks) -> (M, B)`` (lpips_mask "per_layer") or a call
            (x, y, mask (B, 1, S, S)) -> (B,) ("full_resolution").
        config: ``RefineConfig`` (default: the official settings).
        noise: ``G.num_layers`` noise maps (default: G's stored buffers), fixed for every forward pass.
    Returns:
        ``RefineState`` (detached). Needs autograd: do not call under ``torch.inference_mode``.
    """
    config = config or RefineConfig()
    if not isinstance(config, RefineConfig):
        raise TypeError(f"hybrid_refine: config must be a RefineConfig, got {type(config).__name__}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("hybrid_refine needs autograd but runs under torch.inference_mode "
                           "(Lightning: Trainer(inference_mode=False))")
    _check_inputs(G, codes, images, in_domain)
    r = config.resolution_for(G)
    point = G.next_block_input(r)
    B, device = codes.shape[0], codes.device
    codes, images = codes.detach(), images.detach().to(device)
    in_domain = in_domain.detach().to(device=device, dtype=codes.dtype)
    noise = _noise_list(G, noise, device)
    mask_r = feature_mask(in_domain, r)

    params = expand_params(G, B) if config.weight_steps > 0 else None
    feature = None
    if config.feature_steps > 0:
        with torch.no_grad():
            base = {n: p.detach() for n, p in G.named_parameters() if not n.startswith("style.")}
            init = call_with_params(G, base, "synthesize", codes, noise=noise, capture=[point]).features[point]
        feature = init.detach().clone().requires_grad_(True)
    opt_w = torch.optim.Adam(list(params.values()), lr=config.weight_lr) if params is not None else None
    opt_f = torch.optim.Adam([feature], lr=config.feature_lr) if feature is not None else None

    steps = max(config.weight_steps, config.feature_steps)
    failed = torch.zeros(B, dtype=torch.bool, device=device)
    history = []
    with torch.enable_grad():
        for step in range(steps):
            tune_w = params is not None and step < config.weight_steps
            tune_f = feature is not None and step < config.feature_steps
            fwd_params = params if tune_w or params is None else {k: v.detach() for k, v in params.items()}
            fwd_feature = feature if tune_f or feature is None else feature.detach()
            out = _render(G, fwd_params, fwd_feature, mask_r, point, codes, noise)
            l_ood, l_id = domain_losses(out, images, in_domain, perceptual, config, mask_r)
            history.append((l_ood + l_id).detach())

            grad_f = grad_w = None
            # A loss has no graph only when both of its weights are 0 (nothing to tune).
            if tune_f and l_ood.requires_grad:
                grad_f = torch.autograd.grad(l_ood.sum(), [feature], retain_graph=tune_w, allow_unused=True)[0]
                grad_f = torch.zeros_like(feature) if grad_f is None else grad_f
            if tune_w and l_id.requires_grad:
                names = list(params)
                grads = torch.autograd.grad(l_id.sum(), [params[n] for n in names], allow_unused=True)
                grad_w = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads)}

            ok = torch.isfinite(l_ood) & torch.isfinite(l_id)
            if grad_f is not None:
                ok &= _per_sample_finite([grad_f], B)
            if grad_w is not None:
                ok &= _per_sample_finite(list(grad_w.values()), B)
            failed |= ~ok

            if tune_f:
                _adam_step(opt_f, {"feature": feature}, None if grad_f is None else {"feature": grad_f}, failed)
            if tune_w:
                _adam_step(opt_w, params, grad_w, failed)

    losses = torch.stack(history) if history else torch.zeros(0, B, device=device)
    diverged = torch.zeros_like(failed)
    if config.divergence_factor is not None and len(history) > 1:
        diverged = ~failed & (losses[-1] > config.divergence_factor * losses[0].clamp_min(1e-8))
    return RefineState(
        params=None if params is None else {n: p.detach() for n, p in params.items()},
        feature=None if feature is None else feature.detach(),
        mask_r=mask_r, in_domain=in_domain, point=point, losses=losses, failed=failed | diverged, diverged=diverged)


def decode(G: Generator, state: RefineState, codes: torch.Tensor,
           noise: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Render (edited) codes with a refinement state: tuned weights, f* blended by mask_r at ``state.point``.

    Args:
        G: the base generator the state was refined from (its weights fill in when ``state.params`` is None).
        state: ``RefineState`` of B images.
        codes: (B, n_latent, style_dim) W+ codes; pass edited codes to edit (OOD content stays frozen at r).
        noise: noise maps (default: G's stored buffers; use the ones given to ``hybrid_refine``).
    Returns:
        (B, 3, S, S) images (no graph unless ``codes`` require grad).
    """
    B = state.batch_size
    if not isinstance(codes, torch.Tensor) or codes.ndim != 3 or codes.shape[0] != B \
            or codes.shape[1] != G.n_latent or codes.shape[2] != G.style_dim:
        got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"decode: codes must be ({B}, {G.n_latent}, {G.style_dim}) for a state of {B} images, "
                         f"got {got}")
    if state.point not in G.hook_points():
        raise ValueError(f"decode: state point {state.point!r} is not a hook point of this generator")
    noise = _noise_list(G, noise, codes.device)
    return _render(G, state.params, state.feature, state.mask_r, state.point, codes, noise)


# ------------------------------------------------------------------------------------------------ hand-off
def _plain(t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    # A copy, so saving one image does not write the whole batch's storage.
    return t.detach().to("cpu", dtype=dtype, copy=True)


def state_for_image(state: RefineState, i: int, base: Generator, weights: str = "delta_bf16") -> dict:
    """One image's refinement as a dict of plain CPU tensors (for ``torch.save``; loads with weights_only=True).

    Args:
        state: batch state; i: image index.
        base: the generator the state was refined from (deltas are taken against it).
        weights: "delta_bf16" (default: tuned - base in bfloat16, ``weights_delta``), "full" (tuned fp32,
            ``weights``) or "none" (omitted; the image then decodes with the base weights).
    Returns:
        {"point": str, "feature": (C, r, r) or None, "mask_r": (1, r, r), "in_domain": (1, S, S),
         "failed": bool, "losses": (steps,), "weights_format": str, ["weights_delta" | "weights"]: {name: tensor}}.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"state_for_image: weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
    B = state.batch_size
    if isinstance(i, bool) or not isinstance(i, int) or not -B <= i < B:
        raise IndexError(f"state_for_image: image index {i!r} out of range for a state of {B} images")
    out = {"point": state.point,
           "feature": None if state.feature is None else _plain(state.feature[i]),
           "mask_r": _plain(state.mask_r[i]), "in_domain": _plain(state.in_domain[i]),
           "failed": bool(state.failed[i]), "losses": _plain(state.losses[:, i])}
    if state.params is None or weights == "none":
        out["weights_format"] = "none"
        return out
    own = dict(base.named_parameters())
    missing = [n for n in state.params if n not in own]
    if missing:
        raise ValueError(f"state_for_image: base generator has no parameter(s) {missing[:4]}")
    if weights == "full":
        out["weights"] = {n: _plain(p[i]) for n, p in state.params.items()}
    else:
        out["weights_delta"] = {n: _plain(p[i] - own[n].detach().to(p.device), torch.bfloat16)
                                for n, p in state.params.items()}
    out["weights_format"] = weights
    return out


def image_states(state: Optional[RefineState], codes: torch.Tensor, base: Generator,
                 weights: str = "delta_bf16") -> List[Optional[dict]]:
    """``state_for_image`` of every image of a batch with its W+ code (``codes`` (B, L, D)) under ``"codes"``: what
    re-editing an image needs; None for an image whose refinement failed, and for every image without a state (a
    method that does not refine)."""
    out: List[Optional[dict]] = [None] * codes.shape[0]
    for j in range(codes.shape[0]):
        if state is not None and not bool(state.failed[j]):
            out[j] = {**state_for_image(state, j, base, weights=weights), "codes": codes[j].detach().cpu().clone()}
    return out


def state_from_images(dicts: Sequence[dict], base: Generator) -> RefineState:
    """Re-stack per-image dicts from ``state_for_image`` into a batch ``RefineState`` on ``base``'s device.

    Weights are rebuilt as base + delta (or taken as stored for "full"); an image without weights gets the base
    weights when others have some. An image without a feature gets an inert one (mask_r = 1) when others have
    one. All images must share the hook point; loss histories of different lengths are NaN-padded.
    """
    dicts = list(dicts)
    if not dicts:
        raise ValueError("state_from_images: no images")
    for k, d in enumerate(dicts):
        absent = [key for key in ("point", "feature", "mask_r", "in_domain", "failed") if key not in d]
        if absent:
            raise ValueError(f"state_from_images: image {k} lacks {absent} (not a state_for_image dict)")
    points = {d["point"] for d in dicts}
    if len(points) != 1:
        raise ValueError(f"state_from_images: images were refined at different points {sorted(points)}")
    if dicts[0]["point"] not in base.hook_points():
        raise ValueError(f"state_from_images: point {dicts[0]['point']!r} is not a hook point of the base generator")
    device = base.input.input.device
    own = {n: p.detach() for n, p in base.named_parameters()}

    def weights_of(k, d):
        if "weights" in d:
            w = d["weights"]
            get = lambda n: w[n].to(device, torch.float32)  # noqa: E731
        elif "weights_delta" in d:
            w = d["weights_delta"]
            get = lambda n: own[n] + w[n].to(device, torch.float32)  # noqa: E731
        else:
            return None
        unknown = [n for n in w if n not in own]
        if unknown:
            raise ValueError(f"state_from_images: image {k} has weights for unknown parameter(s) {unknown[:4]}")
        bad = [n for n in w if tuple(w[n].shape) != tuple(own[n].shape)]
        if bad:
            raise ValueError(f"state_from_images: image {k}: {bad[0]} has shape {tuple(w[bad[0]].shape)}, the base "
                             f"generator's is {tuple(own[bad[0]].shape)}")
        return {n: get(n) for n in w}

    per_image = [weights_of(k, d) for k, d in enumerate(dicts)]
    params = None
    if any(w is not None for w in per_image):
        names = sorted({n for w in per_image if w is not None for n in w})
        params = {n: torch.stack([own[n] if w is None or n not in w else w[n] for w in per_image]) for n in names}

    mask_r = [d["mask_r"].to(device).float() for d in dicts]
    feats = [d["feature"] for d in dicts]
    feature = None
    if any(f is not None for f in feats):
        shape = next(f.shape for f in feats if f is not None)
        for k, f in enumerate(feats):
            if f is None:
                feats[k] = torch.zeros(shape)
                mask_r[k] = torch.ones_like(mask_r[k])  # h * 1 + 0 * 0: G's own feature
        feature = torch.stack([f.to(device).float() for f in feats])

    histories = [d.get("losses", torch.zeros(0)).float() for d in dicts]
    steps = max(h.shape[0] for h in histories)
    losses = torch.full((steps, len(dicts)), float("nan"))
    for k, h in enumerate(histories):
        losses[: h.shape[0], k] = h
    return RefineState(params=params, feature=feature, mask_r=torch.stack(mask_r),
                       in_domain=torch.stack([d["in_domain"].to(device).float() for d in dicts]),
                       point=dicts[0]["point"], losses=losses.to(device),
                       failed=torch.tensor([bool(d["failed"]) for d in dicts], device=device))
