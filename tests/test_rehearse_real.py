"""The rehearsal of the real-face recipe (``experiments/rehearse_real.py``).

Fast tests: the documented commands are found and point only at files the rehearsal builds; the official stage-2
layout it writes converts back to the same network. Slow test: the whole rehearsal at 1024 px (about 12 min on 2
cores: ``make test-slow``).
"""
import time
from pathlib import Path

import pytest
import torch

from experiments.rehearse_real import (CELEBAHQ, ROOT, RehearsalError, documented_command, localise,
                                       main, official_ood_state)
from networks.align_mask import AlignMaskNet
from networks.convert_ood_official import load_official
from networks.stylegan2 import Generator

EXP = ROOT / "experiments" / "configs" / "exp"
FILES = ["stylegan2-ffhq-config-f.pt", "e4e_ffhq_encode.pt", "net_g_410000.pth", "79999_iter.pth",
         "model_ir_se50.pth", "alexnet-owt-7be5be79.pth", "vgg16-397923af.pth", "vgg19-dcbb9e9d.pth", "smile.pt"]


def _weights(folder="/w2"):
    return {name: Path(folder) / name for name in FILES}


def test_documented_commands_name_only_files_the_rehearsal_builds():
    dhr = localise(documented_command(EXP / "dhr.yaml", "data=celebahq"), _weights(), {"celebahq": Path("/c")})
    assert dhr[:4] == ["+exp=dhr", "data=celebahq", "data.root=/c", "generator=ffhq1024"]
    assert "trainer=cpu" in dhr and "trainer=gpu" not in dhr
    assert "model.align_mask_checkpoint=/w2/net_g_410000.pth" in dhr  # not null: that would train stage 2 first
    assert "model.segmentation.parser=/w2/79999_iter.pth" in dhr
    assert any(w.startswith("model.edits=") and "/w2/smile.pt" in w for w in dhr)
    assert not any("/w/" in w for w in dhr)
    stage2 = localise(documented_command(EXP / "ood_blend_official.yaml", "+exp=ood_blend_official"), _weights(),
                      {"ffhq": Path("/f")})
    assert stage2 == ["+exp=ood_blend_official", "data.root=/f", "model.encoder_checkpoint=/w2/e4e_ffhq_encode.pt",
                      "model.lpips.backbone_weights=/w2/alexnet-owt-7be5be79.pth",
                      "model.vgg.weights=/w2/vgg19-dcbb9e9d.pth", "model.identity.weights=/w2/model_ir_se50.pth"]


def test_documented_real_face_command_composes_with_the_bisenet_classes(tmp_path):
    """The header command composes to the real-face settings: only BiSeNet class thresholds (a plain
    ``thresholds={...}`` would merge into the SynthFaces ones), and a configured stage-2 file (the chain trains
    none)."""
    from hydra import compose, initialize_config_dir

    from experiments.utils.chain import _configured, _spec, needed_stages
    from networks.face_parsers import CELEBAMASK_CLASSES

    weights = _weights(tmp_path)
    for path in weights.values():
        path.touch()
    words = localise(documented_command(EXP / "dhr.yaml", "data=celebahq"), weights, {"celebahq": tmp_path})
    with initialize_config_dir(str(ROOT / "experiments" / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=words)
    seg = cfg.model.segmentation
    assert dict(seg.thresholds) == {"skin": 0.7, **{c: 0.8 for c in ("l_brow", "r_brow", "l_eye", "r_eye", "l_ear",
                                                                      "r_ear", "nose", "mouth", "u_lip", "l_lip")}}
    assert set(seg.thresholds) | set(seg.ood_classes) <= set(CELEBAMASK_CLASSES)
    assert (seg.parser_kind, seg.lpips.net, cfg.generator.size) == ("bisenet", "vgg", 1024)
    assert cfg.trainer.accelerator == "cpu"
    specs = {n: _spec(cfg, n) for n in cfg.chain}
    configured = {n for n in specs if _configured(cfg, n, specs[n])}
    assert needed_stages(list(specs), specs, configured) == ["encoder", "align_mask"]
    assert {"encoder", "align_mask"} <= configured  # nothing is trained before stage 3


def test_a_file_the_rehearsal_does_not_build_is_named():
    with pytest.raises(RehearsalError, match="names /w/farl.pt, which the rehearsal does not build"):
        localise(["model.segmentation.parser=/w/farl.pt"], _weights(), {})
    with pytest.raises(RehearsalError, match="no documented 'python experiments/run.py' command with 'nope'"):
        documented_command(EXP / "dhr.yaml", "nope")


def test_celebahq_files_put_one_image_in_the_official_test_split(tmp_path):
    from datamodules.celebahq import celebahq_splits
    from experiments.rehearse_real import build_data

    data = build_data(tmp_path)
    splits = celebahq_splits(data["mapping"], data["partition"])
    assert splits == {"train": [0, 2, 3], "val": [4], "test": [1]}
    assert data["test_names"] == ["1"] and len(CELEBAHQ) == 5
    assert sorted(p.name for p in data["celebahq_images"].iterdir()) == [f"{i}.jpg" for i in range(5)]


def test_official_stage2_layout_converts_back_to_the_same_network():
    """The official key layout written by the rehearsal is what the converter reads: same weights, same config."""
    torch.manual_seed(0)
    g = Generator(1024, 32, 2, channel_multiplier=1, channel_max=8)  # the official levels, narrow
    taps = {"f0": 4, "f1": 4, "f2": 6, "f3": 8}
    net = AlignMaskNet(generator_channels={r: g.channels[r] for r in (32, 64, 128, 256)}, tap_channels=taps,
                       levels=[32, 64, 128, 256], encoder_input_size=256, bias=False)
    state = official_ood_state(net, g)
    assert state["feats_conv.0.weight"].shape == (g.channels[256], 4, 1, 1)  # level 256 <- tap f0
    assert state["feats_conv.3.weight"].shape == (g.channels[32], 8, 1, 1)  # level 32 <- tap f3
    assert state["modulation.3.noiseInj.weight"].shape == (1,) and "modulation.0.weight" in state
    assert "generator.convs.0.conv.modulation.weight" in state and "generator.convs.0.conv.weight" not in state
    back, _ = load_official({"params": state, "params_ema": state})
    assert back.config["levels"] == [32, 64, 128, 256] and back.config["tap_channels"] == taps
    ours = net.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in back.state_dict().items()) and set(ours) == set(back.state_dict())


@pytest.mark.slow
def test_rehearsal_of_the_real_face_recipe_at_1024px(tmp_path, capsys):
    """Every documented command of the real-face recipe runs at 1024 px on official-layout files and writes every
    output (what each step checks: ``experiments/rehearse_real.py``)."""
    start = time.perf_counter()
    assert main(["--work", str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    assert "4 commands passed" in out
    for step in ("convert", "stage2", "dhr", "invert"):
        assert f"- {step}: " in out
    assert "metrics/test.csv: 1 row (CelebA-HQ test split 1)" in out
    assert "inversions/astronaut: input / reconstruction / ood_mask at 1024 px" in out
    print(f"rehearsal: {time.perf_counter() - start:.0f} s")
