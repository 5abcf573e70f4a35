"""Stage 0 fine-tuning: ``StyleGAN2Module(init_checkpoint=..., checkpoint_trust=...)``.

Tiny networks (16 px, style_dim 32, <= 32 channels) on CPU; each test takes about a second.
"""
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tests.helpers.batches import image_items  # noqa: E402

from experiments.utils.errors import describe_user_error  # noqa: E402
from lightning_modules.stylegan2_module import StyleGAN2Module  # noqa: E402
from networks.checkpoints import CheckpointError, export_generator  # noqa: E402

from tests.test_stage0 import D_CFG, G_CFG, make_module  # noqa: E402

TINY_OVERRIDES = ["+exp=stylegan", "data=image_folder", "data.root=unused", "generator.size=16", "generator.style_dim=32",
                  "generator.n_mlp=2", "generator.channel_max=32"]


class Opaque:
    """An object that ``torch.load(weights_only=True)`` refuses (needs arbitrary unpickling)."""


pytestmark = pytest.mark.usefixtures("single_thread")




def make_loader():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return DataLoader(image_items(images), batch_size=2, shuffle=False)


def make_trainer(tmp_path, max_steps, **kwargs):
    opts = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                num_sanity_val_steps=0)
    opts.update(kwargs)
    return pl.Trainer(**opts)


def assert_state_equal(module, state):
    own = module.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def write_source(path, *, with_g=True, with_d=True, latent_avg=None, g_cfg=G_CFG, d_cfg=D_CFG):
    """A generator file whose g, g_ema, d all differ from each other and from a seed-0/1 module."""
    src = make_module(seed=7, generator=dict(g_cfg), discriminator=dict(d_cfg))
    with torch.no_grad():
        for p in src.g.parameters():
            p.add_(0.5)
    if latent_avg is None:
        latent_avg = torch.linspace(-1, 1, g_cfg["style_dim"])
    export_generator(path, src.g_ema, latent_avg, g=src.g if with_g else None, d=src.d if with_d else None,
                     meta={"generator": dict(src.g_ema.config)})
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
def test_init_loads_g_ema_g_d_and_latent_avg(tmp_path):
    raw = write_source(tmp_path / "source.pt")
    model = make_module(seed=1, init_checkpoint=str(tmp_path / "source.pt"))
    assert_state_equal(model.g_ema, raw["g_ema"])
    assert_state_equal(model.g, raw["g"])
    assert_state_equal(model.d, raw["d"])
    assert any(not torch.equal(raw["g"][k], raw["g_ema"][k]) for k in raw["g"])  # g really came from "g"
    assert torch.equal(model.init_latent_avg, raw["latent_avg"])
    assert "init_latent_avg" not in model.state_dict()  # Lightning checkpoints keep their keys
    assert model.hparams.init_checkpoint == str(tmp_path / "source.pt") and model.hparams.checkpoint_trust is False

    # before any training the export re-publishes the file's g_ema and latent_avg unchanged
    out = torch.load(model.export_handoff(tmp_path / "run"), map_location="cpu", weights_only=True)
    assert torch.equal(out["latent_avg"], raw["latent_avg"])
    assert all(torch.equal(out["g_ema"][k], v) for k, v in raw["g_ema"].items())
    assert out["meta"]["init_checkpoint"] == str(tmp_path / "source.pt")
    assert out["meta"]["module"]["init_checkpoint"] == str(tmp_path / "source.pt")

    # after fine-tuning, latent_avg is the mean w of the tuned g_ema (the file's value is stale)
    make_trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=make_loader())
    out = torch.load(model.export_handoff(tmp_path / "run2"), map_location="cpu", weights_only=True)
    torch.testing.assert_close(out["latent_avg"], model.g_ema.mean_latent(4096, seed=0).reshape(-1))
    assert not torch.equal(out["latent_avg"], raw["latent_avg"])


def test_file_with_only_g_ema_initialises_both_generators(tmp_path):
    raw = write_source(tmp_path / "g_ema_only.pt", with_g=False, with_d=False)
    assert set(raw) == {"g_ema", "latent_avg", "meta"}
    model = make_module(seed=1, init_checkpoint=str(tmp_path / "g_ema_only.pt"))
    assert_state_equal(model.g_ema, raw["g_ema"])
    assert_state_equal(model.g, raw["g_ema"])
    assert_state_equal(model.d, make_module(seed=1).d.state_dict())  # d keeps its fresh initialisation


def test_mismatched_generator_fails_naming_file_key_and_keys(tmp_path):
    path = tmp_path / "ffhq_like.pt"
    write_source(path)
    with pytest.raises(CheckpointError) as info:
        make_module(init_checkpoint=str(path), generator=dict(G_CFG, channel_max=16),
                    discriminator=dict(D_CFG, channel_max=16))
    text = str(info.value)
    assert "ffhq_like.pt" in text and "model.init_checkpoint" in text and "mis-shaped" in text
    assert "model.generator" in text and "'g_ema'" in text
    assert "'channel_max': 32" in text  # the file's architecture, as a hint for the right generator config

    # an official-style file (no meta): the hint is inferred from the state-dict shapes
    raw = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({"g_ema": raw["g_ema"], "latent_avg": raw["latent_avg"]}, tmp_path / "official.pt")
    with pytest.raises(CheckpointError, match=r"(?s)official\.pt.*mis-shaped.*generator is \{'size': 16, "
                                              r"'style_dim': 32, 'n_mlp': 2, 'channel_multiplier': 2, "
                                              r"'channel_max': 32\}"):
        make_module(init_checkpoint=str(tmp_path / "official.pt"), generator=dict(G_CFG, channel_max=16),
                    discriminator=dict(D_CFG, channel_max=16))

    # a wrong style_dim is reported too (mapping network and modulation shapes)
    with pytest.raises(CheckpointError, match=r"(?s)model\.init_checkpoint=.*ffhq_like\.pt.*mis-shaped"):
        make_module(init_checkpoint=str(path), generator=dict(G_CFG, style_dim=16))


def test_mismatched_discriminator_fails(tmp_path):
    path = tmp_path / "source.pt"
    write_source(path)
    with pytest.raises(CheckpointError) as info:
        make_module(init_checkpoint=str(path), discriminator=dict(D_CFG, channel_max=16))
    text = str(info.value)
    assert "source.pt" in text and "model.init_checkpoint" in text and "'d'" in text
    assert "model.discriminator" in text and "mis-shaped" in text


def test_missing_and_wrong_files_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError) as info:
        make_module(init_checkpoint=str(tmp_path / "nowhere.pt"))
    assert "nowhere.pt" in str(info.value) and "model.init_checkpoint" in str(info.value)
    assert "no such file" in str(info.value)

    torch.save({"state_dict": {}, "global_step": 3}, tmp_path / "last.ckpt")  # a Lightning checkpoint
    with pytest.raises(CheckpointError, match=r"(?s)last\.ckpt.*'g_ema'.*resume=true or ckpt_path"):
        make_module(init_checkpoint=str(tmp_path / "last.ckpt"))

    write_source(tmp_path / "bad_avg.pt", latent_avg=torch.zeros(5))
    with pytest.raises(CheckpointError, match=r"latent_avg has 5 values.*style_dim is 32"):
        make_module(init_checkpoint=str(tmp_path / "bad_avg.pt"))

    with pytest.raises(TypeError, match="model.init_checkpoint"):
        make_module(init_checkpoint=3)


def test_unsafe_pickle_refused_without_trust_and_loaded_with_it(tmp_path):
    raw = write_source(tmp_path / "source.pt")
    raw["args"] = Opaque()  # like rosinality's training checkpoints (argparse.Namespace)
    path = tmp_path / "unsafe.pt"
    torch.save(raw, path)

    with pytest.raises(CheckpointError) as info:
        make_module(init_checkpoint=str(path))
    text = str(info.value)
    assert "unsafe.pt" in text and "model.init_checkpoint" in text and "model.checkpoint_trust=true" in text
    assert "would run code" in text and "Opaque" in text

    model = make_module(init_checkpoint=str(path), checkpoint_trust=True)
    assert_state_equal(model.g_ema, raw["g_ema"])
    assert_state_equal(model.d, raw["d"])


# Lightning nags that manual-optimisation checkpoints hold the post-step state: that is what we want.
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_resumed_lightning_checkpoint_wins_over_init_checkpoint(tmp_path):
    first = make_module(seed=0)
    ckpt_dir = tmp_path / "ckpt"
    make_trainer(tmp_path / "a", max_steps=1, enable_checkpointing=True,
                 callbacks=[ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)]).fit(
        first, train_dataloaders=make_loader())
    saved = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]

    raw = write_source(tmp_path / "source.pt")
    resumed = make_module(seed=1, init_checkpoint=str(tmp_path / "source.pt"))
    assert_state_equal(resumed.g_ema, raw["g_ema"])
    trainer = make_trainer(tmp_path / "b", max_steps=1)  # already reached: restore only, no training
    trainer.fit(resumed, train_dataloaders=make_loader(), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert trainer.global_step == 1
    assert_state_equal(resumed, saved)
    assert not torch.equal(resumed.latent_avg(), raw["latent_avg"])  # g_ema no longer the file's


def test_hydra_config_builds_the_module_from_a_file(compose_cfg, tmp_path):
    base = compose_cfg(TINY_OVERRIDES)
    assert base.model.init_checkpoint is None and base.model.checkpoint_trust is False
    source = instantiate(base.model)
    with torch.no_grad():
        for p in source.g_ema.parameters():
            p.mul_(-1)
    path = source.export_handoff(tmp_path / "source")

    cfg = compose_cfg(TINY_OVERRIDES + [f"model.init_checkpoint={path}"])
    model = instantiate(cfg.model)
    assert isinstance(model, StyleGAN2Module)
    assert_state_equal(model.g_ema, source.g_ema.state_dict())
    assert_state_equal(model.g, source.g.state_dict())
    assert_state_equal(model.d, source.d.state_dict())

    # a file that does not fit the configured generator: run.py prints the module's message
    cfg = compose_cfg(TINY_OVERRIDES + ["generator.channel_max=16", f"model.init_checkpoint={path}"])
    with pytest.raises(InstantiationException) as info:
        instantiate(cfg.model)
    message = describe_user_error(info.value)
    assert message.startswith("CheckpointError: model.init_checkpoint=")
    assert str(path) in message and "mis-shaped" in message
