"""Optimisation-based projection (networks.refine.projection) on a tiny generator."""
import math

import pytest
import torch
import torch.nn.functional as F

from networks.refine.projection import (ProjectionResult, latent_stats, learning_rate, noise_regularization,
                                          project)
from networks.stylegan2 import Generator

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    return Generator(size=16, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32).eval()


def pooled_mse(x, y):
    """Differentiable stand-in for LPIPS: per-image MSE of 2x-downsampled images, (B,)."""
    return (F.avg_pool2d(x, 2) - F.avg_pool2d(y, 2)).square().mean(dim=(1, 2, 3))


@torch.no_grad()
def targets(G, n, seed=1):
    z = torch.randn(n, G.style_dim, generator=torch.Generator().manual_seed(seed))
    w = G.get_latent(z)
    return G([w], input_is_latent=True)[0], w


def psnr(a, b):
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse)


def test_w_and_wplus_shapes_and_loss_falls():
    G = tiny_generator()
    x, _ = targets(G, 2)
    for space in ("w", "w+"):
        res = project(G, x, perceptual=pooled_mse, space=space, steps=20, lr=0.05, w_avg_samples=500)
        assert isinstance(res, ProjectionResult)
        assert res.codes.shape == (2, G.n_latent, G.style_dim)
        assert res.images.shape == (2, 3, 16, 16)
        assert res.loss_history.shape == (20, 2)
        assert [tuple(n.shape) for n in res.noises] == [(2, 1, n.shape[2], n.shape[3]) for n in G.stored_noise()]
        assert (res.loss_history[-1] < 0.5 * res.loss_history[1]).all()
        if space == "w":  # one code per image, repeated over the layers
            assert torch.equal(res.codes, res.codes[:, :1].expand_as(res.codes))
        else:
            assert not torch.allclose(res.codes[:, 0], res.codes[:, -1])
        # the returned images are G applied to the returned codes and noises
        again = G.synthesize(res.codes, noise=res.noises).image
        torch.testing.assert_close(again, res.images)


def test_batch_of_two_equals_two_single_runs():
    G = tiny_generator()
    x, _ = targets(G, 2)
    kw = dict(perceptual=pooled_mse, space="w+", steps=15, lr=0.05, w_avg_samples=500)
    both = project(G, x, seed=7, **kw)
    first = project(G, x[:1], seed=7, **kw)
    second = project(G, x[1:], seed=8, **kw)  # image b of a batch uses seed + b
    torch.testing.assert_close(both.codes, torch.cat([first.codes, second.codes]), rtol=1e-4, atol=1e-5)
    for n, a, b in zip(both.noises, first.noises, second.noises):
        torch.testing.assert_close(n, torch.cat([a, b]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both.loss_history, torch.cat([first.loss_history, second.loss_history], 1),
                               rtol=1e-4, atol=1e-6)
    # and the seed matters: another seed gives other noise maps
    other = project(G, x[:1], seed=9, **kw)
    assert not torch.allclose(other.noises[-1], first.noises[-1])


def test_reconstructs_a_generated_target_in_w():
    G = tiny_generator()
    avg, _ = latent_stats(G, 2000)
    z = torch.randn(1, G.style_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # a truncated code (psi 0.5): random tiny generators have rough landscapes far out
        w = avg + 0.5 * (G.get_latent(z) - avg)
        x = G([w], input_is_latent=True)[0]
    kw = dict(perceptual=pooled_mse, space="w", noise_mode="fixed", mse_weight=1.0, w_avg_samples=2000)
    start = project(G, x, steps=1, lr=0.0, **kw)
    res = project(G, x, steps=100, lr=0.1, **kw)
    assert psnr(res.images, x).item() > 30
    assert psnr(res.images, x).item() > psnr(start.images, x).item() + 10
    assert (res.codes[0, 0] - w[0]).norm() < 0.5 * (start.codes[0, 0] - w[0]).norm()
    # fixed noise: the stored buffers come back unchanged
    for n, stored in zip(res.noises, G.stored_noise()):
        torch.testing.assert_close(n, stored.expand_as(n))


def test_generator_frozen_and_flags_restored():
    G = tiny_generator()
    G.style[1].weight.requires_grad_(False)  # a mixed state must come back as it was
    G.train()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    flags = {k: p.requires_grad for k, p in G.named_parameters()}
    seen = []
    x, _ = targets(G, 1)
    project(G, x, perceptual=pooled_mse, steps=3, w_avg_samples=200,
            callback=lambda step, info: seen.append((step, info["loss"].shape, info["codes"].shape)))
    assert {k: p.requires_grad for k, p in G.named_parameters()} == flags
    assert G.training
    for k, v in G.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in G.parameters())
    assert seen == [(i, (1,), (1, G.n_latent, G.style_dim)) for i in range(3)]


def test_noise_regularization_values():
    torch.manual_seed(0)
    white = [torch.randn(2, 1, 32, 32), torch.randn(2, 1, 8, 8)]
    smooth = [torch.ones(2, 1, 32, 32), torch.ones(2, 1, 8, 8)]
    assert noise_regularization(white).shape == (2,)
    assert (noise_regularization(white) < 0.05).all()
    # constant maps: autocorrelation 1 at every shift; 32 px has levels 32, 16, 8 (3 levels x 2 axes), 8 px one
    torch.testing.assert_close(noise_regularization(smooth), torch.full((2,), 8.0))
    # per image: changing image 1 leaves image 0's value alone
    mixed = [torch.stack([white[0][0], smooth[0][1]]), torch.stack([white[1][0], smooth[1][1]])]
    torch.testing.assert_close(noise_regularization(mixed)[0], noise_regularization(white)[0])


def test_noise_regularization_keeps_optimised_noise_white():
    G = tiny_generator()
    x, _ = targets(G, 1)
    kw = dict(perceptual=pooled_mse, steps=40, lr=0.1, w_avg_samples=200, seed=0)
    reg = project(G, x, noise_regularize=1e5, **kw)
    free = project(G, x, noise_regularize=0.0, **kw)
    assert noise_regularization(reg.noises).item() < noise_regularization(free.noises).item()
    for n in reg.noises:  # renormalised after every step
        torch.testing.assert_close(n.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
        torch.testing.assert_close(n.square().mean(), torch.tensor(1.0), atol=1e-4, rtol=0)


def test_learning_rate_schedule():
    assert learning_rate(0, 100, 0.01, 0.25, 0.05) == 0.0
    assert math.isclose(learning_rate(50, 100, 0.01, 0.25, 0.05), 0.01)
    assert math.isclose(learning_rate(2, 100, 0.01, 0.25, 0.05), 0.01 * 2 / 5)
    assert learning_rate(90, 100, 0.01, 0.25, 0.05) < learning_rate(80, 100, 0.01, 0.25, 0.05) < 0.01


def test_bad_arguments():
    G = tiny_generator()
    x, _ = targets(G, 1)
    with pytest.raises(ValueError, match="space must be one of"):
        project(G, x, perceptual=pooled_mse, space="z", steps=1)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 16, 16\)"):
        project(G, torch.zeros(1, 3, 8, 8), perceptual=pooled_mse, steps=1)
    with pytest.raises(ValueError, match="one distance per image"):
        project(G, x, perceptual=lambda a, b: (a - b).square().mean(), steps=1, w_avg_samples=100)
    with pytest.raises(ValueError, match="init_codes"):
        project(G, x, perceptual=pooled_mse, steps=1, init_codes=torch.zeros(2, 32), w_avg_samples=100)
    assert all(p.requires_grad for p in G.parameters())  # restored after the failing call


def test_noise_std_options_renormalise_each_image_as_named():
    """"biased" (PTI): population std 1 per image and map; "unbiased" (GANInverter's coarse inversion): torch.std 1."""
    G = tiny_generator()
    x, _ = targets(G, 2)
    kw = dict(perceptual=pooled_mse, space="w", steps=3, lr=0.05, w_avg_samples=200)
    for noise_std, correction in (("biased", 0), ("unbiased", 1)):
        res = project(G, x, noise_std=noise_std, **kw)
        for n in res.noises:
            flat = n.flatten(1).double()
            torch.testing.assert_close(flat.mean(1), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
            torch.testing.assert_close(flat.std(1, correction=correction), torch.ones(2, dtype=torch.float64),
                                       atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="noise_std must be one of"):
        project(G, x, noise_std="sample", **kw)


def test_pil_target_resize_is_the_8bit_image_through_pil_bilinear():
    """"pil_uint8": what torchvision's Resize + ToTensor + Normalize(0.5, 0.5) make of the loaded 8-bit file."""
    import numpy as np
    from PIL import Image

    from networks.refine.projection import pil_resized

    u8 = torch.randint(0, 256, (2, 16, 16, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images = u8.permute(0, 3, 1, 2).float() / 127.5 - 1
    got = pil_resized(images, 8)
    for b in range(2):
        pil = Image.fromarray(u8[b].numpy()).resize((8, 8), Image.BILINEAR)
        want = (torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        assert torch.equal(got[b], want)
    assert pil_resized(images, None) is images and pil_resized(images, 16) is images
    # the loss target differs from the antialiased tensor resize only by PIL's filter and 8-bit rounding
    tensor = F.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    assert 0 < (got - tensor).abs().max() < 0.1
    G = tiny_generator()
    with pytest.raises(ValueError, match="target_resize must be one of"):
        project(G, targets(G, 1)[0], perceptual=pooled_mse, steps=1, target_resize="bicubic", w_avg_samples=100)
