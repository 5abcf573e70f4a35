"""Stage-two alignment + invertibility mask (networks.align_mask) on a tiny 64 px generator and encoder."""
import copy
import io
from pathlib import Path

import pytest
import torch

from networks.align_mask import (LEGACY_MATHS, OFFICIAL_MATHS, AlignMaskLevel, AlignMaskNet, AlignNet, blend,
                                 default_levels, fuse_masks, gate, load_align_mask, save_align_mask, tap_for_level, warp)
from networks.encoders import Encoder4Editing
from networks.stylegan2 import Generator

pytestmark = pytest.mark.usefixtures("single_thread")

LEVELS = [8, 16]


@pytest.fixture(scope="module")
def tiny():
    """(G, encoder, codes, taps, image): frozen tiny G/encoder and one batch of inputs (B=2, 64 px)."""
    torch.manual_seed(0)
    G = Generator(64, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32).eval().requires_grad_(False)
    enc = Encoder4Editing(n_styles=G.n_latent, style_dim=32, input_size=64, width=0.25,
                          units=(1, 1, 1, 1)).eval().requires_grad_(False)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        codes, taps = enc.forward_features(image)
    return G, enc, codes, taps, image


def make_net(tiny, **kwargs):
    G, enc = tiny[0], tiny[1]
    torch.manual_seed(1)
    return AlignMaskNet(G.channels, enc.feature_channels, LEVELS, enc.input_size, **kwargs)


# ------------------------------------------------------------------------------------------- levels and taps
def test_default_levels_and_taps():
    assert default_levels(1024) == [32, 64, 128, 256]
    assert default_levels(256) == [8, 16, 32, 64]
    assert default_levels(64) == [8, 16]
    assert {r: tap_for_level(r, 256) for r in default_levels(1024)} == {32: "f3", 64: "f2", 128: "f1", 256: "f0"}
    # 256 px G with a 256 px encoder: 8 and 16 both come from the 16 px tap (8 via resizing)
    assert [tap_for_level(r, 256) for r in default_levels(256)] == ["f4", "f4", "f3", "f2"]
    assert [tap_for_level(r, 64) for r in default_levels(64)] == ["f3", "f2"]
    assert tap_for_level(48, 256) == "f2"  # nearest larger (64 px)
    with pytest.raises(ValueError, match=r"512.*256"):
        tap_for_level(512, 256)
    for bad in (16, 100):
        with pytest.raises(ValueError, match=str(bad)):
            default_levels(bad)


def test_net_construction_and_config_roundtrip(tiny):
    net = make_net(tiny)
    assert list(net.levels.keys()) == ["8", "16"]
    assert net.taps == {8: "f3", 16: "f2"}
    buf = io.BytesIO()
    torch.save({"config": net.config, "state": net.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    clone = AlignMaskNet(**loaded["config"])
    clone.load_state_dict(loaded["state"], strict=True)
    # config with string resolution keys (as after a YAML/JSON round trip) builds the same network
    cfg = dict(net.config, generator_channels={str(k): v for k, v in net.config["generator_channels"].items()})
    assert AlignMaskNet(**cfg).config == net.config


def test_bad_configuration_errors(tiny):
    G, enc = tiny[0], tiny[1]
    with pytest.raises(ValueError, match="128"):
        AlignMaskNet(G.channels, enc.feature_channels, [8, 128], 64)
    with pytest.raises(ValueError, match="ascending"):
        AlignMaskNet(G.channels, enc.feature_channels, [16, 8], 64)
    with pytest.raises(ValueError, match="f3"):
        AlignMaskNet(G.channels, {"f2": 32}, [8, 16], 64)
    with pytest.raises(ValueError, match="cycles"):
        AlignMaskLevel(8, 8, cycles=0)
    with pytest.raises(ValueError, match="blur_padding"):
        AlignNet(8, blur_padding="reflect")
    with pytest.raises(ValueError, match="warp_grid"):
        AlignMaskNet(G.channels, enc.feature_channels, [8, 16], 64, warp_grid="exact")
    with pytest.raises(ValueError, match="gate_interpolation"):
        AlignMaskNet(G.channels, enc.feature_channels, [8, 16], 64, gate_interpolation="nearest")


# ------------------------------------------------------------------------------------------- warp / fuse / blend
def test_warp_identity_and_one_pixel_shift():
    feat = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(warp(feat, torch.zeros(2, 2, 8, 8), "identity"), feat, rtol=0, atol=1e-6)
    flow = torch.zeros(2, 2, 8, 8)
    flow[:, 0] = 2 / 8  # one pixel in x: output(y, x) = feature(y, x + 1)
    out = warp(feat, flow, "identity")
    torch.testing.assert_close(out[..., :-1], feat[..., 1:], rtol=0, atol=1e-5)
    assert out[..., -1].abs().max() == 0  # zeros padding
    flow = torch.zeros(2, 2, 8, 8)
    flow[:, 1] = -2 / 8  # one pixel up in y: output(y, x) = feature(y - 1, x)
    torch.testing.assert_close(warp(feat, flow, "identity")[..., 1:, :], feat[..., :-1, :], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="flow"):
        warp(feat, torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="grid"):
        warp(feat, torch.zeros(2, 2, 8, 8), "exact")


def test_official_linspace_grid_is_not_the_identity():
    """The official base grid linspace(-1, 1, n) sampled with align_corners=False (the default): a zero flow reads
    the map from half a pixel outside its first centre to half a pixel outside its last one, so the content
    shrinks by (n - 1) / n and the outermost pixels are half zero padding."""
    n = 8
    ramp = (torch.arange(n, dtype=torch.float32) + 1).expand(1, 1, n, n).contiguous()  # value = column index + 1
    out = warp(ramp, torch.zeros(1, 2, n, n))
    assert warp(ramp, torch.zeros(1, 2, n, n), "linspace").equal(out)
    # column j samples x = -1 + 2j / (n - 1), pixel coordinate ((x + 1) * n - 1) / 2, bilinear between columns
    pos = (torch.arange(n, dtype=torch.float32) * 2 / (n - 1) * n - 1) / 2
    torch.testing.assert_close(out[0, 0, 3, 1:-1], pos[1:-1] + 1, rtol=0, atol=1e-5)
    # the outermost columns fall half a pixel outside the map: zeros padding halves them
    torch.testing.assert_close(out[0, 0, 3, [0, -1]], torch.tensor([0.5, 0.5 * n]), rtol=0, atol=1e-5)
    assert (out - ramp).abs().max() > 0.4


def test_fuse_masks_on_hand_made_alphas():
    a, b = 0.6, 0.3
    fused = fuse_masks({16: torch.full((1, 1, 16, 16), b), 8: torch.full((1, 1, 8, 8), a)}, 32)
    assert fused.shape == (1, 1, 32, 32)
    torch.testing.assert_close(fused, torch.full_like(fused, a * (b + 1 - a)))
    # coarse 0 -> 0 whatever the fine level says; coarse 1 -> the fine level decides
    coarse = torch.zeros(1, 1, 8, 8)
    coarse[..., 4:] = 1
    fine = torch.rand(1, 1, 16, 16)
    fused = fuse_masks({8: coarse, 16: fine}, 16)
    assert fused[..., :7].abs().max() == 0
    torch.testing.assert_close(fused[..., 9:], fine[..., 9:])
    # three levels, values stay in [0, 1]; a single level is just its up-sampled alpha
    alphas = {4: torch.rand(2, 1, 4, 4), 8: torch.rand(2, 1, 8, 8), 16: torch.rand(2, 1, 16, 16)}
    fused = fuse_masks(alphas, 64)
    assert fused.min() >= 0 and fused.max() <= 1
    torch.testing.assert_close(fuse_masks({8: torch.full((1, 1, 8, 8), 0.25)}, 32), torch.full((1, 1, 32, 32), 0.25))
    with pytest.raises(ValueError, match="no level"):
        fuse_masks({}, 32)


def test_gate_formula():
    alpha = torch.rand(1, 1, 8, 8)
    u = torch.full((1, 1, 8, 8), 0.5)
    torch.testing.assert_close(gate(alpha, u), alpha * 0.5 + 0.25)
    for mode in ("bicubic", "bilinear"):
        torch.testing.assert_close(gate(alpha, torch.ones(1, 1, 4, 4), mode), alpha)
        assert gate(alpha, torch.zeros(1, 1, 4, 4), mode).abs().max() == 0
    # the official bicubic resize keeps the corners (align_corners=True); bilinear (align_corners=False) does not
    coarse = torch.rand(1, 1, 4, 4)
    ones = torch.ones(1, 1, 8, 8)  # alpha = 1: the gate returns U * (2 - U), monotone in U on [0, 1]
    cubic, linear = gate(ones, coarse, "bicubic"), gate(ones, coarse, "bilinear")
    torch.testing.assert_close(cubic[..., 0, 0], (coarse * (2 - coarse))[..., 0, 0])
    assert not torch.allclose(cubic, linear)
    with pytest.raises(ValueError, match="interpolation"):
        gate(alpha, coarse, "nearest")


def test_blend_picks_input_where_mask_is_one():
    x, g = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    out = blend(x, g, mask)
    torch.testing.assert_close(out[..., :4], x[..., :4])
    torch.testing.assert_close(out[..., 4:], g[..., 4:])
    torch.testing.assert_close(blend(x, g, torch.full_like(mask, 0.25)), 0.25 * x + 0.75 * g)


# ------------------------------------------------------------------------------------------- one level
def test_level_shapes_bounds_and_tap_resizing():
    torch.manual_seed(0)
    level = AlignMaskLevel(16, 8, warp_scale=0.05, cycles=2)
    feat = torch.randn(2, 16, 16, 16)
    out = level(feat, torch.randn(2, 8, 16, 16))
    assert out.feature.shape == (2, 16, 16, 16)
    assert out.flow.shape == (2, 2, 16, 16) and out.alpha.shape == (2, 1, 16, 16)
    assert out.flow.abs().max() <= 0.05 and 0 <= out.alpha.min() and out.alpha.max() <= 1
    # a larger tap (nearest-larger encoder feature) is resized to the level's resolution
    out = level(feat, torch.randn(2, 8, 32, 32), coarse_alpha=torch.rand(2, 1, 8, 8))
    assert out.flow.shape == (2, 2, 16, 16) and out.alpha.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="tap"):
        level(feat, torch.randn(2, 4, 16, 16))


@pytest.mark.parametrize("cycles", [1, 3])
def test_flow_bounded_and_alpha_in_unit_range_under_extreme_parameters(cycles):
    torch.manual_seed(0)
    s = 0.08
    level = AlignMaskLevel(8, 8, warp_scale=s, cycles=cycles, bias=True)
    with torch.no_grad():
        for p in level.parameters():
            p.mul_(1e3).add_(torch.randn_like(p) * 1e2)
    feat, tap = torch.randn(2, 8, 16, 16) * 100, torch.randn(2, 8, 16, 16) * 100
    for coarse in (None, torch.rand(2, 1, 8, 8)):
        out = level(feat, tap, coarse)
        assert torch.isfinite(out.feature).all()
        assert out.flow.abs().max() <= s  # never beyond warp_scale, not even by round-off
        assert out.flow.abs().max() > 0.5 * s  # the heads were driven hard
        assert out.alpha.min() >= 0 and out.alpha.max() <= 1


@pytest.mark.parametrize("interpolation, first_one", [("bicubic", 11), ("bilinear", 9)])
def test_gating_where_coarse_alpha_is_zero_fine_alpha_is_zero(interpolation, first_one):
    torch.manual_seed(0)
    level = AlignMaskLevel(8, 8, gate_interpolation=interpolation)
    feat, tap = torch.randn(1, 8, 16, 16), torch.randn(1, 8, 16, 16)
    coarse = torch.zeros(1, 1, 8, 8)
    coarse[..., 4:] = 1
    ungated = level(feat, tap)
    gated = level(feat, tap, coarse)
    # the up-sampled coarse mask is <= 0 on columns 0..6 of 16 (bicubic undershoots next to the step, the clip
    # makes it 0): the fine alpha is exactly 0 there and the feature is left untouched
    assert gated.alpha[..., :7].abs().max() == 0
    torch.testing.assert_close(gated.feature[..., :7], feat[..., :7])
    # where the up-sampled coarse mask is exactly 1 the fine alpha is unchanged (bicubic overshoots 1 on 9, 10)
    torch.testing.assert_close(gated.alpha[..., first_one:], ungated.alpha[..., first_one:])
    torch.testing.assert_close(gated.flow, ungated.flow)  # the coarse flow is not used
    assert level(feat, tap, torch.zeros(1, 1, 8, 8)).alpha.abs().max() == 0


def test_blur_padding_modes():
    torch.manual_seed(0)
    zeros = AlignNet(4, blur_padding="zeros")
    replicate = AlignNet(4, blur_padding="replicate")
    replicate.load_state_dict(zeros.state_dict())
    s, e = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    a, b = zeros(s, e), replicate(s, e)
    assert a.shape == b.shape == (1, 3, 8, 8)
    # same interior; the zero padding attenuates the top/left border (official behaviour)
    torch.testing.assert_close(a[..., 2:-1, 2:-1], b[..., 2:-1, 2:-1])
    assert (a[:, 2, 0, :] < b[:, 2, 0, :]).all()


# ------------------------------------------------------------------------------------------- full network in G
def test_forward_shapes_and_ranges(tiny):
    G, _, codes, taps, image = tiny
    net = make_net(tiny)
    out = net(G, codes, taps, image)
    assert out.output.shape == out.generated.shape == (2, 3, 64, 64)
    assert out.mask.shape == (2, 1, 64, 64)
    assert sorted(out.alphas) == sorted(out.flows) == LEVELS
    for r in LEVELS:
        assert out.alphas[r].shape == (2, 1, r, r) and out.flows[r].shape == (2, 2, r, r)
        assert out.alphas[r].min() >= 0 and out.alphas[r].max() <= 1
        assert out.flows[r].abs().max() <= 0.08
    assert out.mask.min() >= 0 and out.mask.max() <= 1
    torch.testing.assert_close(out.mask, fuse_masks(out.alphas, 64))
    torch.testing.assert_close(out.output, blend(image, out.generated, out.mask))
    with pytest.raises(ValueError, match="64"):
        net(G, codes, taps, image[..., :32, :32])
    with pytest.raises(KeyError, match="f2"):
        net(G, codes, {"f3": taps["f3"]}, image)


def test_inactive_levels_leave_generator_untouched(tiny):
    G, _, codes, taps, image = tiny
    net = make_net(tiny)
    with torch.no_grad():
        plain = G.synthesize(codes).image
        none = net(G, codes, taps, image, active_levels=[])
        torch.testing.assert_close(none.generated, plain, rtol=0, atol=0)
        torch.testing.assert_close(none.output, plain, rtol=0, atol=0)
        assert none.alphas == {} and none.mask.abs().max() == 0
        # only the 8 px level: identical to editing that one hook point by hand; 16 px is not touched
        first = net(G, codes, taps, image, active_levels=[8])
        assert sorted(first.alphas) == [8]
        by_hand = G.synthesize(codes, edits={G.upconv_modulated(8): lambda f: net.levels["8"](f, taps["f3"]).feature})
        torch.testing.assert_close(first.generated, by_hand.image, rtol=0, atol=0)
        assert (first.generated - plain).abs().max() > 0
        torch.testing.assert_close(first.mask, torch.nn.functional.interpolate(
            first.alphas[8], size=(64, 64), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="prefix"):
        net(G, codes, taps, image, active_levels=[16])


def test_fine_level_is_gated_by_the_coarse_alpha_of_the_same_pass(tiny):
    G, _, codes, taps, image = tiny
    net = make_net(tiny)
    seen = {}
    original = net.levels["16"].forward

    def spy(feature, tap, coarse_alpha=None, cue=None):
        seen["coarse"] = coarse_alpha
        return original(feature, tap, coarse_alpha, cue)

    net.levels["16"].forward = spy
    with torch.no_grad():
        out = net(G, codes, taps, image)
    assert seen["coarse"] is out.alphas[8]


def test_zero_alpha_gives_the_plain_generation(tiny):
    G, _, codes, taps, image = tiny
    net = make_net(tiny)
    with torch.no_grad():
        for level in net.levels.values():
            for norm in (level.align.body[1].res[-1], level.align.body[1].shortcut[-1]):
                norm.weight[2] = 0
                norm.bias[2] = -1e4  # sigmoid(-2e4) == 0 exactly
        out = net(G, codes, taps, image)
        plain = G.synthesize(codes).image
    for r in LEVELS:
        assert out.alphas[r].abs().max() == 0
    assert out.mask.abs().max() == 0
    torch.testing.assert_close(out.generated, plain, rtol=0, atol=1e-5)  # conv layout round-off
    torch.testing.assert_close(out.output, out.generated, rtol=0, atol=0)


def test_optimisation_step_lowers_reconstruction_loss_and_gradients_reach_only_the_net(tiny):
    G, enc, codes, taps, image = tiny
    net = make_net(tiny)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    noise = [torch.randn_like(n) for n in G.stored_noise()]

    def loss_fn():
        out = net(G, codes, taps, image, noise=noise)
        return torch.nn.functional.mse_loss(out.output, image)

    loss = loss_fn()
    opt.zero_grad()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for module in (G, enc):
        assert all(p.grad is None for p in module.parameters())
    opt.step()
    with torch.no_grad():
        assert loss_fn() < loss.detach()


def test_alpha_init_sets_the_starting_mask_and_survives_export(tiny, tmp_path):
    G, _, codes, taps, image = tiny
    with torch.no_grad():
        official = make_net(tiny)(G, codes, taps, image).mask.mean()
        low_net = make_net(tiny, alpha_init=-2.0)
        low = low_net(G, codes, taps, image).mask.mean()
    assert 0.3 < official < 0.7 and low < 0.2
    net, _ = load_align_mask(save_align_mask(tmp_path / "a.pt", low_net))
    assert net.config["alpha_init"] == -2.0
    with torch.no_grad():
        torch.testing.assert_close(net(G, codes, taps, image).mask.mean(), low)


def test_error_cue_reaches_the_alpha_logits_and_defaults_to_the_reconstruction_error(tiny):
    G, _, codes, taps, image = tiny
    net = make_net(tiny, error_cue=True)
    with torch.no_grad():
        err = net.reconstruction_error(G, codes, image)
        default = net(G, codes, taps, image)
        explicit = net(G, codes + 1.0, taps, image, cue=err)  # an edited code keeps the input's cue
        zero = net(G, codes, taps, image, cue=torch.zeros_like(err))
        for level in net.levels.values():  # without the cue path: the official logits
            level.align.cue = None
        net.error_cue = False
        official = net(G, codes, taps, image)
    assert err.shape == (2, 1, 64, 64) and err.min() >= 0
    torch.testing.assert_close(zero.mask, official.mask)
    assert default.mask.mean() > official.mask.mean()  # the initial prior: more error -> more mask
    torch.testing.assert_close(explicit.mask, default.mask, atol=0.05, rtol=0)  # mask from the input's cue...
    assert not torch.allclose(explicit.generated, default.generated)  # ...while the edit changes the generation
    with pytest.raises(ValueError, match="error_cue=True"):
        make_net(tiny, error_cue=True).levels["8"].align(torch.zeros(1, 32, 8, 8), torch.zeros(1, 32, 8, 8))


# ------------------------------------------------------------------------------------------- resampling options
def test_resampling_options_are_saved_and_old_files_keep_our_variants(tiny, tmp_path):
    """New networks default to the official function; a hand-off records its choice, and a file written before the
    options existed (no keys in its config, like the shipped SynthFaces hand-off) runs with our variants."""
    G, _, codes, taps, image = tiny
    assert {k: make_net(tiny).config[k] for k in OFFICIAL_MATHS} == OFFICIAL_MATHS
    ours = make_net(tiny, **LEGACY_MATHS)
    path = save_align_mask(tmp_path / "ours.pt", ours)
    loaded, _ = load_align_mask(path)
    assert loaded.config == ours.config
    ckpt = torch.load(path, weights_only=True)
    for key in LEGACY_MATHS:
        del ckpt["config"][key]
    torch.save(ckpt, tmp_path / "old.pt")
    old, _ = load_align_mask(tmp_path / "old.pt")
    assert old.config == ours.config
    official = make_net(tiny)
    official.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ref = ours(G, codes, taps, image).output
        torch.testing.assert_close(old(G, codes, taps, image).output, ref, rtol=0, atol=0)
        # each option on its own changes the function
        noisy = copy.deepcopy(G)  # the tiny G's noise strengths start at 0: give the noise an effect
        for name, p in noisy.named_parameters():
            if "noise" in name:
                p.fill_(0.5)
        for key, value in OFFICIAL_MATHS.items():
            variant = make_net(tiny, **{**LEGACY_MATHS, key: value})
            variant.load_state_dict(ours.state_dict())
            g = noisy if key == "inference_noise" else G
            assert (variant(g, codes, taps, image).output - ours(g, codes, taps, image).output).abs().max() > 1e-3, key


def test_shipped_hand_off_runs_with_the_function_it_was_trained_with():
    path = Path(__file__).resolve().parents[1] / "experiments" / "weights" / "synthfaces" / "align_mask.pt"
    net, meta = load_align_mask(path)
    assert {k: net.config[k] for k in LEGACY_MATHS} == LEGACY_MATHS
    assert meta["module"]["blur_padding"] == "replicate"


def test_a_generator_that_does_not_fit_the_levels_is_named(tiny):
    G, _, codes, taps, image = tiny
    net = make_net(tiny)
    other = Generator(64, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=16).eval()
    with pytest.raises(ValueError, match="level 8 expects a generator with 32 channels at 8 px; this generator has 16"):
        net(other, codes, taps, image)
