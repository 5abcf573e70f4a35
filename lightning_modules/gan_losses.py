"""StyleGAN2 adversarial losses and regularisers (Karras et al. 2020; rosinality's train.py maths).

All functions are pure: they take tensors and return scalar tensors (plus state where noted), so
the LightningModule decides precision, scaling and when each runs.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def d_logistic_loss(real_pred: torch.Tensor, fake_pred: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic discriminator loss.

    Args:
        real_pred, fake_pred: discriminator logits (B, 1) for real and generated images.
    Returns:
        Scalar ``mean(softplus(-real)) + mean(softplus(fake))``.
    """
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def g_nonsaturating_loss(fake_pred: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: scalar ``mean(softplus(-fake_pred))`` for logits (B, 1)."""
    return F.softplus(-fake_pred).mean()


def r1_penalty(real_pred: torch.Tensor, real_img: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty on real images (differentiable, for the discriminator's backward).

    Args:
        real_pred: discriminator logits (B, 1) computed from ``real_img``.
        real_img: (B, C, H, W) real images with ``requires_grad=True``.
    Returns:
        Scalar ``mean_b ||d real_pred_b / d real_img_b||^2`` (not yet multiplied by gamma / 2).
    """
    (grad,) = torch.autograd.grad(real_pred.sum(), real_img, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def path_length_penalty(fake_img: torch.Tensor, latents: torch.Tensor, mean_path_length: torch.Tensor,
                        decay: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Path-length regularisation: penalise deviation of ``|J_w^T y|`` from its running mean.

    Args:
        fake_img: (B, C, H, W) images generated from ``latents``.
        latents: (B, n_latent, style_dim) W+ codes that produced ``fake_img`` (part of its graph).
        mean_path_length: scalar running mean ``a`` of the path lengths.
        decay: update rate of the running mean.
    Returns:
        (penalty scalar, new running mean scalar (detached), per-sample path lengths (B,) detached).
    """
    noise = torch.randn_like(fake_img) / math.sqrt(fake_img.shape[2] * fake_img.shape[3])
    (grad,) = torch.autograd.grad((fake_img * noise).sum(), latents, create_graph=True)
    lengths = grad.square().sum(2).mean(1).sqrt()
    path_mean = mean_path_length + decay * (lengths.mean() - mean_path_length)
    penalty = (lengths - path_mean).square().mean()
    return penalty, path_mean.detach(), lengths.detach()
