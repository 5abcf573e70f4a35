"""DHR hybrid modulation refinement (networks.refine.hybrid) on a tiny 32 px generator with random-backbone LPIPS."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from networks.refine.hybrid import (RefineConfig, RefineState, decode, domain_losses, feature_mask, hybrid_refine,
                                    masked_mse, state_for_image, state_from_images)
from networks.stylegan2 import Generator

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = dict(weight_steps=4, feature_steps=6, feature_resolution=8)


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    return Generator(32, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32)


@pytest.fixture(scope="module")
def lpips():
    from lightning_modules.perceptual import LPIPSLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LPIPSLoss(net="alex", allow_random_backbone=True)


@pytest.fixture(scope="module")
def batch(G):
    """(codes (2, L, D), targets (2, 3, 32, 32), in_domain (2, 1, 32, 32)): targets are other G samples with an
    'occluder' pasted into the OOD part; image 0 is in domain on its left half, image 1 on its top half."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = G.get_latent(torch.randn(2, 32, generator=gen)).unsqueeze(1).repeat(1, G.n_latent, 1)
        w_t = G.get_latent(torch.randn(2, 32, generator=gen)).unsqueeze(1).repeat(1, G.n_latent, 1)
        targets = G.synthesize(0.5 * w + 0.5 * w_t).image.clamp(-1, 1)
    in_domain = torch.zeros(2, 1, 32, 32)
    in_domain[0, ..., :16] = 1
    in_domain[1, ..., :16, :] = 1
    targets[0, :, 8:24, 20:28] = torch.tensor([0.9, -0.8, 0.1]).view(3, 1, 1)
    targets[1, :, 20:28, 4:28] = torch.tensor([-0.7, 0.6, 0.8]).view(3, 1, 1)
    return w, targets, in_domain


def state_dict_copy(G):
    return {k: v.detach().clone() for k, v in G.state_dict().items()}


def assert_states_close(a: RefineState, b: RefineState, atol: float, rtol: float):
    assert a.point == b.point
    torch.testing.assert_close(a.losses, b.losses, atol=atol, rtol=rtol)
    torch.testing.assert_close(a.mask_r, b.mask_r)
    torch.testing.assert_close(a.feature, b.feature, atol=atol, rtol=rtol)
    assert a.params.keys() == b.params.keys()
    for n in a.params:
        torch.testing.assert_close(a.params[n], b.params[n], atol=atol, rtol=rtol, msg=n)
    assert torch.equal(a.failed, b.failed)


def take(state: RefineState, i: int) -> RefineState:
    """Sample i of a batch state as a batch of one."""
    s = slice(i, i + 1)
    return RefineState({n: p[s] for n, p in state.params.items()}, state.feature[s], state.mask_r[s],
                       state.in_domain[s], state.point, state.losses[:, s], state.failed[s])


# ------------------------------------------------------------------------------------------------ pieces
def test_config_defaults_and_validation(G):
    cfg = RefineConfig()
    assert (cfg.weight_steps, cfg.weight_lr, cfg.feature_steps, cfg.feature_lr) == (50, 1.5e-3, 100, 9e-2)
    assert (cfg.feature_resolution, cfg.l2, cfg.perceptual, cfg.tune) == (None, 1.0, 1.0, "synthesis")
    assert (cfg.mse_normalisation, cfg.lpips_mask) == ("official", "per_layer")
    assert cfg.resolution_for(G) == 4 and cfg.resolution_for(Generator(1024 // 16, style_dim=8, n_mlp=1,
                                                                         channel_max=8)) == 8
    for kwargs, match in [({"weight_steps": -1}, "weight_steps"), ({"feature_steps": 2.0}, "feature_steps"),
                          ({"weight_lr": 0}, "weight_lr"), ({"feature_lr": float("nan")}, "feature_lr"),
                          ({"l2": -1.0}, "l2"), ({"feature_resolution": 12}, "feature_resolution"),
                          ({"feature_resolution": 2}, "feature_resolution"), ({"tune": "all"}, "tune"),
                          ({"mse_normalisation": "mean"}, "mse_normalisation"), ({"lpips_mask": "x"}, "lpips_mask")]:
        with pytest.raises(ValueError, match=match):
            RefineConfig(**kwargs)
    for r in (32, 64):  # f* enters the next block: the last block has none
        with pytest.raises(ValueError, match=f"feature_resolution={r} .* half the generator size 32"):
            RefineConfig(feature_resolution=r).resolution_for(G)


def test_feature_mask_is_a_soft_average_pool():
    m = torch.zeros(1, 1, 8, 8)
    m[..., :3] = 1                                       # 3 of 8 columns in domain
    out = feature_mask(m, 2)
    assert out.shape == (1, 1, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.75, 0.0], [0.75, 0.0]]))
    with pytest.raises(ValueError, match="in_domain must be"):
        feature_mask(torch.zeros(1, 8, 8), 2)


def test_masked_mse_normalisations_and_zero_when_empty():
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    full = masked_mse(x, y, torch.ones(2, 1, 5, 5), "per_channel")
    torch.testing.assert_close(full, ((x - y) ** 2).mean(dim=(1, 2, 3)))
    m = torch.zeros(2, 1, 5, 5)
    m[0, :, :2] = 1
    out = masked_mse(x, y, m, "per_channel")
    torch.testing.assert_close(out[0], ((x[0, :, :2] - y[0, :, :2]) ** 2).mean())
    assert out[1] == 0
    # official (the default): summed over channels, divided by the one-channel mask sum
    official = masked_mse(x, y, m)
    torch.testing.assert_close(official[0], ((x[0, :, :2] - y[0, :, :2]) ** 2).sum() / 10)
    torch.testing.assert_close(official, 3 * out)
    with pytest.raises(ValueError, match="normalisation"):
        masked_mse(x, y, m, "mean")


def test_per_layer_lpips_mask(lpips):
    """Each layer's map averaged inside the mask nearest-resized to it, summed; ones give LPIPS itself."""
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    m = (torch.rand(2, 1, 8, 8) > 0.5).float()
    ones, masked, ones_1 = lpips.masked_layer_distance(x, y, [torch.ones(2, 1, 8, 8), m, torch.ones(1, 1, 3, 3)])
    torch.testing.assert_close(ones, lpips(x, y), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ones_1, ones)
    maps = lpips.layer_maps(x, y)
    by_hand = sum((d * F.interpolate(m, size=d.shape[-2:])).sum((1, 2, 3)) /
                  F.interpolate(m, size=d.shape[-2:]).sum((1, 2, 3)) for d in maps)
    torch.testing.assert_close(masked, by_hand)
    assert torch.equal(lpips.masked_layer_distance(x, y, [torch.zeros(2, 1, 8, 8)])[0], torch.zeros(2))
    with pytest.raises(ValueError, match="mask"):
        lpips.masked_layer_distance(x, y, [torch.ones(3, 1, 8, 8)])


def test_loss_options_change_only_their_term(G, lpips, batch):
    codes, targets, in_domain = batch
    r = 8
    mask_r = feature_mask(in_domain, r)
    with torch.no_grad():
        out = G.synthesize(codes).image
        only_l2 = [domain_losses(out, targets, in_domain, lpips, RefineConfig(perceptual=0.0, mse_normalisation=n))
                   for n in ("official", "per_channel")]
        torch.testing.assert_close(only_l2[0][0], 3 * only_l2[1][0])
        torch.testing.assert_close(only_l2[0][1], 3 * only_l2[1][1])
        per_layer = domain_losses(out, targets, in_domain, lpips, RefineConfig(l2=0.0), mask_r)
        torch.testing.assert_close(torch.stack(per_layer),
                                   lpips.masked_layer_distance(out, targets, [1 - mask_r, mask_r]))
        full_res = domain_losses(out, targets, in_domain, lpips, RefineConfig(l2=0.0, lpips_mask="full_resolution"))
        torch.testing.assert_close(full_res[1], lpips(out, targets, in_domain))
    with pytest.raises(ValueError, match="needs mask_r"):
        domain_losses(out, targets, in_domain, lpips, RefineConfig())


# ------------------------------------------------------------------------------------------------ refinement
def test_refine_improves_both_domains_and_leaves_G_untouched(G, lpips, batch):
    codes, targets, in_domain = batch
    before = state_dict_copy(G)
    cfg = RefineConfig(weight_steps=8, feature_steps=8, feature_resolution=8)
    state = hybrid_refine(G, codes, targets, in_domain, lpips, cfg)
    assert state.point == "convs.2.in" == G.next_block_input(8)   # after the 8 px ToRGB, as officially
    assert state.feature.shape == (2, G.channels[8], 8, 8) and state.mask_r.shape == (2, 1, 8, 8)
    assert state.losses.shape == (8, 2) and torch.isfinite(state.losses).all()
    assert state.failed.tolist() == [False, False]
    assert state.params.keys() == {n for n, _ in G.named_parameters() if not n.startswith("style.")}
    assert all(p.shape[0] == 2 and not p.requires_grad for p in state.params.values())
    assert not state.feature.requires_grad
    # G is untouched: same values, no gradients
    after = G.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in G.parameters())
    # both per-domain losses drop, for both images
    with torch.no_grad():
        start = G.synthesize(codes).image
        ood0, id0 = domain_losses(start, targets, in_domain, lpips, cfg, state.mask_r)
        ood1, id1 = domain_losses(decode(G, state, codes), targets, in_domain, lpips, cfg, state.mask_r)
    assert torch.all(ood1 < 0.8 * ood0), (ood0, ood1)
    assert torch.all(id1 < 0.9 * id0), (id0, id1)
    assert torch.all(state.losses[-1] < state.losses[0])
    torch.testing.assert_close(state.losses[0], ood0 + id0, atol=1e-5, rtol=1e-4)


def test_default_feature_resolution_is_an_eighth_of_G(G, lpips, batch):
    codes, targets, in_domain = batch
    state = hybrid_refine(G, codes, targets, in_domain, lpips, RefineConfig(weight_steps=1, feature_steps=1))
    assert state.point == G.next_block_input(4) == "convs.0.in"
    assert state.feature.shape == (2, G.channels[4], 4, 4)


def test_all_in_domain_makes_the_feature_path_inert(G, lpips, batch):
    codes, targets, _ = batch
    ones = torch.ones(2, 1, 32, 32)
    state = hybrid_refine(G, codes, targets, ones, lpips, RefineConfig(**STEPS))
    with torch.no_grad():
        init = G.synthesize(codes, capture=[state.point]).features[state.point]
    torch.testing.assert_close(state.feature, init, atol=0, rtol=0)   # zero gradient -> never moved
    other = RefineState(state.params, torch.randn_like(state.feature) * 5, state.mask_r, state.in_domain,
                        state.point, state.losses, state.failed)
    with torch.no_grad():
        torch.testing.assert_close(decode(G, other, codes), decode(G, state, codes), atol=0, rtol=0)
    assert any(not torch.equal(p[0], q) for p, q in zip(state.params.values(),
                                                         [dict(G.named_parameters())[n] for n in state.params]))


def test_all_ood_gives_the_weights_zero_gradient(G, lpips, batch):
    codes, targets, _ = batch
    zeros = torch.zeros(2, 1, 32, 32)
    state = hybrid_refine(G, codes, targets, zeros, lpips, RefineConfig(**STEPS))
    own = dict(G.named_parameters())
    for n, p in state.params.items():
        assert torch.equal(p, own[n].detach().expand_as(p)), n
    with torch.no_grad():
        init = G.synthesize(codes, capture=[state.point]).features[state.point]
    assert (state.feature - init).abs().max() > 1e-3


def as_float64(G, lpips, batch):
    return (copy.deepcopy(G).double(), copy.deepcopy(lpips).double(), *(t.double() for t in batch))


# Batch vs single runs of STEPS on these fixtures, measured with OMP_NUM_THREADS=2 and the batch and the single
# runs at 1 or 2 torch threads each (all four pairings): float32 losses differ by up to 1.1e-5, f* by up to
# 3.2e-3 (Adam turns round-off of near-zero gradients into lr-sized steps), the decoded images by up to 6.2e-4
# (RMS 5.2e-5); float64 by <= 9e-15 everywhere. So: exact equivalence in float64, and in float32 only the
# user-visible outputs, with margins of about 20x.
F64_TOL = dict(atol=1e-10, rtol=1e-9)
F32_LOSSES_TOL = dict(atol=2e-4, rtol=1e-3)   # measured 1.1e-5
F32_IMAGE_MAX, F32_IMAGE_RMS = 1e-2, 1e-3     # measured 6.2e-4, 5.2e-5


def test_batch_of_two_equals_two_single_runs_float64(G, lpips, batch):
    """Samples are independent: a batch equals single runs to float64 round-off."""
    G, lpips, codes, targets, in_domain = as_float64(G, lpips, batch)
    cfg = RefineConfig(**STEPS)
    both = hybrid_refine(G, codes, targets, in_domain, lpips, cfg)
    with torch.no_grad():
        images = decode(G, both, codes)
    for i in range(2):
        s = slice(i, i + 1)
        single = hybrid_refine(G, codes[s], targets[s], in_domain[s], lpips, cfg)
        assert_states_close(take(both, i), single, **F64_TOL)
        with torch.no_grad():
            torch.testing.assert_close(images[s], decode(G, single, codes[s]), **F64_TOL)


def test_batch_of_two_matches_single_runs_float32(G, lpips, batch):
    """In float32 the user-visible results agree (losses, decoded images); the states themselves may not."""
    codes, targets, in_domain = batch
    cfg = RefineConfig(**STEPS)
    both = hybrid_refine(G, codes, targets, in_domain, lpips, cfg)
    with torch.no_grad():
        images = decode(G, both, codes)
    for i in range(2):
        s = slice(i, i + 1)
        single = hybrid_refine(G, codes[s], targets[s], in_domain[s], lpips, cfg)
        torch.testing.assert_close(both.losses[:, s], single.losses, **F32_LOSSES_TOL)
        with torch.no_grad():
            diff = images[s] - decode(G, single, codes[s])
        assert diff.abs().max() < F32_IMAGE_MAX and diff.pow(2).mean().sqrt() < F32_IMAGE_RMS, diff.abs().max()


def test_decode_equals_the_refinement_forward(G, lpips, batch):
    """Refinement is deterministic, so the state after n - 1 steps is what step n's forward pass rendered:
    decoding it must reproduce step n's recorded loss (weights and feature both still being tuned)."""
    codes, targets, in_domain = batch
    n = 4
    full = hybrid_refine(G, codes, targets, in_domain, lpips, RefineConfig(n, 1e-2, n, 9e-2, 8))
    prev = hybrid_refine(G, codes, targets, in_domain, lpips, RefineConfig(n - 1, 1e-2, n - 1, 9e-2, 8))
    torch.testing.assert_close(full.losses[: n - 1], prev.losses)
    with torch.no_grad():
        ood, idd = domain_losses(decode(G, prev, codes), targets, in_domain, lpips, RefineConfig(), prev.mask_r)
    torch.testing.assert_close(ood + idd, full.losses[-1], atol=1e-6, rtol=1e-5)
    assert (full.losses[-1] - full.losses[-2]).abs().min() > 1e-4  # the check is not vacuous


def test_nan_image_fails_only_its_sample(G, lpips, batch):
    """Float64, so that the healthy sample equals its single run to round-off on any CPU (see F64_TOL)."""
    G, lpips, codes, targets, in_domain = as_float64(G, lpips, batch)
    bad = targets.clone()
    bad[1, :, 3, 5] = float("nan")
    cfg = RefineConfig(**STEPS)
    state = hybrid_refine(G, codes, bad, in_domain, lpips, cfg)
    assert state.failed.tolist() == [False, True]
    single = hybrid_refine(G, codes[:1], targets[:1], in_domain[:1], lpips, cfg)
    assert_states_close(take(state, 0), single, **F64_TOL)
    with torch.no_grad():
        torch.testing.assert_close(decode(G, state, codes)[:1], decode(G, single, codes[:1]), **F64_TOL)
    # the failed sample keeps its last finite state: here the initial one (it failed at step 0)
    own = dict(G.named_parameters())
    for n, p in state.params.items():
        assert torch.equal(p[1], own[n].detach()), n
    with torch.no_grad():
        init = G.synthesize(codes, capture=[state.point]).features[state.point]
        torch.testing.assert_close(state.feature[1], init[1], atol=0, rtol=0)
        assert torch.isfinite(decode(G, state, codes)).all()
    assert torch.isnan(state.losses[:, 1]).all() and torch.isfinite(state.losses[:, 0]).all()


def test_weights_only_and_features_only(G, lpips, batch):
    codes, targets, in_domain = batch
    no_feature = hybrid_refine(G, codes, targets, in_domain, lpips, RefineConfig(3, 1e-2, 0, 9e-2, 8))
    assert no_feature.feature is None and no_feature.params is not None and no_feature.losses.shape == (3, 2)
    no_weights = hybrid_refine(G, codes, targets, in_domain, lpips, RefineConfig(0, 1e-2, 3, 9e-2, 8))
    assert no_weights.params is None and no_weights.feature is not None
    with torch.no_grad():
        assert decode(G, no_feature, codes).shape == decode(G, no_weights, codes).shape == (2, 3, 32, 32)
        plain = G.synthesize(codes).image
        nothing = hybrid_refine(G, codes, targets, in_domain, lpips, RefineConfig(0, 1e-2, 0, 9e-2, 8))
        assert nothing.losses.shape == (0, 2)
        torch.testing.assert_close(decode(G, nothing, codes), plain)
    assert all(p.grad is None for p in G.parameters())


def test_input_errors(G, lpips, batch):
    codes, targets, in_domain = batch
    cfg = RefineConfig(1, 1e-2, 1, 9e-2, 8)
    with pytest.raises(ValueError, match=r"codes must be \(B, 8, 32\)"):
        hybrid_refine(G, codes[:, :3], targets, in_domain, lpips, cfg)
    with pytest.raises(ValueError, match=r"images must be \(2, 3, 32, 32\)"):
        hybrid_refine(G, codes, targets[..., :16, :16], in_domain, lpips, cfg)
    with pytest.raises(ValueError, match=r"in_domain must be \(2, 1, 32, 32\)"):
        hybrid_refine(G, codes, targets, in_domain[:1], lpips, cfg)
    with pytest.raises(ValueError, match=r"in_domain must lie in \[0, 1\]"):
        hybrid_refine(G, codes, targets, in_domain * 2, lpips, cfg)
    with pytest.raises(ValueError, match="noise must be a list of 7"):
        hybrid_refine(G, codes, targets, in_domain, lpips, cfg, noise=G.make_noise()[:3])
    with pytest.raises(TypeError, match="RefineConfig"):
        hybrid_refine(G, codes, targets, in_domain, lpips, {"weight_steps": 1})
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        hybrid_refine(G, codes, targets, in_domain, lpips, cfg)
    state = hybrid_refine(G, codes, targets, in_domain, lpips, cfg)
    with pytest.raises(ValueError, match=r"decode: codes must be \(2, 8, 32\)"):
        decode(G, state, codes[:1])


def test_explicit_noise_is_used(G, lpips, batch):
    codes, targets, in_domain = batch
    cfg = RefineConfig(2, 1e-2, 2, 9e-2, 8)
    noise = G.make_noise()
    a = hybrid_refine(G, codes, targets, in_domain, lpips, cfg, noise=noise)
    b = hybrid_refine(G, codes, targets, in_domain, lpips, cfg, noise=noise)
    c = hybrid_refine(G, codes, targets, in_domain, lpips, cfg)
    torch.testing.assert_close(a.losses, b.losses, atol=0, rtol=0)
    assert not torch.allclose(a.losses, c.losses)
    with torch.no_grad():
        assert not torch.allclose(decode(G, a, codes, noise=noise), decode(G, a, codes))


# ------------------------------------------------------------------------------------------------ hand-off
def test_per_image_hand_off_round_trip(G, lpips, batch):
    codes, targets, in_domain = batch
    state = hybrid_refine(G, codes, targets, in_domain, lpips, RefineConfig(**STEPS))
    with torch.no_grad():
        reference = decode(G, state, codes)

    def reload(d):
        buf = io.BytesIO()
        torch.save(d, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    delta = [reload(state_for_image(state, i, G)) for i in range(2)]
    d0 = delta[0]
    assert d0["weights_format"] == "delta_bf16" and "weights" not in d0
    assert all(v.dtype == torch.bfloat16 for v in d0["weights_delta"].values())
    assert d0["point"] == state.point and d0["failed"] is False and d0["losses"].shape == (6,)
    assert d0["feature"].shape == state.feature.shape[1:] and d0["mask_r"].shape == (1, 8, 8)
    assert d0["in_domain"].shape == (1, 32, 32)
    assert d0["weights_delta"]["input.input"].untyped_storage().nbytes() == \
        2 * G.input.input.numel()                        # a copy, not a view of the whole batch
    full = [reload(state_for_image(state, i, G, weights="full")) for i in range(2)]
    assert all(v.dtype == torch.float32 for v in full[0]["weights"].values())
    none = [state_for_image(state, i, G, weights="none") for i in range(2)]
    assert "weights" not in none[0] and "weights_delta" not in none[0]

    with torch.no_grad():
        torch.testing.assert_close(decode(G, state_from_images(full, G), codes), reference, atol=0, rtol=0)
        rebuilt = state_from_images(delta, G)
        assert rebuilt.failed.tolist() == [False, False]
        torch.testing.assert_close(rebuilt.losses, state.losses)
        torch.testing.assert_close(decode(G, rebuilt, codes), reference, atol=2e-3, rtol=0)
        # without weights: the feature path with G's own weights
        no_w = state_from_images(none, G)
        assert no_w.params is None
        expected = decode(G, RefineState(None, state.feature, state.mask_r, state.in_domain, state.point,
                                         state.losses, state.failed), codes)
        torch.testing.assert_close(decode(G, no_w, codes), expected, atol=0, rtol=0)
        # reordering / subsetting images works like indexing the batch
        swapped = state_from_images([full[1], full[0]], G)
        torch.testing.assert_close(decode(G, swapped, codes.flip(0)), reference.flip(0), atol=0, rtol=0)
        # mixed: image 1 without weights decodes with the base weights, image 0 as tuned
        mixed = state_from_images([full[0], none[1]], G)
        out = decode(G, mixed, codes)
        torch.testing.assert_close(out[:1], reference[:1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[1:], expected[1:], atol=1e-5, rtol=1e-4)


def test_hand_off_errors(G, lpips, batch):
    codes, targets, in_domain = batch
    state = hybrid_refine(G, codes, targets, in_domain, lpips, RefineConfig(1, 1e-2, 1, 9e-2, 8))
    with pytest.raises(ValueError, match="weights must be one of"):
        state_for_image(state, 0, G, weights="fp16")
    with pytest.raises(IndexError, match="out of range"):
        state_for_image(state, 2, G)
    d = state_for_image(state, 0, G)
    with pytest.raises(ValueError, match="no images"):
        state_from_images([], G)
    with pytest.raises(ValueError, match=r"image 0 lacks \['mask_r'\]"):
        state_from_images([{k: v for k, v in d.items() if k != "mask_r"}], G)
    with pytest.raises(ValueError, match="different points"):
        state_from_images([d, dict(d, point="convs.3.out")], G)
    bad = dict(d, weights_delta=dict(d["weights_delta"], **{"input.input": torch.zeros(1, 2, 4, 4)}))
    with pytest.raises(ValueError, match=r"input.input has shape \(1, 2, 4, 4\)"):
        state_from_images([bad], G)
