"""Optimisation-based GAN inversion (the PTI / StyleGAN2-ADA projector), batched.

``project`` fits one latent code (W: one row repeated, or W+: one row per layer) and optionally one
set of noise maps per target image by Adam on ``perceptual(G(code, noise), target)`` plus an optional
pixel MSE and the StyleGAN2 noise auto-correlation penalty. The schedule follows PTI's
``w_projector.py``: learning rate ramps up over the first ``lr_rampup`` fraction of the steps and
down with a cosine over the last ``lr_rampdown`` fraction; Gaussian noise of std
``w_std * initial_noise_factor * max(0, 1 - t / noise_ramp) ** 2`` is added to the code during the
first ``noise_ramp`` fraction; optimised noise maps are renormalised to zero mean / unit variance
after every step. With ``loss_resolution`` the loss compares the synthesis, optionally clamped to
[-1, 1], bilinearly resized to that size with the target resized with antialiasing (``target_resize``:
on the tensor, or the 8-bit image through PIL as GANInverter's ``OptimizerInference`` gets it when it scores a
1024 px generator at 256 px).

Batching rule: every image has its own code and noise maps and the loss is the sum of the per-image
losses, so (Adam being element-wise) images never influence each other. All per-image randomness
(initial noise maps, the code perturbation of every step) comes from a ``torch.Generator`` seeded
with ``seed + b`` for the image at batch index ``b``. Hence ``project(G, x, seed=s)`` equals
``project(G, x[b:b+1], seed=s + b)`` for every ``b`` (up to float round-off of batched convolutions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
Perceptual = Callable[[Tensor, Tensor], Tensor]

SPACES = ("w", "w+")
NOISE_MODES = ("optimise", "fixed")
# renormalising optimised noise maps: "biased" = population std per image (PTI / StyleGAN2-ADA projector);
# "unbiased" = torch.std (Bessel) per image (rosinality's projector, GANInverter's coarse inversion at batch 1)
NOISE_STDS = ("biased", "unbiased")
# resizing the target for loss_resolution: "antialiased" = bilinear with antialiasing on the tensor;
# "pil_uint8" = the 8-bit image through PIL's bilinear resize (torchvision's Resize on the loaded file, as
# GANInverter feeds its coarse inversion)
TARGET_RESIZES = ("antialiased", "pil_uint8")


@dataclass
class ProjectionResult:
    """Output of ``project``.

    codes: (B, n_latent, style_dim) W+ codes (W-space results have identical rows).
    noises: list of ``G.num_layers`` noise maps, each (B, 1, r, r) (the stored buffers repeated over
        the batch when ``noise_mode="fixed"``).
    images: (B, 3, S, S) ``G`` applied to ``codes`` and ``noises`` (no code perturbation).
    loss_history: (steps, B) per-image total loss at every step (CPU).
    last_step_images: (B, 3, S, S) the synthesis of the last step, before its update (the image GANInverter's DHR
        measures its error map on).
    """

    codes: Tensor
    noises: List[Tensor]
    images: Tensor
    loss_history: Tensor
    last_step_images: Optional[Tensor] = None


def noise_regularization(noises: List[Tensor]) -> Tensor:
    """StyleGAN2's noise penalty, per image: sum over maps and pyramid levels (down to 8 px) of the
    squared mean auto-correlation at a one-pixel shift along x and along y.

    noises: list of (B, 1, r, r) maps. Returns (B,) (zero for independent white noise in expectation).
    """
    total = None
    for noise in noises:
        n = noise
        while True:
            term = (n * torch.roll(n, shifts=1, dims=3)).mean(dim=(1, 2, 3)) ** 2 \
                + (n * torch.roll(n, shifts=1, dims=2)).mean(dim=(1, 2, 3)) ** 2
            total = term if total is None else total + term
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, kernel_size=2)
    if total is None:
        raise ValueError("noise_regularization needs at least one noise map")
    return total


def learning_rate(step: int, steps: int, lr: float, lr_rampdown: float, lr_rampup: float) -> float:
    """PTI's schedule: lr * cosine ramp-down over the last ``lr_rampdown`` fraction * linear ramp-up
    over the first ``lr_rampup`` fraction (0 at step 0)."""
    t = step / steps
    ramp = min(1.0, (1.0 - t) / lr_rampdown) if lr_rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp = ramp * (min(1.0, t / lr_rampup) if lr_rampup > 0 else 1.0)
    return lr * ramp


@torch.no_grad()
def latent_stats(G: nn.Module, n_samples: int = 10000, seed: int = 123) -> tuple:
    """Mean (1, style_dim) and scalar spread ``sqrt(E ||w - mean||^2)`` of the mapping outputs for
    ``n_samples`` z drawn with ``seed`` (PTI's ``w_avg`` / ``w_std``)."""
    device = next(G.parameters()).device
    z = torch.randn(n_samples, G.style_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    w = torch.cat([G.get_latent(chunk) for chunk in z.split(4096)])
    mean = w.mean(0, keepdim=True)
    std = ((w - mean).square().sum() / n_samples).sqrt()
    return mean, float(std)


def _start_codes(G, batch: int, space: str, latent_avg: Optional[Tensor], init_codes: Optional[Tensor],
                 device) -> Tensor:
    """Initial trainable codes: (B, 1, D) for "w", (B, n_latent, D) for "w+"."""
    rows = 1 if space == "w" else G.n_latent
    d = G.style_dim
    if init_codes is not None:
        c = init_codes.detach().to(device=device, dtype=torch.float32)
        if c.ndim == 2:
            c = c.unsqueeze(1)
        if c.ndim != 3 or c.shape[0] != batch or c.shape[2] != d or c.shape[1] not in (1, rows):
            raise ValueError(f"project: init_codes must be (B, D) or (B, {rows}, D) with B={batch}, D={d} for "
                             f"space={space!r}, got {tuple(init_codes.shape)}")
        return c.expand(batch, rows, d).clone()
    avg = latent_avg.detach().to(device=device, dtype=torch.float32)
    if avg.numel() == d:
        avg = avg.reshape(1, 1, d)
    elif avg.numel() == G.n_latent * d:
        avg = avg.reshape(1, G.n_latent, d)
        if space == "w":
            avg = avg.mean(1, keepdim=True)
    else:
        raise ValueError(f"project: latent_avg must have shape (D,), (1, D) or (n_latent, D) with D={d}, "
                         f"n_latent={G.n_latent}; got {tuple(latent_avg.shape)}")
    return avg.expand(batch, rows, d).clone()


def project(G: nn.Module, images: Tensor, *, perceptual: Perceptual, latent_avg: Optional[Tensor] = None,
            space: str = "w", steps: int = 1000, lr: float = 0.01, noise_mode: str = "optimise",
            noise_regularize: float = 1e5, mse_weight: float = 0.0, initial_noise_factor: float = 0.05,
            noise_ramp: float = 0.75, lr_rampdown: float = 0.25, lr_rampup: float = 0.05, seed: int = 0,
            w_avg_samples: int = 10000, init_codes: Optional[Tensor] = None,
            loss_resolution: Optional[int] = None, clamp: bool = False, noise_std: str = "biased",
            target_resize: str = "antialiased", callback: Optional[Callable[[int, dict], None]] = None) -> ProjectionResult:
    """Embed target images into ``G``'s latent space by optimisation (see the module docstring).

    Args:
        G: ``networks.stylegan2.Generator`` (frozen during the call; ``requires_grad`` flags and the
            train/eval mode are restored afterwards). Must be on the images' device.
        images: (B, 3, G.size, G.size) targets in [-1, 1].
        perceptual: callable ``(synth (B,3,S,S), target (B,3,S,S)) -> (B,)`` per-image distance that
            is differentiable w.r.t. ``synth`` (e.g. ``LPIPSLoss``); it must not mix images.
        latent_avg: start code, (D,), (1, D) or (n_latent, D); default: mean of ``w_avg_samples``
            mapped z (seed 123). Ignored when ``init_codes`` is given.
        space: "w" (one row per image, repeated over the layers) or "w+" (one row per layer).
        steps: optimisation steps.
        lr: peak Adam learning rate (betas 0.9, 0.999).
        noise_mode: "optimise" (per-image noise maps, drawn from N(0, 1), optimised and renormalised)
            or "fixed" (G's stored noise buffers, not optimised, no noise penalty).
        noise_regularize: weight of ``noise_regularization`` (only with "optimise").
        mse_weight: weight of the per-image pixel MSE (0 = PTI's LPIPS-only objective).
        initial_noise_factor, noise_ramp: code perturbation std ``w_std * factor * max(0, 1 - t/ramp)^2``.
        lr_rampdown, lr_rampup: fractions of ``steps`` of the learning-rate ramps.
        seed: image ``b`` draws all its randomness from ``torch.Generator().manual_seed(seed + b)``.
        w_avg_samples: z samples for the W mean / spread (the spread scales the code perturbation).
        init_codes: optional start codes (B, D), (B, 1, D) or (B, n_latent, D) (W+ only), e.g. encoder output.
        loss_resolution: side of the images the loss compares (None: G.size, nothing resized); the synthesis is
            resized bilinearly, the target bilinearly with antialiasing.
        clamp: clamp the synthesis to [-1, 1] before the loss (GANInverter's coarse inversion does).
        noise_std: how optimised noise maps are renormalised after each step (``NOISE_STDS``): "biased" (PTI) or
            "unbiased" (GANInverter / rosinality: ``torch.std``).
        target_resize: how the target reaches ``loss_resolution`` (``TARGET_RESIZES``): "antialiased" (the tensor)
            or "pil_uint8" (the 8-bit image through PIL's bilinear resize, then back to [-1, 1] as ToTensor + Normalize(0.5, 0.5)).
        callback: called after every step as ``callback(step, {"codes" (B,n_latent,D), "images"
            (B,3,S,S) (this step's synthesis), "loss" (B,)})`` with detached tensors.
    Returns:
        ProjectionResult (codes, noises, images, loss_history); see its docstring.
    """
    if space not in SPACES:
        raise ValueError(f"project: space must be one of {SPACES}, got {space!r}")
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"project: noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
    if noise_std not in NOISE_STDS:
        raise ValueError(f"project: noise_std must be one of {NOISE_STDS}, got {noise_std!r}")
    if target_resize not in TARGET_RESIZES:
        raise ValueError(f"project: target_resize must be one of {TARGET_RESIZES}, got {target_resize!r}")
    if steps < 1:
        raise ValueError(f"project: steps must be >= 1, got {steps}")
    if loss_resolution is not None and (isinstance(loss_resolution, bool) or int(loss_resolution) < 1):
        raise ValueError(f"project: loss_resolution must be a positive size or None, got {loss_resolution!r}")
    if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != (3, G.size, G.size):
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"project: images must be (B, 3, {G.size}, {G.size}) for this generator, got {shape}")
    device = images.device
    g_device = next(G.parameters()).device
    if g_device != device:
        raise ValueError(f"project: generator is on {g_device} but images are on {device}")
    batch = images.shape[0]
    target = (pil_resized(images.detach().float(), loss_resolution) if target_resize == "pil_uint8"
              else _resized(images.detach().float(), loss_resolution, antialias=True))

    modules = [G] + ([perceptual] if isinstance(perceptual, nn.Module) else [])
    saved_flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    was_training = G.training
    G.eval()
    for p, _ in saved_flags:
        p.requires_grad_(False)
    try:
        need_mean = latent_avg is None and init_codes is None
        avg, w_std = latent_stats(G, w_avg_samples) if need_mean or initial_noise_factor > 0 else (None, 0.0)
        if latent_avg is None:
            latent_avg = avg
        code = _start_codes(G, batch, space, latent_avg, init_codes, device).requires_grad_(True)

        gens = [torch.Generator(device=device).manual_seed(seed + b) for b in range(batch)]
        if noise_mode == "optimise":
            shapes = [tuple(n.shape[1:]) for n in G.stored_noise()]
            noises = [torch.cat([torch.randn(1, *s, generator=g, device=device) for g in gens])
                      for s in shapes]
            for n in noises:
                n.requires_grad_(True)
            params = [code] + noises
        else:
            noises = [n.detach().float().expand(batch, *n.shape[1:]) for n in G.stored_noise()]
            params = [code]
        optimizer = torch.optim.Adam(params, betas=(0.9, 0.999), lr=lr)

        history = []
        for step in range(steps):
            t = step / steps
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, lr, lr_rampdown, lr_rampup)
            scale = w_std * initial_noise_factor * max(0.0, 1.0 - t / noise_ramp) ** 2 if noise_ramp > 0 else 0.0
            if scale > 0:
                jitter = torch.cat([torch.randn(1, *code.shape[1:], generator=g, device=device) for g in gens])
                ws = code + jitter * scale
            else:
                ws = code
            synth = G.synthesize(ws.expand(batch, G.n_latent, G.style_dim), noise=noises).image
            scored = _resized(synth.clamp(-1, 1) if clamp else synth, loss_resolution, antialias=False)

            loss = perceptual(scored, target)
            if not torch.is_tensor(loss) or loss.shape != (batch,):
                got = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
                raise ValueError(f"project: perceptual must return one distance per image, shape ({batch},), "
                                 f"got {got}")
            if mse_weight:
                loss = loss + mse_weight * (scored - target).square().mean(dim=(1, 2, 3))
            if noise_mode == "optimise" and noise_regularize:
                loss = loss + noise_regularize * noise_regularization(noises)

            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            optimizer.step()
            history.append(loss.detach().cpu())

            if noise_mode == "optimise":
                with torch.no_grad():
                    for n in noises:
                        n -= n.mean(dim=(1, 2, 3), keepdim=True)
                        if noise_std == "biased":
                            n *= n.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()
                        else:
                            n /= n.flatten(1).std(dim=1).reshape(-1, 1, 1, 1)
            if callback is not None:
                callback(step, {"codes": code.detach().expand(batch, G.n_latent, G.style_dim).clone(),
                                "images": synth.detach(), "loss": loss.detach()})

        with torch.no_grad():
            codes = code.detach().expand(batch, G.n_latent, G.style_dim).clone()
            final_noises = [n.detach().clone() for n in noises]
            final = G.synthesize(codes, noise=final_noises).image
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        G.train(was_training)
    return ProjectionResult(codes=codes, noises=final_noises, images=final, loss_history=torch.stack(history),
                            last_step_images=synth.detach())


def _resized(images: Tensor, size: Optional[int], antialias: bool) -> Tensor:
    """Images (B, 3, S, S) bilinearly resized to (B, 3, size, size) (unchanged when size is None or S)."""
    if size is None or tuple(images.shape[-2:]) == (int(size), int(size)):
        return images
    return F.interpolate(images, size=(int(size), int(size)), mode="bilinear", align_corners=False,
                         antialias=antialias)


def pil_resized(images: Tensor, size: Optional[int]) -> Tensor:
    """Images (B, 3, S, S) in [-1, 1] as 8-bit images resized by PIL's bilinear filter to (B, 3, size, size), back in
    [-1, 1] (``(u / 255 - 0.5) / 0.5``): torchvision's ``Resize`` on a loaded file, then ``ToTensor`` + ``Normalize(0.5, 0.5)``.
    Unchanged when size is None or S."""
    if size is None or tuple(images.shape[-2:]) == (int(size), int(size)):
        return images
    from PIL import Image

    u8 = ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = [torch.from_numpy(np.asarray(Image.fromarray(a).resize((int(size), int(size)), Image.BILINEAR)).copy())
           for a in u8]
    unit = torch.stack(out).permute(0, 3, 1, 2).to(device=images.device, dtype=images.dtype) / 255
    return (unit - 0.5) / 0.5


__all__ = ["ProjectionResult", "project", "pil_resized", "NOISE_STDS", "TARGET_RESIZES", "noise_regularization", "learning_rate", "latent_stats"]
