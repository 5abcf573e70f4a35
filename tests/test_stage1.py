"""Stage 1 (e4e / pSp encoder training): schedule, losses, hand-off, resume, the run.py experiment.

A 16 px generator (style_dim 32) written to a file in the test and a narrow encoder keep each test to
a few seconds; the LPIPS backbone is random (opted in, so metrics are named "lpips-random").
"""
import math

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tests.helpers.batches import image_items

from callbacks.reconstruction_grid import stack_rows
from lightning_modules.stage1_module import EncoderModule, progressive_stage_at
from networks.checkpoints import CheckpointError, export_generator
from networks.encoder_checkpoints import load_e4e_checkpoint
from networks.latent_discriminator import LatentCodesDiscriminator
from networks.stylegan2 import Generator
from experiments.run import train

pytestmark = pytest.mark.usefixtures("single_thread")

G_CFG = dict(size=16, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32)
ENC_CFG = dict(kind="e4e", num_layers=50, mode="ir_se", input_size=16, width=0.25, units=[1, 1, 1, 1])


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory):
    torch.manual_seed(0)
    g = Generator(**G_CFG)
    path = tmp_path_factory.mktemp("gen") / "generator.pt"
    return export_generator(path, g, g.mean_latent(256, seed=0).reshape(-1))


def make_module(generator_file, **kwargs):
    pl.seed_everything(0, verbose=False)
    opts = dict(generator_checkpoint=str(generator_file), encoder=dict(ENC_CFG), lr=2e-3,
                lpips=dict(allow_random_backbone=True), progressive_start=2, progressive_step_every=2, n_grid=2)
    opts.update(kwargs)
    return EncoderModule(**opts)


def images_from(generator_file, n=4, seed=1):
    """Images the frozen generator can make (so the encoder has something reachable to learn)."""
    g = Generator(**G_CFG)
    g.load_state_dict(torch.load(generator_file, weights_only=True)["g_ema"])
    z = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return g([z])[0].clamp(-1, 1)


def make_trainer(tmp_path, max_steps, **kwargs):
    opts = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                num_sanity_val_steps=0, log_every_n_steps=1, limit_val_batches=1)
    opts.update(kwargs)
    return pl.Trainer(**opts)


class Recorder(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_progressive_schedule_matches_e4e():
    n = 10
    assert [progressive_stage_at(s, n, 20, 5) for s in (0, 19, 20, 24, 25, 30, 1000)] == [0, 0, 1, 1, 2, 3, 9]
    assert progressive_stage_at(0, n, None, 5) == 9  # no progressive training: every delta from the start


def test_latent_discriminator_names_and_shapes():
    disc = LatentCodesDiscriminator(32, 4)
    assert [k for k in disc.state_dict()] == [f"mlp.{i}.{p}" for i in (0, 2, 4, 6) for p in ("weight", "bias")]
    assert disc(torch.randn(5, 32)).shape == (5, 1)


def test_stack_rows_and_grid_file(tmp_path):
    rows = {"input": torch.zeros(3, 3, 8, 8), "mask": torch.ones(3, 1, 8, 8)}
    stacked = stack_rows(rows)
    assert stacked.shape == (6, 3, 8, 8) and float(stacked[3:].min()) == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        stack_rows({"a": torch.zeros(2, 3, 8, 8), "b": torch.zeros(3, 3, 8, 8)})


def test_training_lowers_the_loss_and_follows_the_schedule(generator_file, tmp_path):
    module = make_module(generator_file, w_discriminator_lambda=0.1)
    x = images_from(generator_file, n=4)
    with torch.no_grad():
        before = float(torch.nn.functional.mse_loss(module(x), x))
    recorder = Recorder()
    loader = DataLoader(image_items(x), batch_size=4)
    make_trainer(tmp_path, 30, callbacks=[recorder]).fit(module, loader)
    module.eval()
    with torch.no_grad():
        after = float(torch.nn.functional.mse_loss(module(x), x))
    assert after < 0.7 * before
    stages = [r["train/progressive_stage"] for r in recorder.rows]
    assert stages[:4] == [0, 0, 1, 1] and stages[4] == 2 and stages[-1] == 5  # 16 px: 6 styles, deltas 1..5
    assert "train/w_disc" in recorder.rows[0] and "train/lpips-random" in recorder.rows[0]
    assert "train/delta_norm" in recorder.rows[-1] and all(math.isfinite(v) for v in recorder.rows[-1].values())


def test_export_handoff_is_e4e_layout_and_reproduces_codes(generator_file, tmp_path):
    module = make_module(generator_file)
    x = images_from(generator_file, n=2)
    make_trainer(tmp_path, 3).fit(module, DataLoader(image_items(x), batch_size=2))
    path = module.export_handoff(tmp_path)
    assert path == tmp_path / "encoder.pt"
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"state_dict", "opts", "latent_avg"}
    assert any(k.startswith("encoder.styles.") for k in raw["state_dict"])
    assert any(k.startswith("decoder.convs.") for k in raw["state_dict"])
    assert raw["opts"]["encoder_type"] == "Encoder4Editing" and raw["latent_avg"].shape == (6, 32)
    loaded = load_e4e_checkpoint(path)
    module.eval()
    loaded.encoder.eval()
    with torch.no_grad():
        ours = module.encode(x)
        theirs = loaded.encoder(x) + loaded.latent_avg
    torch.testing.assert_close(theirs, ours)

    again = make_module(generator_file, init_checkpoint=str(path))
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x), ours)


def test_psp_variant_trains_without_deltas(generator_file, tmp_path):
    module = make_module(generator_file, encoder=dict(ENC_CFG, kind="psp"), delta_norm_lambda=0.0,
                         w_discriminator_lambda=0.0, progressive_start=None)
    x = images_from(generator_file, n=2)
    make_trainer(tmp_path, 2).fit(module, DataLoader(image_items(x), batch_size=2))
    assert module.w_discriminator is None
    path = module.export_handoff(tmp_path)
    assert torch.load(path, weights_only=True)["opts"]["encoder_type"] == "GradualStyleEncoder"


def test_bad_inputs_fail_clearly(generator_file, tmp_path):
    with pytest.raises(CheckpointError, match="model.generator_checkpoint=.*nowhere.pt: no such file"):
        make_module(tmp_path / "nowhere.pt")
    strict = make_module(generator_file, allow_resize=False)
    with pytest.raises(ValueError, match=r"images are \(8, 8\).*data.resolution=16"):
        strict.training_step({"image": torch.zeros(2, 3, 8, 8), "name": ["a", "b"]}, 0)
    with pytest.warns(UserWarning, match=r"resizing \(8, 8\) images to the generator's 16x16"):
        assert make_module(generator_file)._check_images(torch.zeros(2, 3, 8, 8)).shape == (2, 3, 16, 16)
    with pytest.raises((FileNotFoundError, ValueError), match="backbone_weights"):
        make_module(generator_file, lpips=dict(allow_random_backbone=False))
    # an encoder file made for another generator
    other = Generator(**dict(G_CFG, style_dim=16))
    other_gen = export_generator(tmp_path / "other_g.pt", other, other.mean_latent(64, seed=0).reshape(-1))
    foreign = make_module(other_gen).export_handoff(tmp_path / "foreign")
    with pytest.raises(CheckpointError, match="model.init_checkpoint=.*missing.pt: no such file"):
        make_module(generator_file, init_checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(CheckpointError, match="model.init_checkpoint: .*other_g.pt is not an e4e/pSp encoder checkpoint"):
        make_module(generator_file, init_checkpoint=str(other_gen))
    with pytest.raises(CheckpointError, match="differs from model.generator_checkpoint"):
        make_module(generator_file, init_checkpoint=str(foreign))


def test_test_step_keeps_per_image_metrics(generator_file, tmp_path):
    module = make_module(generator_file)
    x = images_from(generator_file, n=3)
    batch = {"image": x, "clean": x, "ood_mask": torch.zeros(3, 1, 16, 16), "name": ["a", "b", "c"]}
    loader = DataLoader([{k: v[i] for k, v in batch.items()} for i in range(3)], batch_size=3)
    make_trainer(tmp_path, 1).test(module, loader, verbose=False)
    rows = module.test_table.rows
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    assert {"mse", "psnr", "ssim", "lpips-random"} <= set(rows[0])
    means = module.test_table.mean()
    assert means["psnr"] == pytest.approx(sum(r["psnr"] for r in rows) / 3, rel=1e-5)


def test_run_py_e4e_trains_validates_and_exports(compose_cfg, make_images, generator_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    make_images(tmp_path / "images", [f"{i}.png" for i in range(6)], size=(16, 16))
    cfg = compose_cfg(["+exp=e4e", "data=image_folder", f"data.root={tmp_path / 'images'}", "generator.size=16",
                       "data.batch_size=2", "data.num_workers=0", "data.val_count=2", f"model.generator_checkpoint={generator_file}",
                       "model.encoder.width=0.25", "model.encoder.units=[1,1,1,1]", "logger=csv", "trainer=cpu",
                       "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                       "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"])
    path = train(cfg)
    run = tmp_path / "run"
    assert path == run / "encoder.pt" and load_e4e_checkpoint(path).encoder.config["input_size"] == 16
    grids = sorted((run / "reconstructions").glob("step_*.png"))
    assert [p.name for p in grids] == ["step_000002.png", "step_000004.png"]
    with Image.open(grids[-1]) as im:
        assert im.size[1] > im.size[0] / 3  # two rows: inputs and reconstructions
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = (run / "metrics" / "test.csv").read_text().splitlines()  # evaluate=true: the held-out images tested
    assert rows[0].startswith("name,mse,psnr,ssim") and len(rows) == 3


class EncoderRankCheck(pl.Callback):
    """In each DDP process: write the step count and whether encoder + latent discriminator agree with rank 0."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for net in (pl_module.encoder, pl_module.w_discriminator)
                          for p in net.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        with open(f"{self.out_dir}/rank{trainer.global_rank}.txt", "w") as f:
            f.write(f"{trainer.global_step} {bool(torch.equal(gathered[0], gathered[1]))}")


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_encoders_in_sync(generator_file, tmp_path):
    module = make_module(generator_file, w_discriminator_lambda=0.1)
    before = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    x = images_from(generator_file, n=8)
    trainer = make_trainer(tmp_path, 3, devices=2, strategy="ddp_spawn_find_unused_parameters_true",
                           callbacks=[EncoderRankCheck(tmp_path)])
    trainer.fit(module, DataLoader(image_items(x), batch_size=2))
    for rank in (0, 1):  # 3 counted steps (discriminator steps are not counted), identical weights on both ranks
        assert (tmp_path / f"rank{rank}.txt").read_text() == "3 True"
    assert any(not torch.equal(before[k], v) for k, v in module.encoder.state_dict().items())
