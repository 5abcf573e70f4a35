"""Official OOD-GAN-inversion stage-2 checkpoints: conversion, loading, and the official forward reproduced.

``tests/data/compat/ood_official_e4e_64px.pt`` holds an official-layout state dict (what ``net_g_*.pth['params_ema']``
holds: ``feats_conv.*``, ``modulation.*`` and the generator's ``*.modulation.*`` style layers), the tiny generator,
inputs, the noise the official forward drew, and what ``ood_faceGAN_e4e.forward`` returned (how the file was made:
``tests/data/compat/README.md``).
"""
import pytest
import torch

from networks.align_mask import LEGACY_MATHS, OFFICIAL_MATHS, AlignMaskNet, load_align_mask
from networks.checkpoints import CheckpointError
from networks.convert_ood_official import (convert_official_state, is_official_checkpoint, level_resolution,
                                           load_official, main)
from networks.stylegan2 import Generator
from tests.helpers.compat_weights import load_vectors

pytestmark = pytest.mark.usefixtures("single_thread")
VECTORS = load_vectors("ood_official_e4e_64px.pt")
CASE = VECTORS["cases"][0]
TOL = 1e-5


def official_file(tmp_path, state=None, name="net_g_410000.pth"):
    """Write ``state`` (default: the vectors' state) as the official training writes it."""
    state = dict(VECTORS["official_state"] if state is None else state)
    path = tmp_path / name
    torch.save({"params": state, "params_ema": state}, path)
    return path


@pytest.fixture(scope="module", params=["ref", "fast"])
def generator(request):
    """The tiny 64 px generator (16 channels everywhere) of the vectors."""
    cfg = VECTORS["config"]
    g = Generator(cfg["out_size"], style_dim=cfg["style_dim"], n_mlp=cfg["n_mlp"],
                  channel_multiplier=cfg["channel_multiplier"], channel_max=cfg["generator_channels"],
                  impl=request.param).eval()
    g.load_state_dict(VECTORS["generator_state"], strict=True)
    return g


def run(net, G):
    with torch.no_grad():
        return net(G, CASE["codes"], CASE["taps"], CASE["image"], active_levels=CASE["active_levels"],
                   noise=CASE["noise"])


def max_differences(out) -> dict:
    diffs = {"output": out.output - CASE["output"], "generated": out.generated - CASE["generated"],
             "mask": out.mask - CASE["mask"]}
    for r in CASE["active_levels"]:
        diffs[f"alpha{r}"] = out.alphas[r] - CASE["alphas"][r]
        diffs[f"flow{r}"] = out.flows[r] - CASE["flows"][r]
    return {k: v.abs().max().item() for k, v in diffs.items()}


def test_key_mapping_and_architecture_from_shapes():
    ours, config, dropped = convert_official_state(VECTORS["official_state"])
    assert [level_resolution(i) for i in range(4)] == [256, 128, 64, 32]
    assert config["levels"] == [32, 64, 128, 256] and config["encoder_input_size"] == 256
    assert config["generator_channels"] == {32: 16, 64: 16, 128: 8, 256: 4}
    assert config["tap_channels"] == {f"f{i}": c for i, c in enumerate(VECTORS["config"]["tap_channels"])}
    assert {k: config[k] for k in OFFICIAL_MATHS} == OFFICIAL_MATHS and not config["bias"]
    assert (config["warp_scale"], config["cycles"]) == (0.08, 2)
    assert all(k.startswith("generator.") or k.endswith(("noiseInj.weight", ".weight")) for k in dropped)
    assert sum(k.startswith("generator.") for k in dropped) > 0
    assert {k for k in dropped if not k.startswith("generator.")} == \
        {f"modulation.{i}.{leaf}" for i in range(4) for leaf in ("weight", "noiseInj.weight")}
    torch.testing.assert_close(ours["levels.32.proj.weight"], VECTORS["official_state"]["feats_conv.3.weight"])
    torch.testing.assert_close(ours["levels.256.align.body.1.shortcut.1.bias"],
                               VECTORS["official_state"]["modulation.0.alignment.body.body.1.shortcut_layer.1.bias"])
    assert set(ours) == set(AlignMaskNet(**config).state_dict())


def test_converted_official_weights_reproduce_the_official_forward(generator):
    """Output, generated image, fused mask, per-level alphas and flows of the official forward to <= 1e-5."""
    net, meta = load_official({"params": VECTORS["official_state"], "params_ema": VECTORS["official_state"]})
    assert meta["official"]["param_key"] == "params_ema"
    diffs = max_differences(run(net, generator))
    assert max(diffs.values()) <= TOL, diffs


def test_our_resampling_variants_change_the_function(generator):
    """With the same weights, our variants (replicate blur, identity grid, bilinear gating) are a different function:
    official files must run with the official one."""
    net, _ = load_official({"params_ema": VECTORS["official_state"]})
    cfg = dict(net.config, **LEGACY_MATHS)
    ours = AlignMaskNet(**cfg)
    ours.load_state_dict(net.state_dict())
    diffs = max_differences(run(ours, generator))
    assert diffs["output"] > 0.1 and diffs["mask"] > 0.1, diffs


def test_load_align_mask_reads_an_official_file(tmp_path, generator):
    """``model.align_mask_checkpoint`` (``load_align_mask``) takes the official file itself."""
    path = official_file(tmp_path)
    assert is_official_checkpoint(torch.load(path, weights_only=True))
    net, meta = load_align_mask(path)
    assert meta["converted_from"] == str(path) and "generator" not in meta
    assert {k: net.config[k] for k in OFFICIAL_MATHS} == OFFICIAL_MATHS
    assert max(max_differences(run(net, generator)).values()) <= TOL


def test_cli_writes_a_hand_off_that_runs_the_official_function(tmp_path, generator, capsys):
    out = tmp_path / "align_mask.pt"
    assert main([str(official_file(tmp_path)), str(out), "--cycles", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    net, meta = load_align_mask(out)
    assert meta["produced_by"] == "networks.convert_ood_official"
    assert {k: net.config[k] for k in OFFICIAL_MATHS} == OFFICIAL_MATHS
    assert max(max_differences(run(net, generator)).values()) <= TOL
    assert main([str(official_file(tmp_path)), str(tmp_path / "x.pt"), "--param-key", "params"]) == 0


def _edited(**changes):
    state = dict(VECTORS["official_state"])
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize("edit, message", [
    ({"modulation.1.btn1.conv.weight": torch.zeros(1)}, r"unexpected \(1\): modulation.1.btn1.conv.weight"),
    ({"modulation.2.alignment.body.body.0.res_layer.3.weight": None},
     r"missing \(1\): levels.64.align.body.0.res.3.weight"),
    ({"modulation.3.alignment.body.body.1.res_layer.4.weight": torch.ones(5)},
     r"mis-shaped \(1\): levels.32.align.body.1.res.4.weight"),
    ({"feats_conv.2.weight": None}, r"official level 2 \(64 px\) has no feats_conv.2.weight"),
])
def test_official_files_that_do_not_fit_are_named(tmp_path, edit, message):
    path = official_file(tmp_path, _edited(**edit))
    with pytest.raises(CheckpointError, match=message) as err:
        load_align_mask(path)
    assert str(path) in str(err.value)
    assert main([str(path), str(tmp_path / "out.pt")]) == 2


def test_other_files_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "weird.pt"
    torch.save({"weights": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"weird.pt is neither a stage-2 hand-off .* nor an official"):
        load_align_mask(path)
    only_params = tmp_path / "params_only.pth"
    torch.save({"params": dict(VECTORS["official_state"])}, only_params)
    with pytest.raises(CheckpointError, match=r"params_only.pth: no 'params_ema' state"):
        load_align_mask(only_params)
