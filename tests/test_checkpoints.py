"""Generator checkpoint export/load: rosinality layout, strict errors, safe loading."""
import collections

import pytest
import torch

from networks.checkpoints import (CheckpointError, export_generator, infer_generator_config, load_discriminator,
                                  load_generator, safe_load)
from networks.stylegan2 import Discriminator, Generator

TINY = dict(size=16, style_dim=16, n_mlp=2, channel_multiplier=1, channel_max=16)


class NotAllowed:
    """A class torch.load(weights_only=True) refuses to unpickle."""


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    g, d = Generator(**TINY), Discriminator(16, channel_max=16)
    path = export_generator(tmp_path / "generator.pt", g, g.mean_latent(64), g=g, d=d, meta={"produced_by": "test"})
    return g, d, path


def test_export_is_rosinality_layout_and_weights_only_loadable(exported):
    g, _, path = exported
    ckpt = torch.load(path, weights_only=True)
    assert {"g_ema", "latent_avg", "g", "d", "meta"} <= set(ckpt)
    assert ckpt["latent_avg"].shape == (TINY["style_dim"],)
    assert ckpt["meta"]["generator"]["size"] == 16 and ckpt["meta"]["produced_by"] == "test"
    assert set(ckpt["g_ema"]) == set(g.state_dict())
    assert not path.with_suffix(".pt.tmp").exists()


def test_reload_gives_identical_outputs(exported):
    g, d, path = exported
    g2, latent_avg = load_generator(path)
    z = torch.randn(3, TINY["style_dim"])
    with torch.no_grad():
        assert torch.equal(g.eval()([z])[0], g2([z])[0])
    assert latent_avg.shape == (TINY["style_dim"],)
    d2 = load_discriminator(path)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(d(x), d2(x))


def test_config_is_inferred_from_shapes_for_official_files(tmp_path):
    g = Generator(64, style_dim=32, n_mlp=3, channel_multiplier=1, channel_max=64)
    torch.save({"g_ema": g.state_dict(), "latent_avg": torch.zeros(32)}, tmp_path / "official.pt")
    loaded, _ = load_generator(tmp_path / "official.pt")
    assert loaded.channels == g.channels and loaded.n_latent == g.n_latent
    cfg = infer_generator_config(Generator(1024, n_mlp=8).state_dict())
    assert cfg == dict(size=1024, style_dim=512, n_mlp=8, channel_multiplier=2, channel_max=512)


def test_strict_load_error_lists_missing_unexpected_and_misshaped(tmp_path, exported):
    _, _, path = exported
    ckpt = torch.load(path, weights_only=True)
    state = ckpt["g_ema"]
    state.pop("conv1.noise.weight")
    state["extra.weight"] = torch.zeros(1)
    state["to_rgb1.bias"] = torch.zeros(1, 4, 1, 1)
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as err:
        load_generator(tmp_path / "broken.pt")
    msg = str(err.value)
    assert "broken.pt" in msg
    assert "missing (1): conv1.noise.weight" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "mis-shaped (1): to_rgb1.bias: file (1, 4, 1, 1) vs network (1, 3, 1, 1)" in msg


def test_wrong_size_config_is_reported(exported):
    _, _, path = exported
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_generator(path, config=dict(TINY, channel_max=8))


def test_not_a_generator_file(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError, match="expected a dict with 'g_ema'"):
        load_generator(tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint|cannot be loaded"):
        load_generator(tmp_path / "garbage.pt")


def test_pickles_needing_code_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"g_ema": collections.OrderedDict(), "payload": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(.*NotAllowed\).*would run code"):
        safe_load(path)
    assert isinstance(safe_load(path, trust=True)["payload"], NotAllowed)
