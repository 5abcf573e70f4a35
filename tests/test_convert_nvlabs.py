"""Tests for networks.convert_nvlabs: NVlabs StyleGAN2 pickle -> rosinality layout.

The pickles are synthetic imitations of NVlabs' format: tiny modules whose ``__reduce__`` follows
``torch_utils/persistence.py`` (``_reconstruct_persistent_obj`` with a meta dict holding type,
version, module_src, class_name and the module ``__dict__``), pickled while fake ``torch_utils`` and
``dnnlib`` modules are importable and converted after they are removed. The converted generator is
compared with a forward pass written directly from NVlabs' formulas (``training/networks.py``,
``torch_utils/ops/conv2d_resample.py`` generic path, ``upfirdn2d`` reference), which is an
independent formulation of the up-sampling convolution (FIR first, then a true convolution).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from networks.checkpoints import load_generator
from networks.convert_nvlabs import (NVlabsConversionError, convert_nvlabs_pickle, describe_generator,
                                     load_nvlabs_pickle, main)

MODULE_SRC = "raise RuntimeError('pickled NVlabs module source must never be executed')\n"
FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")
SIZE, W_DIM, N_MLP, LR_MLP = 16, 32, 2, 0.05
CHANNEL_BASE, CHANNEL_MAX = 256, 32  # channels {4: 32, 8: 32, 16: 16} -> channel_multiplier 256/16384


@contextlib.contextmanager
def fake_nvlabs_modules():
    """Make ``torch_utils.persistence`` / ``dnnlib.util`` importable while pickling, then remove them."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("the converter must not call NVlabs' reconstruct function")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence = persistence
    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        def __getattr__(self, name):
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.util, dnnlib.EasyDict = util, EasyDict
    mods = dict(zip(FAKE_MODULES, (torch_utils, persistence, dnnlib, util)))
    assert not any(name in sys.modules for name in mods)
    sys.modules.update(mods)
    try:
        yield types.SimpleNamespace(EasyDict=EasyDict)
    finally:
        for name in mods:
            sys.modules.pop(name, None)


class Persistent:
    """Mimics NVlabs ``persistent_class``: records init kwargs, reduces to ``_reconstruct_persistent_obj``."""

    class_name = None

    def record(self, *args, **kwargs):
        self._init_args = copy.deepcopy(args)
        self._init_kwargs = copy.deepcopy(kwargs)

    def __reduce__(self):
        fields = list(super().__reduce__())
        fields += [None] * max(3 - len(fields), 0)
        meta = dict(type="class", version=6, module_src=MODULE_SRC,
                    class_name=self.class_name or type(self).__name__.removeprefix("NV"), state=fields[2])
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,), None


def setup_filter(taps=(1, 3, 3, 1)):
    f = torch.tensor(taps, dtype=torch.float32)
    f = torch.outer(f, f)
    return f / f.sum()


class NVFullyConnectedLayer(Persistent, nn.Module):
    def __init__(self, in_features, out_features, activation="linear", lr_multiplier=1, bias_init=0):
        super().__init__()
        self.activation = activation
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], np.float32(bias_init)) + 0.2 * torch.randn(out_features))
        self.weight_gain = lr_multiplier / np.sqrt(in_features)  # numpy float64, as in NVlabs
        self.bias_gain = lr_multiplier
        self.record(in_features, out_features, activation=activation, lr_multiplier=lr_multiplier,
                    bias_init=bias_init)


class NVMappingNetwork(Persistent, nn.Module):
    def __init__(self, z_dim, c_dim, w_dim, num_ws, num_layers=8, lr_multiplier=0.01, w_avg_beta=0.995):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        for idx in range(num_layers):
            setattr(self, f"fc{idx}", NVFullyConnectedLayer(w_dim, w_dim, activation="lrelu",
                                                            lr_multiplier=lr_multiplier))
        self.register_buffer("w_avg", torch.randn(w_dim))
        self.record(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=num_ws, num_layers=num_layers,
                    lr_multiplier=lr_multiplier, w_avg_beta=w_avg_beta)


class NVSynthesisLayer(Persistent, nn.Module):
    def __init__(self, in_channels, out_channels, w_dim, resolution, kernel_size=3, up=1):
        super().__init__()
        self.resolution, self.up, self.use_noise, self.activation = resolution, up, True, "lrelu"
        self.conv_clamp = None
        self.register_buffer("resample_filter", setup_filter())
        self.padding = kernel_size // 2
        self.act_gain = np.sqrt(2)
        self.affine = NVFullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(0.5 * torch.randn([]))
        self.bias = nn.Parameter(0.2 * torch.randn(out_channels))
        self.record(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=up)


class NVToRGBLayer(Persistent, nn.Module):
    def __init__(self, in_channels, out_channels, w_dim, kernel_size=1):
        super().__init__()
        self.conv_clamp = None
        self.affine = NVFullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(0.2 * torch.randn(out_channels))
        self.weight_gain = 1 / np.sqrt(in_channels * kernel_size ** 2)
        self.record(in_channels, out_channels, w_dim=w_dim)


class NVSynthesisBlock(Persistent, nn.Module):
    def __init__(self, in_channels, out_channels, w_dim, resolution, img_channels, is_last, architecture="skip"):
        super().__init__()
        self.in_channels, self.w_dim, self.resolution = in_channels, w_dim, resolution
        self.img_channels, self.is_last, self.architecture = img_channels, is_last, architecture
        self.use_fp16, self.channels_last = False, False
        self.register_buffer("resample_filter", setup_filter())
        self.num_conv = self.num_torgb = 0
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = NVSynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2)
            self.num_conv += 1
        self.conv1 = NVSynthesisLayer(out_channels, out_channels, w_dim, resolution)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = NVToRGBLayer(out_channels, img_channels, w_dim)
            self.num_torgb += 1
        self.record(in_channels, out_channels, w_dim=w_dim, resolution=resolution, img_channels=img_channels,
                    is_last=is_last, architecture=architecture)


class NVSynthesisNetwork(Persistent, nn.Module):
    def __init__(self, w_dim, img_resolution, img_channels, channel_base=32768, channel_max=512, num_fp16_res=0):
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2 ** i for i in range(2, int(np.log2(img_resolution)) + 1)]
        channels = {res: min(channel_base // res, channel_max) for res in self.block_resolutions}
        self.num_ws = 0
        for res in self.block_resolutions:
            block = NVSynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim, res, img_channels,
                                     is_last=res == img_resolution)
            self.num_ws += block.num_conv + (block.num_torgb if res == img_resolution else 0)
            setattr(self, f"b{res}", block)
        self.record(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                    channel_base=channel_base, channel_max=channel_max, num_fp16_res=num_fp16_res)


class NVGenerator(Persistent, nn.Module):
    def __init__(self, z_dim, c_dim, w_dim, img_resolution, img_channels, mapping_kwargs, synthesis_kwargs):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = NVSynthesisNetwork(w_dim, img_resolution, img_channels, **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = NVMappingNetwork(z_dim, c_dim, w_dim, self.num_ws, **mapping_kwargs)
        self.record(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=img_resolution,
                    img_channels=img_channels, mapping_kwargs=mapping_kwargs, synthesis_kwargs=synthesis_kwargs)


def make_generator(easydict, seed=0):
    torch.manual_seed(seed)
    return NVGenerator(z_dim=W_DIM, c_dim=0, w_dim=W_DIM, img_resolution=SIZE, img_channels=3,
                       mapping_kwargs=easydict(num_layers=N_MLP, lr_multiplier=LR_MLP),
                       synthesis_kwargs=easydict(channel_base=CHANNEL_BASE, channel_max=CHANNEL_MAX,
                                                 num_fp16_res=0)).eval()


def dump(obj_factory, path, protocol=3):
    """Pickle ``obj_factory(fake)`` like NVlabs' training loop, with the fake modules present only meanwhile."""
    with fake_nvlabs_modules() as fake:
        obj = obj_factory(fake)
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    assert not any(name in sys.modules for name in FAKE_MODULES)
    return obj


# ------------------------------------------------------------------------------------------------
# NVlabs maths, written from training/networks.py and torch_utils/ops (reference implementations)


def nv_fc(layer, x):
    w = layer.weight * float(layer.weight_gain)
    x = x @ w.t() + layer.bias * float(layer.bias_gain)
    return F.leaky_relu(x, 0.2) * math.sqrt(2) if layer.activation == "lrelu" else x


def nv_mapping(mapping, z):
    x = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()  # normalize_2nd_moment
    for idx in range(mapping.num_layers):
        x = nv_fc(getattr(mapping, f"fc{idx}"), x)
    return x


def nv_upfirdn2d(x, f, up, pad, gain):
    """upfirdn2d._upfirdn2d_ref: zero insertion, pad, *convolution* with f (flip_filter=False), gain."""
    b, c, h, w = x.shape
    if up > 1:
        y = x.new_zeros(b, c, h * up, w * up)
        y[:, :, ::up, ::up] = x
        x = y
    x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])
    f = (f * gain ** (f.ndim / 2)).flip([0, 1])
    return F.conv2d(x, f[None, None].repeat(c, 1, 1, 1), groups=c)


def nv_modulated_conv(x, weight, styles, demodulate, up, resample_filter):
    w = weight[None] * styles[:, None, :, None, None]
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()[:, :, None, None, None]
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        if up == 2:
            # conv2d_resample generic path with padding=1, f 4x4: pads (1 + 2, 1 + 1), gain up**2, then the
            # SynthesisLayer's flip_weight=False -> a true convolution (weight flipped for F.conv2d)
            out.append(F.conv2d(nv_upfirdn2d(xi, resample_filter, 2, (3, 2), 4), w[i].flip([2, 3])))
        else:
            out.append(F.conv2d(xi, w[i], padding=w.shape[-1] // 2))  # flip_weight=True: correlation
    return torch.cat(out)


def nv_layer(layer, x, w):
    styles = nv_fc(layer.affine, w)
    x = nv_modulated_conv(x, layer.weight, styles, True, layer.up, layer.resample_filter)
    x = x + layer.noise_const * layer.noise_strength  # noise_mode='const'
    return F.leaky_relu(x + layer.bias.view(1, -1, 1, 1), 0.2) * float(layer.act_gain)


def nv_torgb(layer, x, w):
    styles = nv_fc(layer.affine, w) * float(layer.weight_gain)
    return nv_modulated_conv(x, layer.weight, styles, False, 1, None) + layer.bias.view(1, -1, 1, 1)


def nv_forward(G, z):
    """Generator.forward(z, c=None, noise_mode='const') with NVlabs maths: (image, w)."""
    w = nv_mapping(G.mapping, z)
    ws = w.unsqueeze(1).repeat(1, G.num_ws, 1)
    syn, x, img, idx = G.synthesis, None, None, 0
    for res in syn.block_resolutions:
        block = getattr(syn, f"b{res}")
        if res == 4:
            x = nv_layer(block.conv1, block.const[None].repeat(z.shape[0], 1, 1, 1), ws[:, idx])
        else:
            x = nv_layer(block.conv0, x, ws[:, idx])
            x = nv_layer(block.conv1, x, ws[:, idx + 1])
            img = nv_upfirdn2d(img, block.resample_filter, 2, (2, 1), 4)  # upsample2d
        y = nv_torgb(block.torgb, x, ws[:, idx + block.num_conv])
        img = y if img is None else img + y
        idx += block.num_conv
    return img, w


# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvlabs")
    pkl = tmp / "network-snapshot-000000.pkl"

    def factory(fake):
        # training_loop.py snapshot layout (D omitted: the converter only reads generators)
        return dict(G=make_generator(fake.EasyDict, seed=1), D=None, G_ema=make_generator(fake.EasyDict),
                    augment_pipe=None, training_set_kwargs=fake.EasyDict(resolution=SIZE))

    data = dump(factory, pkl)
    out = tmp / "generator.pt"
    path, g, latent_avg, meta = convert_nvlabs_pickle(pkl, out)
    return types.SimpleNamespace(nv=data["G_ema"], nv_g=data["G"], pkl=pkl, out=path, g=g, latent_avg=latent_avg,
                                 meta=meta)


def test_config_is_inferred_from_the_pickle(converted):
    assert converted.meta["generator"] == dict(size=SIZE, style_dim=W_DIM, n_mlp=N_MLP,
                                               channel_multiplier=CHANNEL_BASE / 16384, blur_kernel=[1, 3, 3, 1],
                                               lr_mlp=pytest.approx(LR_MLP), channel_max=CHANNEL_MAX)
    assert converted.g.channels == {4: 32, 8: 32, 16: 16}
    assert converted.meta["nvlabs"]["which"] == "G_ema"
    assert converted.meta["nvlabs"]["conv_clamp"] is None
    assert converted.meta["converted_from"].endswith("network-snapshot-000000.pkl")


def test_file_layout_loads_strictly_with_weights_only(converted):
    ckpt = torch.load(converted.out, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"g_ema", "latent_avg", "meta"}
    assert ckpt["g_ema"]["convs.0.conv.weight"].shape == (1, 32, 32, 3, 3)
    assert ckpt["g_ema"]["convs.2.conv.weight"].shape == (1, 16, 32, 3, 3)
    assert ckpt["g_ema"]["noises.noise_4"].shape == (1, 1, 16, 16)
    assert ckpt["g_ema"]["to_rgbs.1.bias"].shape == (1, 3, 1, 1)
    g, latent_avg = load_generator(converted.out)  # strict: raises on any missing/unexpected/mis-shaped key
    assert g.config == converted.g.config
    torch.testing.assert_close(latent_avg, converted.nv.mapping.w_avg)  # w_avg -> latent_avg


def test_values_are_mapped_without_flips(converted):
    nv, sd = converted.nv, converted.g.state_dict()
    torch.testing.assert_close(sd["style.2.weight"], nv.mapping.fc1.weight, rtol=0, atol=0)
    torch.testing.assert_close(sd["convs.2.conv.weight"][0], nv.synthesis.b16.conv0.weight, rtol=0, atol=0)
    torch.testing.assert_close(sd["convs.3.noise.weight"], nv.synthesis.b16.conv1.noise_strength.reshape(1))
    torch.testing.assert_close(sd["noises.noise_3"][0, 0], nv.synthesis.b16.conv0.noise_const)
    torch.testing.assert_close(sd["input.input"][0], nv.synthesis.b4.const)
    torch.testing.assert_close(sd["convs.0.conv.blur.kernel"], 4 * nv.synthesis.b8.resample_filter)


def test_mapping_matches_nvlabs_maths(converted):
    z = torch.randn(5, W_DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = nv_mapping(converted.nv.mapping, z)
        torch.testing.assert_close(converted.g.get_latent(z), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ref", "fast"])
def test_images_match_nvlabs_forward(converted, impl):
    z = torch.randn(3, W_DIM, generator=torch.Generator().manual_seed(2))
    g = converted.g.set_impl(impl)
    with torch.no_grad():
        ref, _ = nv_forward(converted.nv, z)
        img, _ = g([z], randomize_noise=False)
        assert img.shape == ref.shape == (3, 3, SIZE, SIZE)
        assert ref.abs().max() > 0.1
        torch.testing.assert_close(img, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        # the comparison is sensitive to the up-sampling kernel orientation the converter had to settle
        g.convs[2].conv.weight.data = g.convs[2].conv.weight.data.flip([3, 4])
        try:
            flipped, _ = g([z], randomize_noise=False)
        finally:
            g.convs[2].conv.weight.data = g.convs[2].conv.weight.data.flip([3, 4])
        assert (flipped - ref).abs().max() > 1e-2 * ref.abs().max()


def test_no_nvlabs_code_was_imported_or_executed(converted):
    assert not any(name in sys.modules for name in FAKE_MODULES)
    assert not any(name.startswith("_imported_module_") for name in sys.modules)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_other_pickle_protocols(tmp_path, converted, protocol):
    pkl = tmp_path / "ffhq.pkl"
    dump(lambda fake: dict(G_ema=make_generator(fake.EasyDict)), pkl, protocol=protocol)
    data = load_nvlabs_pickle(pkl)
    gen = describe_generator(data["G_ema"])
    assert gen.config == converted.meta["generator"]
    torch.testing.assert_close(gen.state["synthesis.b8.conv0.weight"], converted.nv.synthesis.b8.conv0.weight)
    assert gen.root.init_kwargs["mapping_kwargs"] == dict(num_layers=N_MLP, lr_multiplier=LR_MLP)


def test_which_g_and_cli(tmp_path, converted, capsys):
    out = tmp_path / "g.pt"
    assert main([str(converted.pkl), str(out), "--which", "G"]) == 0
    assert "wrote" in capsys.readouterr().out
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["meta"]["nvlabs"]["which"] == "G"
    torch.testing.assert_close(ckpt["g_ema"]["to_rgb1.conv.weight"][0], converted.nv_g.synthesis.b4.torgb.weight)
    assert main([str(tmp_path / "missing.pkl"), str(out)]) == 2
    assert "not found" in capsys.readouterr().err


class Node(Persistent, nn.Module):
    """A persistent module with a chosen NVlabs class name (for structural tests)."""

    def __init__(self, class_name, attrs=None, **children):
        super().__init__()
        self.class_name = class_name
        self.__dict__.update(attrs or {})
        for name, child in children.items():
            self.add_module(name, child)


def test_stylegan3_generator_is_refused(tmp_path):
    pkl = tmp_path / "stylegan3-t.pkl"
    dump(lambda fake: dict(G_ema=Node("Generator", synthesis=Node(
        "SynthesisNetwork", input=Node("SynthesisInput", attrs=dict(size=np.array([36, 36]))),
        L0_36_32=Node("SynthesisLayer", attrs=dict(in_size=np.array([36, 36]), up_factor=np.int64(1)))),
        mapping=Node("MappingNetwork"))), pkl)
    with pytest.raises(NVlabsConversionError, match="StyleGAN3"):
        convert_nvlabs_pickle(pkl, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


class CallsGetcwd:
    def __reduce__(self):
        return os.getcwd, ()


@pytest.mark.parametrize("payload, name", [
    (lambda: CallsGetcwd(), r"'(posix|nt)\.getcwd'"),
    (lambda: nn.Linear(2, 2), r"'torch\.nn\.modules\.linear\.Linear'"),
], ids=["os.getcwd", "plain-nn.Module"])
def test_disallowed_globals_are_refused(tmp_path, payload, name):
    pkl = tmp_path / "evil.pkl"

    def factory(fake):
        g = make_generator(fake.EasyDict)
        g.mapping.extra = payload()  # smuggled into a persistent object's state
        return dict(G_ema=g)

    dump(factory, pkl)
    with pytest.raises(NVlabsConversionError, match=f"refusing to unpickle global {name}"):
        load_nvlabs_pickle(pkl)


def test_tensorflow_pickle_gets_a_hint(tmp_path):
    pkl = tmp_path / "stylegan2-ffhq-config-f.pkl"
    pkl.write_bytes(b"\x80\x02cdnnlib.tflib.network\nNetwork\nq\x00)\x81q\x01.")
    with pytest.raises(NVlabsConversionError, match="TensorFlow"):
        load_nvlabs_pickle(pkl)


def test_conditional_generator_is_refused(tmp_path):
    pkl = tmp_path / "cond.pkl"

    def factory(fake):
        g = make_generator(fake.EasyDict)
        g.c_dim = 10
        g.mapping.embed = NVFullyConnectedLayer(10, W_DIM)
        return dict(G_ema=g)

    dump(factory, pkl)
    with pytest.raises(NVlabsConversionError, match="conditional"):
        convert_nvlabs_pickle(pkl, tmp_path / "out.pt")
