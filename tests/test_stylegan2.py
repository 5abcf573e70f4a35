"""StyleGAN2 network behaviour: op implementations agree, hooks, per-sample weights, noise, D."""
import pytest
import torch

from networks.stylegan2 import Discriminator, Generator, call_with_params, expand_params, take_sample
from networks.stylegan2.ops import conv_transpose2x, make_kernel, upfirdn2d

TINY = dict(size=32, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32)


def _randomise(module, seed=0):
    """Give zero-initialised parameters (noise strengths, biases) non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return module


@pytest.fixture
def tiny_g():
    torch.manual_seed(0)
    return _randomise(Generator(**TINY)).eval()


@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 1)), (2, 1, (2, 1)), (1, 2, (2, 2)), (1, 2, (1, 1)),
                                         (2, 1, (1, 1)), (1, 1, (-1, 2))])
def test_upfirdn2d_fast_equals_ref(up, down, pad):
    x = torch.randn(2, 3, 9, 9)
    k = make_kernel([1, 2, 3, 5]) * (up ** 2)  # asymmetric: catches a missing kernel flip
    ref = upfirdn2d(x, k, up=up, down=down, pad=pad, impl="ref")
    fast = upfirdn2d(x, k, up=up, down=down, pad=pad, impl="fast")
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="unknown"):
        upfirdn2d(torch.zeros(1, 1, 4, 4), make_kernel([1, 1]), impl="cuda")
    with pytest.raises(ValueError, match="unknown impl"):
        Generator(**TINY, impl="nope")


def test_conv_transpose2x_equals_torch():
    x, w = torch.randn(2, 5, 6, 7), torch.randn(4, 5, 3, 3)
    ref = torch.nn.functional.conv_transpose2d(x, w.transpose(0, 1), stride=2)
    torch.testing.assert_close(conv_transpose2x(x, w), ref, rtol=1e-5, atol=1e-5)


def test_fast_and_ref_generators_agree_forward_and_backward(tiny_g):
    w = torch.randn(4, tiny_g.n_latent, TINY["style_dim"], requires_grad=True)
    grads = {}
    for impl in ("ref", "fast"):
        tiny_g.set_impl(impl).zero_grad()
        w.grad = None
        img = tiny_g.synthesize(w).image
        (img * torch.linspace(-1, 1, img.numel()).view_as(img)).sum().backward()
        grads[impl] = (img.detach(), w.grad.clone(), {n: p.grad.clone() for n, p in tiny_g.named_parameters()
                                                       if p.grad is not None})
    (img_r, gw_r, gp_r), (img_f, gw_f, gp_f) = grads["ref"], grads["fast"]
    torch.testing.assert_close(img_f, img_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw_f, gw_r, rtol=1e-3, atol=1e-4)
    assert gp_r.keys() == gp_f.keys()
    for name in gp_r:
        torch.testing.assert_close(gp_f[name], gp_r[name], rtol=1e-3, atol=1e-3, msg=name)


def test_fast_and_ref_discriminators_agree():
    torch.manual_seed(0)
    d = _randomise(Discriminator(32, channel_max=32))
    x = torch.randn(4, 3, 32, 32)
    ref = d.set_impl("ref")(x)
    fast = d.set_impl("fast")(x)
    assert ref.shape == (4, 1)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_discriminator_rejects_batch_not_divisible_by_group():
    d = Discriminator(16, channel_max=16)
    with pytest.raises(ValueError, match="divisible"):
        d(torch.randn(6, 3, 16, 16))


def test_channel_table_defaults_match_rosinality():
    g = Generator(1024, n_mlp=1)
    assert g.channels == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}
    assert g.n_latent == 18 and g.num_layers == 17


def test_noise_is_deterministic_by_default_and_random_on_request(tiny_g):
    z = torch.randn(2, TINY["style_dim"])
    with torch.no_grad():
        a, b = tiny_g([z])[0], tiny_g([z])[0]
        c, d = tiny_g([z], randomize_noise=True)[0], tiny_g([z], randomize_noise=True)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(c, d)


def test_style_mixing_uses_inject_index(tiny_g):
    z1, z2 = torch.randn(2, TINY["style_dim"]), torch.randn(2, TINY["style_dim"])
    _, latent = tiny_g([z1, z2], inject_index=3, return_latents=True)
    w1, w2 = tiny_g.get_latent(z1), tiny_g.get_latent(z2)
    torch.testing.assert_close(latent[:, :3], w1[:, None].expand(-1, 3, -1))
    torch.testing.assert_close(latent[:, 3:], w2[:, None].expand(-1, tiny_g.n_latent - 3, -1))


def test_truncation_needs_a_latent(tiny_g):
    with pytest.raises(ValueError, match="truncation_latent"):
        tiny_g([torch.randn(1, TINY["style_dim"])], truncation=0.5)


@torch.no_grad()
def test_capture_returns_block_features_with_expected_shapes(tiny_g):
    w = torch.randn(2, tiny_g.n_latent, TINY["style_dim"])
    points = [Generator.block_output(r) for r in (4, 8, 16, 32)] + [Generator.upconv_modulated(16)]
    out = tiny_g.synthesize(w, capture=points)
    assert out.image.shape == (2, 3, 32, 32)
    for res, name in zip((4, 8, 16, 32), points):
        assert out.features[name].shape == (2, tiny_g.channels[res], res, res)
    assert out.features["convs.2.mod"].shape == (2, tiny_g.channels[16], 16, 16)
    # capturing must not change the image (the hooked path is the un-fused maths)
    torch.testing.assert_close(out.image, tiny_g.synthesize(w).image, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_feature_edits_replace_and_blend(tiny_g):
    w = torch.randn(2, tiny_g.n_latent, TINY["style_dim"])
    name = Generator.block_output(16)
    base = tiny_g.synthesize(w, capture=[name])
    same = tiny_g.synthesize(w, edits={name: lambda h: h})
    torch.testing.assert_close(same.image, base.image, rtol=1e-4, atol=1e-5)
    target = torch.randn_like(base.features[name])
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., :8] = 1.0  # DHR-style blend: keep the generator feature where mask = 1
    blended = tiny_g.synthesize(w, edits={name: lambda h: h * mask + target * (1 - mask)}, capture=[name])
    torch.testing.assert_close(blended.features[name][..., 8:], target[..., 8:])
    torch.testing.assert_close(blended.features[name][..., :8], base.features[name][..., :8])
    assert not torch.allclose(blended.image, base.image)
    with pytest.raises(KeyError, match="unknown hook point"):
        tiny_g.synthesize(w, capture=["convs.99.out"])


@torch.no_grad()
def test_next_block_input_is_edited_after_the_blocks_torgb(tiny_g):
    """``convs.{k}.in`` holds the previous block's output; an edit there reaches the next block only, while an
    edit of the block output also reaches that block's ToRGB (DHR swaps f* in at the next block's input)."""
    w = torch.randn(2, tiny_g.n_latent, TINY["style_dim"])
    inp, out = Generator.next_block_input(8), Generator.block_output(8)
    assert (inp, Generator.next_block_input(4)) == ("convs.2.in", "convs.0.in")
    base = tiny_g.synthesize(w, capture=[inp, out])
    torch.testing.assert_close(base.features[inp], base.features[out], atol=0, rtol=0)
    seen = []
    handle = tiny_g.to_rgbs[0].register_forward_hook(lambda module, args, result: seen.append(args[0]))
    try:
        at_input = tiny_g.synthesize(w, edits={inp: lambda h: h * 0}, capture=[out]).image  # same maths as base
        at_output = tiny_g.synthesize(w, edits={out: lambda h: h * 0}).image
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], base.features[out], atol=0, rtol=0)   # the 8 px ToRGB: G's own feature
    assert seen[1].abs().max() == 0                                            # ... or the edited one
    assert not torch.allclose(at_input, at_output)


def test_per_sample_weights_equal_separate_generators(tiny_g):
    """A batch with per-sample weights equals each image run through its own modified generator."""
    batch = 3
    w = torch.randn(batch, tiny_g.n_latent, TINY["style_dim"])
    params = expand_params(tiny_g, batch)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    for impl in ("fast", "ref"):
        tiny_g.set_impl(impl)
        batched = call_with_params(tiny_g, params, "synthesize", w).image
        for i in range(batch):
            single = call_with_params(tiny_g, take_sample(params, i), "synthesize", w[i:i + 1]).image
            torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-4, atol=1e-5)


def test_per_sample_gradients_stay_per_sample(tiny_g):
    params = expand_params(tiny_g, 2)
    w = torch.randn(2, tiny_g.n_latent, TINY["style_dim"])
    image = call_with_params(tiny_g, params, "synthesize", w).image
    image[0].sum().backward()  # only sample 0 contributes
    grad = params["convs.1.conv.weight"].grad
    assert grad.shape == (2,) + tuple(tiny_g.convs[1].conv.weight.shape)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0
    assert tiny_g.convs[1].conv.weight.grad is None  # the shared weights are untouched


def test_expand_params_rejects_unknown_names(tiny_g):
    with pytest.raises(KeyError, match="no parameter"):
        expand_params(tiny_g, 2, names=["nope.weight"])
