"""Encoders (e4e / pSp on IR-SE), ArcFace backbone, input resizing and e4e-layout checkpoints.

The compatibility case rebuilds a full IR-SE-50 e4e (256 px, 14 styles) from the deterministic recipe of
``tests/data/compat/e4e_irse50_256.pt`` on the meta device (no random init) and must reproduce the official
implementation's codes; everything else uses narrow encoders and a 16 px generator.
"""
import warnings

import pytest
import torch

from networks.checkpoints import CheckpointError, describe_mismatch
from networks.encoder_checkpoints import LoadedEncoder, export_e4e_checkpoint, load_e4e_checkpoint
from networks.encoders import (ENCODER_KINDS, Encoder4Editing, GradualStyleEncoder, IRSEArcFace, build_encoder,
                               get_blocks, resize_to_encoder)
from networks.encoders.irse import infer_backbone_args
from networks.stylegan2 import Generator
from tests.helpers.compat_weights import load_vectors, state_dict_from_vectors

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(n_styles=6, style_dim=32, input_size=16, width=0.125, units=(1, 1, 1, 1))
G_CFG = dict(size=16, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32)


def images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_encoder(kind="e4e", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_encoder(kind, **dict(TINY, **overrides))


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    return Generator(**G_CFG).eval()


def randomise_bn(module, seed=0):
    """Non-trivial BatchNorm statistics so eval-mode checks are not accidentally identities."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(1 + 0.1 * torch.rand(m.running_var.shape, generator=gen))
    return module


# ---------------------------------------------------------------------------------------- compatibility
def test_e4e_irse50_matches_official_vectors():
    vectors = load_vectors("e4e_irse50_256.pt")
    cfg = vectors["config"]
    state = {k[len("encoder."):]: v for k, v in state_dict_from_vectors(vectors).items()}
    with torch.device("meta"):
        encoder = Encoder4Editing(num_layers=cfg["num_layers"], mode=cfg["mode"], n_styles=cfg["n_styles"],
                                  input_size=cfg["stylegan_size"])
    assert describe_mismatch(encoder, state) == ""
    encoder.load_state_dict(state, strict=True, assign=True)
    encoder.eval()
    assert encoder.progressive_stage >= cfg["n_styles"] - 1  # inference: all deltas
    case = next(c for c in vectors["cases"] if c["name"] == "encode")
    with torch.inference_mode():
        codes = encoder(case["image"])
    torch.testing.assert_close(codes, case["codes"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(codes + case["latent_avg"], case["codes_plus_latent_avg"], rtol=1e-4, atol=1e-4)


def test_official_architecture_names_and_taps():
    with torch.device("meta"):
        enc = Encoder4Editing()
    keys = enc.state_dict()
    assert len(enc.body) == 24 and enc.stage_ends == [2, 6, 20, 23]
    assert tuple(keys["body.0.res_layer.5.fc1.weight"].shape) == (4, 64, 1, 1)
    assert "body.0.shortcut_layer.0.weight" not in keys  # stage 1 keeps the width: max-pool shortcut
    assert tuple(keys["body.21.shortcut_layer.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(keys["styles.13.linear.weight"].shape) == (512, 512) and "styles.13.convs.10.weight" in keys
    assert "styles.0.convs.8.weight" not in keys  # coarse heads: 4 convs at 16x16
    assert tuple(keys["latlayer1.weight"].shape) == (512, 256, 1, 1)
    assert tuple(keys["latlayer2.weight"].shape) == (512, 128, 1, 1)
    assert enc.feature_channels == {"f0": 64, "f1": 64, "f2": 128, "f3": 256, "f4": 512}
    assert enc.feature_strides == {"f0": 1, "f1": 2, "f2": 4, "f3": 8, "f4": 16}
    assert infer_backbone_args(keys) == dict(num_layers=50, mode="ir_se", width=1, units=None)
    with torch.device("meta"):
        ir100 = GradualStyleEncoder(num_layers=100, mode="ir")
    assert infer_backbone_args(ir100.state_dict()) == dict(num_layers=100, mode="ir", width=1, units=None)
    assert [len(stage) for stage in get_blocks(152)] == [3, 8, 36, 3]


# ---------------------------------------------------------------------------------------- shapes and taps
@pytest.mark.parametrize("kind", ENCODER_KINDS)
@pytest.mark.parametrize("size", [64, 256])
def test_tap_shapes(kind, size):
    enc = build_encoder(kind, n_styles=10, style_dim=128, input_size=size, width=0.125 if size == 256 else 0.25,
                        units=(1, 1, 2, 1)).eval()
    x = images(2, size)
    with torch.no_grad():
        codes, feats = enc.forward_features(x)
        plain = enc(x)
    assert codes.shape == (2, 10, 128)
    torch.testing.assert_close(codes, plain)
    assert list(feats) == ["f0", "f1", "f2", "f3", "f4"]
    for name, f in feats.items():
        side = size // enc.feature_strides[name]
        assert f.shape == (2, enc.feature_channels[name], side, side), name
    w = 0.125 if size == 256 else 0.25
    assert enc.feature_channels == {"f0": int(64 * w), "f1": int(64 * w), "f2": int(128 * w), "f3": int(256 * w),
                                    "f4": int(512 * w)}


def test_config_kind_and_rebuild():
    enc = tiny_encoder("psp", units=[1, 1, 1, 1])
    assert enc.kind == "psp" and ENCODER_KINDS == ("e4e", "psp")
    assert enc.config == dict(num_layers=50, mode="ir_se", n_styles=6, style_dim=32, input_size=16, width=0.125,
                              units=(1, 1, 1, 1), input_nc=3)
    again = build_encoder("psp", **enc.config)
    assert again.config == enc.config
    assert again.load_state_dict(enc.state_dict()) is not None
    assert isinstance(tiny_encoder("e4e"), Encoder4Editing) and tiny_encoder("e4e").kind == "e4e"


def test_psp_and_e4e_share_weights_and_differ_in_combination():
    e4e = randomise_bn(tiny_encoder("e4e")).eval()
    psp = tiny_encoder("psp").eval()
    psp.load_state_dict(e4e.state_dict())
    x = images(3)
    with torch.no_grad():
        a, b = e4e(x), psp(x)
    assert not hasattr(psp, "set_progressive_stage")
    torch.testing.assert_close(a[:, 0], b[:, 0])
    torch.testing.assert_close(a[:, 1:], b[:, :1] + b[:, 1:])  # e4e: base style + per-layer deltas
    assert (b[:, 1:] - b[:, :1]).abs().amax() > 1e-4


def test_progressive_stages():
    enc = randomise_bn(tiny_encoder("e4e")).eval()
    x = images(2)
    assert enc.progressive_stage == 6 and enc.active_deltas == 5
    with torch.no_grad():
        full = enc(x)
        enc.set_progressive_stage(0)
        w = enc(x)
        enc.set_progressive_stage(2)
        partial = enc(x)
        enc.set_progressive_stage(5)
        last = enc(x)
    torch.testing.assert_close(w, w[:, :1].expand_as(w))  # stage 0: a single W repeated
    torch.testing.assert_close(partial[:, :3], full[:, :3])
    torch.testing.assert_close(partial[:, 3:], full[:, :1].expand(-1, 3, -1))
    assert (full[:, 3:] - full[:, :1]).abs().amax(dim=-1).min() > 1e-5
    torch.testing.assert_close(last, full)
    # training at stage 1: only the base head and delta 1 (plus the backbone) get gradients
    enc.train().set_progressive_stage(1)
    enc(x).square().sum().backward()
    assert all(p.grad is not None for p in enc.styles[1].parameters())
    assert all(p.grad is None for p in enc.styles[2].parameters())
    assert enc.latlayer1.weight.grad is None  # middle level not needed yet
    assert not hasattr(enc, "latlayer2")  # 6 styles: no style reads the fine level
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match="stage"):
            enc.set_progressive_stage(bad)


@pytest.mark.parametrize("n_styles", [3, 6, 10])
def test_all_parameters_train_at_full_stage(n_styles):
    enc = tiny_encoder("e4e", n_styles=n_styles).train()
    assert hasattr(enc, "latlayer1") == (n_styles > 3) and hasattr(enc, "latlayer2") == (n_styles > 7)
    enc(images(4)).square().mean().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match=r"unknown encoder kind 'restyle'.*\['e4e', 'psp'\]"):
        build_encoder("restyle", **TINY)
    with pytest.raises(ValueError, match="input_size must be a power of two"):
        build_encoder("e4e", **dict(TINY, input_size=48))
    with pytest.raises(ValueError, match="units must be 4 positive integers"):
        build_encoder("e4e", **dict(TINY, units=(1, 1)))
    with pytest.raises(ValueError, match="num_layers must be one of"):
        build_encoder("psp", **dict(TINY, num_layers=34))
    with pytest.raises(ValueError, match="mode must be one of"):
        build_encoder("psp", **dict(TINY, mode="se"))
    with pytest.raises(ValueError, match="width must be a positive number"):
        build_encoder("psp", **dict(TINY, width=0))
    enc = tiny_encoder()
    with pytest.raises(ValueError, match=r"expects float images \(B, 3, 16, 16\).*resize_to_encoder"):
        enc(images(1, 32))


# ---------------------------------------------------------------------------------------- resizing
def test_resize_to_encoder():
    x = images(2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resize_to_encoder(x, 16) is x
    with pytest.warns(UserWarning, match=r"resizing images from \(32, 32\) to the encoder's 16x16"):
        y = resize_to_encoder(images(2, 32), 16)
    assert y.shape == (2, 3, 16, 16)
    flat = torch.full((1, 3, 32, 32), 0.25)
    with pytest.warns(UserWarning):
        torch.testing.assert_close(resize_to_encoder(flat, 8), torch.full((1, 3, 8, 8), 0.25))
    with pytest.raises(ValueError, match=r"model.encoder.input_size=16"):
        resize_to_encoder(images(2, 32), 16, allow_resize=False)
    with pytest.raises(ValueError, match=r"my.key=16"):
        resize_to_encoder(images(2, 32), 16, allow_resize=False, key="my.key")


# ---------------------------------------------------------------------------------------- ArcFace
def test_arcface_key_names_and_embedding():
    torch.manual_seed(0)
    net = randomise_bn(IRSEArcFace()).eval()
    keys = net.state_dict()
    out_keys = sorted(k for k in keys if k.startswith("output_layer."))
    assert out_keys == sorted(
        [f"output_layer.0.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
        + ["output_layer.3.weight", "output_layer.3.bias"]
        + [f"output_layer.4.{n}" for n in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")])
    assert tuple(keys["output_layer.3.weight"].shape) == (512, 512 * 7 * 7)
    assert tuple(keys["input_layer.0.weight"].shape) == (64, 3, 3, 3)
    assert tuple(keys["body.23.res_layer.5.fc2.weight"].shape) == (512, 32, 1, 1)
    assert len(net.body) == 24
    x = images(2, 112).requires_grad_(True)
    emb = net(x)
    assert emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    emb[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\)"):
        net(images(1, 64))
    with pytest.raises(ValueError, match="input_size must be 112 or 224"):
        IRSEArcFace(input_size=128)


def test_arcface_variants():
    with torch.device("meta"):
        no_affine = IRSEArcFace(affine=False, mode="ir", input_size=224)
    keys = no_affine.state_dict()
    assert "output_layer.4.weight" not in keys and "output_layer.4.running_mean" in keys
    assert "body.0.res_layer.5.fc1.weight" not in keys
    assert tuple(keys["output_layer.3.weight"].shape) == (512, 512 * 14 * 14)
    small = IRSEArcFace(width=0.125, units=(1, 1, 1, 1)).eval()
    emb = small(images(3, 112))
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


# ---------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_export_load_round_trip(kind, tmp_path):
    enc, g = randomise_bn(tiny_encoder(kind)), tiny_generator()
    latent_avg = torch.randn(32)
    path = export_e4e_checkpoint(tmp_path / "out" / "encoder.pt", enc, g, latent_avg,
                                 opts={"note": "round trip", "encoder_type": "ignored"}, extra={"step": 7})
    assert path == tmp_path / "out" / "encoder.pt" and sorted(p.name for p in path.parent.iterdir()) == ["encoder.pt"]
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 7 and raw["latent_avg"].shape == (6, 32)
    assert raw["opts"]["encoder_type"] == {"e4e": "Encoder4Editing", "psp": "GradualStyleEncoder"}[kind]
    assert raw["opts"]["note"] == "round trip" and raw["opts"]["stylegan_size"] == 16
    assert raw["opts"]["encoder_config"]["units"] == [1, 1, 1, 1]
    assert all(k.startswith(("encoder.", "decoder.")) for k in raw["state_dict"])

    loaded = load_e4e_checkpoint(path)
    assert isinstance(loaded, LoadedEncoder)
    assert type(loaded.encoder) is type(enc) and loaded.encoder.config == enc.config
    assert loaded.generator.config == g.config and not loaded.encoder.training
    for mine, theirs in ((enc, loaded.encoder), (g, loaded.generator)):
        ref = mine.state_dict()
        assert all(torch.equal(ref[k], v) for k, v in theirs.state_dict().items())
    torch.testing.assert_close(loaded.latent_avg, latent_avg.expand(6, 32))
    x = images(2)
    enc.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(x), enc(x))
        codes = loaded.encoder(x) + loaded.latent_avg
        torch.testing.assert_close(loaded.generator([codes], input_is_latent=True)[0],
                                   g([codes], input_is_latent=True)[0])


def test_export_rejects_mismatches(tmp_path):
    enc, g = tiny_encoder(), tiny_generator()
    with pytest.raises(ValueError, match="latent_avg has shape"):
        export_e4e_checkpoint(tmp_path / "a.pt", enc, g, torch.zeros(5, 32))
    with pytest.raises(ValueError, match=r"encoder makes \(4, 32\) codes"):
        export_e4e_checkpoint(tmp_path / "a.pt", tiny_encoder(n_styles=4), g, torch.zeros(32))
    with pytest.raises(ValueError, match="extra may not override"):
        export_e4e_checkpoint(tmp_path / "a.pt", enc, g, torch.zeros(32), extra={"opts": {}})
    assert not list(tmp_path.iterdir())


def official_layout(kind_name="GradualStyleEncoder", **opts):
    """A file as the official e4e / pSp coaches write it: no encoder/generator configs, latent_avg (style_dim,)."""
    cls = GradualStyleEncoder if kind_name == "GradualStyleEncoder" else Encoder4Editing
    torch.manual_seed(1)
    enc = randomise_bn(cls(n_styles=6, style_dim=32, input_size=256, width=0.125, units=(1, 2, 1, 1)))
    g = tiny_generator()
    state = {f"encoder.{k}": v for k, v in enc.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in g.state_dict().items()})
    ckpt = {"state_dict": state, "latent_avg": torch.randn(32),
            "opts": dict({"encoder_type": kind_name, "output_size": 16, "start_from_latent_avg": True,
                          "lpips_lambda": 0.8}, **opts)}
    return ckpt, enc, g


def test_official_layout_loads(tmp_path):
    ckpt, enc, g = official_layout()
    torch.save(ckpt, tmp_path / "psp_like.pt")
    loaded = load_e4e_checkpoint(tmp_path / "psp_like.pt")
    assert isinstance(loaded.encoder, GradualStyleEncoder)
    assert loaded.encoder.config == dict(enc.config)  # width / units inferred, input size 256 as the releases
    assert loaded.opts["lpips_lambda"] == 0.8
    torch.testing.assert_close(loaded.latent_avg, ckpt["latent_avg"].expand(6, 32))
    enc.eval()
    x = images(1, 256)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder(x), enc(x))

    ckpt, enc, g = official_layout("Encoder4Editing", stylegan_size=16, start_from_latent_avg=False)
    ckpt["latent_avg"] = torch.randn(6, 32)
    torch.save(ckpt, tmp_path / "e4e_like.pt")
    loaded = load_e4e_checkpoint(tmp_path / "e4e_like.pt")
    assert isinstance(loaded.encoder, Encoder4Editing)
    assert torch.equal(loaded.latent_avg, torch.zeros(6, 32))  # codes are not offset by the average


def test_bad_files_fail_clearly(tmp_path):
    def write(name, obj):
        torch.save(obj, tmp_path / name)
        return tmp_path / name

    with pytest.raises(CheckpointError, match="not found"):
        load_e4e_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"tensor\.pt is not an e4e/pSp encoder checkpoint"):
        load_e4e_checkpoint(write("tensor.pt", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"gen\.pt is not an e4e/pSp encoder checkpoint.*g_ema"):
        load_e4e_checkpoint(write("gen.pt", {"g_ema": tiny_generator().state_dict(), "latent_avg": torch.zeros(32)}))

    ckpt, _, _ = official_layout()
    no_enc = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if k.startswith("decoder.")})
    with pytest.raises(CheckpointError, match=r"no_enc\.pt: state_dict has no 'encoder\.\*' keys"):
        load_e4e_checkpoint(write("no_enc.pt", no_enc))
    no_dec = dict(ckpt, state_dict={k: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")})
    with pytest.raises(CheckpointError, match=r"no_dec\.pt: state_dict has no 'decoder\.\*' keys"):
        load_e4e_checkpoint(write("no_dec.pt", no_dec))

    shaped = dict(ckpt, state_dict=dict(ckpt["state_dict"]))
    shaped["state_dict"]["encoder.styles.2.linear.weight"] = torch.zeros(32, 16)
    with pytest.raises(CheckpointError, match=r"(?s)shaped\.pt \[encoder\.\*\].*mis-shaped.*styles\.2\.linear\.weight"):
        load_e4e_checkpoint(write("shaped.pt", shaped))
    extra_key = dict(ckpt, state_dict=dict(ckpt["state_dict"], **{"encoder.styles.9.linear.bias": torch.zeros(32)}))
    with pytest.raises(CheckpointError, match=r"(?s)unexpected.*styles\.9\.linear\.bias"):
        load_e4e_checkpoint(write("extra.pt", extra_key))

    with pytest.raises(CheckpointError, match=r"opts\['encoder_type'\] is 'ResNetEncoder'"):
        load_e4e_checkpoint(write("type.pt", dict(ckpt, opts=dict(ckpt["opts"], encoder_type="ResNetEncoder"))))
    with pytest.raises(CheckpointError, match=r"opts\['output_size'\]=1024 but the decoder makes 16x16"):
        load_e4e_checkpoint(write("size.pt", dict(ckpt, opts=dict(ckpt["opts"], output_size=1024))))
    with pytest.raises(CheckpointError, match="has no 'latent_avg'"):
        load_e4e_checkpoint(write("no_avg.pt", {k: v for k, v in ckpt.items() if k != "latent_avg"}))
    with pytest.raises(CheckpointError, match=r"latent_avg has shape \(3, 32\)"):
        load_e4e_checkpoint(write("avg.pt", dict(ckpt, latent_avg=torch.zeros(3, 32))))
    cfg = dict(TINY, style_dim=16)
    with pytest.raises(CheckpointError, match=r"encoder_config'\]\['style_dim'\]=16 does not match"):
        load_e4e_checkpoint(write("cfg.pt", dict(ckpt, opts=dict(ckpt["opts"], encoder_config=cfg))))
    with pytest.raises(CheckpointError, match=r"not a valid GradualStyleEncoder config: .*input_size"):
        load_e4e_checkpoint(write("cfg2.pt", dict(ckpt, opts=dict(ckpt["opts"], encoder_config=dict(TINY,
                                                                                                      input_size=12)))))
