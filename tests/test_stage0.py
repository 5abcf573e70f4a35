"""Stage 0 (StyleGAN2 training): optimisation, hand-off export, exact resume, sample grids.

Tiny networks (16 px, style_dim 32, <= 32 channels) and a 4-image in-memory dataset keep each
test to a few seconds on CPU.
"""
import math
import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402
from pytorch_lightning.loggers import Logger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tests.helpers.batches import image_items  # noqa: E402

from callbacks.sample_grid import SampleGrid, make_grid  # noqa: E402
from lightning_modules.gan_losses import (  # noqa: E402
    d_logistic_loss, g_nonsaturating_loss, path_length_penalty, r1_penalty)
from lightning_modules.stylegan2_module import PRODUCED_BY, StyleGAN2Module  # noqa: E402
from networks.checkpoints import load_generator  # noqa: E402

G_CFG = dict(size=16, style_dim=32, n_mlp=2, channel_max=32)
D_CFG = dict(size=16, channel_max=32)


pytestmark = pytest.mark.usefixtures("single_thread")


def make_module(seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    opts = dict(generator=dict(G_CFG), discriminator=dict(D_CFG), r1_every=2, mixing_prob=0.5)
    opts.update(kwargs)
    return StyleGAN2Module(**opts)


def make_loader(n=4, batch_size=2):
    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return DataLoader(image_items(images), batch_size=batch_size, shuffle=False)


def make_trainer(tmp_path, max_steps, **kwargs):
    opts = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                num_sanity_val_steps=0, log_every_n_steps=1)
    opts.update(kwargs)
    return pl.Trainer(**opts)


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class MetricsRecorder(pl.Callback):
    """Keeps a copy of the metrics logged in every training step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


class ImageLogger(Logger):
    """Minimal logger with ``log_image`` (the WandbLogger method SampleGrid uses)."""

    def __init__(self):
        super().__init__()
        self.images = []

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step, kwargs))


# ---------------------------------------------------------------------------------------------
def test_training_steps_update_g_d_ema_and_log_finite_losses(tmp_path):
    model = make_module(pl_weight=1.0, pl_every=2)
    g0, d0 = clone_state(model.g), clone_state(model.d)
    recorder = MetricsRecorder()
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[recorder])
    trainer.fit(model, train_dataloaders=make_loader())

    assert trainer.global_step == 3  # one counted step per iteration, despite D/R1/PL steps
    assert len(recorder.steps) == 3
    first = recorder.steps[0]  # iteration 0 runs R1 and path length (0 % every == 0)
    for key in ("train/loss_d", "train/loss_g", "train/r1", "train/real_score", "train/fake_score", "train/pl"):
        assert key in first, key
        assert math.isfinite(first[key]), (key, first[key])
    assert all(math.isfinite(v) for step in recorder.steps for v in step.values())
    assert float(model.mean_path_length) > 0

    changed = lambda before, after: any(not torch.equal(before[k], after[k]) for k in before)  # noqa: E731
    assert changed(g0, model.g.state_dict()) and changed(d0, model.d.state_dict())
    g_params = dict(model.g.named_parameters())
    assert any(not torch.equal(p, g_params[k]) for k, p in model.g_ema.named_parameters())
    assert changed(g0, model.g_ema.state_dict())
    assert not any(p.requires_grad for p in model.g_ema.parameters())
    # optimiser settings: betas (0, 0.99) with the lazy-regularisation correction
    opt_g, opt_d = trainer.optimizers
    assert opt_d.param_groups[0]["lr"] == pytest.approx(0.002 * 2 / 3)
    assert opt_d.param_groups[0]["betas"] == pytest.approx((0.0, 0.99 ** (2 / 3)))
    assert opt_g.param_groups[0]["lr"] == pytest.approx(0.002 * 2 / 3)


def test_without_regularisers_no_r1_or_pl_logged_and_no_lr_correction(tmp_path):
    model = make_module(r1_gamma=0.0, mixing_prob=0.0)
    recorder = MetricsRecorder()
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[recorder])
    trainer.fit(model, train_dataloaders=make_loader())
    assert "train/r1" not in recorder.steps[0] and "train/pl" not in recorder.steps[0]
    assert all(opt.param_groups[0]["lr"] == pytest.approx(0.002) for opt in trainer.optimizers)


def test_bf16_mixed_precision_runs_with_r1(tmp_path):
    model = make_module(pl_weight=1.0, pl_every=1)
    recorder = MetricsRecorder()
    trainer = make_trainer(tmp_path, max_steps=1, precision="bf16-mixed", callbacks=[recorder])
    trainer.fit(model, train_dataloaders=make_loader())
    assert {"train/r1", "train/pl", "train/loss_g"} <= set(recorder.steps[0])
    assert all(math.isfinite(v) for v in recorder.steps[0].values())
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_mixed_precision_on_gpu(tmp_path):
    model = make_module(pl_weight=1.0, pl_every=1)
    recorder = MetricsRecorder()
    trainer = make_trainer(tmp_path, max_steps=2, accelerator="gpu", precision="16-mixed", callbacks=[recorder])
    trainer.fit(model, train_dataloaders=make_loader())
    assert trainer.global_step == 2
    assert {"train/r1", "train/pl", "train/loss_g"} <= set(recorder.steps[0])
    assert all(math.isfinite(v) for v in recorder.steps[0].values())


def test_export_handoff_reloads_to_identical_outputs(tmp_path):
    model = make_module()
    make_trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=make_loader())
    path = model.export_handoff(tmp_path / "run")
    assert path == tmp_path / "run" / "generator.pt" and path.is_file()

    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert {"g_ema", "latent_avg", "g", "d", "meta"} <= set(raw)
    meta = raw["meta"]
    assert meta["produced_by"] == PRODUCED_BY and meta["global_step"] == 1
    assert meta["generator"]["size"] == 16 and meta["discriminator"]["channel_max"] == 32
    assert meta["module"]["r1_every"] == 2
    assert raw["latent_avg"].shape == (32,)
    torch.testing.assert_close(raw["latent_avg"], model.g_ema.mean_latent(4096, seed=0).reshape(-1))

    g_loaded, latent_avg = load_generator(path)
    z = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model.g_ema([z], randomize_noise=False)[0]
        got = g_loaded([z], randomize_noise=False)[0]
    assert torch.equal(got, expected)
    assert torch.equal(latent_avg, raw["latent_avg"])
    # "g" is the raw generator, distinct from the EMA one
    assert any(not torch.equal(raw["g"][k], raw["g_ema"][k]) for k in raw["g"] if not k.startswith("noises"))


# Lightning nags that manual-optimisation checkpoints hold the post-step state: that is what we want.
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # resuming in place
def test_resume_from_last_ckpt_matches_uninterrupted_run(tmp_path):
    ckpt_dir = tmp_path / "ckpt"

    def checkpointing():
        return ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, every_n_train_steps=2)

    first = make_module(seed=0, pl_weight=1.0, pl_every=3)
    make_trainer(tmp_path / "a", max_steps=4, enable_checkpointing=True,
                 callbacks=[checkpointing()]).fit(first, train_dataloaders=make_loader())
    last = ckpt_dir / "last.ckpt"
    assert last.is_file()
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4
    assert any(k.startswith("g_ema.") for k in saved["state_dict"]) and len(saved["optimizer_states"]) == 2

    resumed = make_module(seed=123, pl_weight=1.0, pl_every=3)  # different init: everything must come from ckpt
    recorder = MetricsRecorder()
    trainer = make_trainer(tmp_path / "b", max_steps=6, enable_checkpointing=True,
                           callbacks=[recorder, checkpointing()])
    trainer.fit(resumed, train_dataloaders=make_loader(), ckpt_path=str(last))
    assert trainer.global_step == 6 and len(recorder.steps) == 2

    reference = make_module(seed=0, pl_weight=1.0, pl_every=3)
    ref_trainer = make_trainer(tmp_path / "c", max_steps=6)
    ref_trainer.fit(reference, train_dataloaders=make_loader())

    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for opt_resumed, opt_ref in zip(trainer.optimizers, ref_trainer.optimizers):
        for p_state, ref_state in zip(opt_resumed.state.values(), opt_ref.state.values()):
            assert all(torch.equal(p_state[k], ref_state[k]) for k in ref_state)


def test_sample_grid_writes_pngs_of_the_right_size_and_logs_them(tmp_path):
    model = make_module()
    logger = ImageLogger()
    grid_cb = SampleGrid(every_n_steps=1, n_samples=5, nrow=3, seed=7, run_dir=str(tmp_path / "run"))
    make_trainer(tmp_path, max_steps=2, logger=logger, callbacks=[grid_cb]).fit(
        model, train_dataloaders=make_loader())

    files = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert files == ["step_000001.png", "step_000002.png"]  # on_train_end does not write step 2 twice
    image = Image.open(tmp_path / "run" / "samples" / "step_000002.png")
    assert image.size == (3 * (16 + 2) + 2, 2 * (16 + 2) + 2) and image.mode == "RGB"
    assert [(key, step) for key, _, step, _ in logger.images] == [("samples/g_ema", 1), ("samples/g_ema", 2)]

    # the first tile is g_ema's output for the seeded latents with stored noise
    z = torch.randn(5, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        first = model.g_ema([z], randomize_noise=False)[0][0]
    expected = ((first + 1) / 2).clamp(0, 1).mul(255).round().permute(1, 2, 0)
    tile = torch.tensor(np.asarray(image), dtype=torch.float32)[2:18, 2:18]
    assert (tile - expected).abs().max() <= 1


def test_gan_losses_reference_values():
    zeros = torch.zeros(4, 1)
    assert float(d_logistic_loss(zeros, zeros)) == pytest.approx(2 * math.log(2))
    assert float(g_nonsaturating_loss(zeros)) == pytest.approx(math.log(2))
    assert float(g_nonsaturating_loss(torch.full((4, 1), 50.0))) == pytest.approx(0.0, abs=1e-12)

    # linear "discriminator" D(x) = <w, x>: the input gradient is w for every sample, so R1 = ||w||^2
    w = torch.randn(3, 4, 4, requires_grad=True)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    r1 = r1_penalty((x * w).flatten(1).sum(1, keepdim=True), x)
    assert float(r1.detach()) == pytest.approx(float(w.detach().square().sum()), rel=1e-5)
    assert r1.requires_grad  # differentiable w.r.t. the discriminator's weights

    latents = torch.randn(3, 4, 8, requires_grad=True)
    fake = (latents.sum(1) @ torch.randn(8, 3 * 2 * 2, requires_grad=True)).view(3, 3, 2, 2)
    penalty, mean, lengths = path_length_penalty(fake, latents, torch.zeros(()), decay=0.01)
    assert lengths.shape == (3,) and torch.all(lengths > 0)
    assert float(mean) == pytest.approx(0.01 * float(lengths.mean()), rel=1e-5)
    assert penalty.ndim == 0 and penalty.requires_grad and not mean.requires_grad


def test_make_grid_layout():
    images = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 1.0, 0.0)])
    grid = make_grid(images, nrow=2, padding=1, pad_value=0.5)
    assert grid.shape == (3, 2 * 5 + 1, 2 * 5 + 1)
    assert torch.all(grid[:, 1:5, 1:5] == 0) and torch.all(grid[:, 1:5, 6:10] == 1)
    assert torch.all(grid[:, 6:10, 1:5] == 0.5) and torch.all(grid[:, 6:10, 6:10] == 0.5)  # 0 -> 0.5; empty cell


def test_bad_configs_and_batches_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model.generator.size=16 != model.discriminator.size=32"):
        StyleGAN2Module(generator=dict(G_CFG), discriminator=dict(D_CFG, size=32))
    with pytest.raises(TypeError, match="model.generator"):
        StyleGAN2Module(generator=dict(G_CFG, bogus=1), discriminator=dict(D_CFG))
    with pytest.raises(TypeError, match="`generator`"):
        StyleGAN2Module(generator=16, discriminator=dict(D_CFG))
    with pytest.raises(ValueError, match=r"model.r1_every=0.*model.ema_beta=1.0"):
        StyleGAN2Module(generator=dict(G_CFG), discriminator=dict(D_CFG), r1_every=0, ema_beta=1.0)
    with pytest.raises(ValueError, match="SampleGrid: n_samples"):
        SampleGrid(n_samples=0)

    model = make_module()
    wrong = DataLoader(image_items(torch.zeros(4, 3, 8, 8)), batch_size=2)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\).*gave \(2, 3, 8, 8\)"):
        make_trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=wrong)


def test_hydra_style_config_nodes_are_accepted():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"generator": dict(G_CFG, blur_kernel=[1, 3, 3, 1]), "discriminator": D_CFG})
    model = StyleGAN2Module(generator=cfg.generator, discriminator=cfg.discriminator)
    assert type(model.hparams["generator"]) is dict and model.hparams["generator"]["blur_kernel"] == [1, 3, 3, 1]


class RankConsistency(pl.Callback):
    """In each DDP process: write the step count and whether g, d, g_ema agree with rank 0."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([torch.cat([p.detach().flatten() for p in net.parameters()])
                          for net in (pl_module.g, pl_module.d, pl_module.g_ema)])
        gathered = trainer.strategy.all_gather(flat)  # (world_size, n)
        same = bool(torch.equal(gathered[0], gathered[1]))
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.txt"), "w") as f:
            f.write(f"{trainer.global_step} {same}")


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    model = make_module(pl_weight=1.0, pl_every=1)
    g0 = clone_state(model.g)
    trainer = make_trainer(tmp_path, max_steps=2, devices=2, strategy="ddp_spawn_find_unused_parameters_true",
                           callbacks=[RankConsistency(tmp_path)])
    trainer.fit(model, train_dataloaders=make_loader(n=8))
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "2 True"
    assert any(not torch.equal(g0[k], v) for k, v in model.g.state_dict().items())  # rank 0 weights came back
