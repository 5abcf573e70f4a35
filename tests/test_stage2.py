"""Stage 2 (alignment + invertibility mask) LightningModule: schedule, losses, EMA hand-off, checks, evaluation."""
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tests.helpers.batches import image_items

from datamodules.ood_patches import paste_random_patches
from lightning_modules.stage2_module import AlignMaskModule
from networks.align_mask import load_align_mask
from networks.checkpoints import CheckpointError, export_generator
from networks.editing import save_direction
from networks.stylegan2 import Generator
from networks.synthfaces_nets import AttributeClassifier, save_aux_net
from tests.helpers.tiny_stage1 import export_tiny_stage1

pytestmark = pytest.mark.usefixtures("single_thread")
G_CFG = dict(size=64, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32)


@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    tiny = export_tiny_stage1(root / "encoder.pt")
    export_generator(root / "generator.pt", tiny.generator, tiny.latent_avg[0])
    return tiny.path


def make_module(stage1_file, **kwargs):
    pl.seed_everything(0, verbose=False)
    opts = dict(encoder_checkpoint=str(stage1_file), lpips=dict(allow_random_backbone=True), lr=1e-3,
                level_milestones=[0, 2], n_grid=2)
    opts.update(kwargs)
    return AlignMaskModule(**opts)


def trainer(tmp_path, steps, **kwargs):
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                      num_sanity_val_steps=0, log_every_n_steps=1, **kwargs)


def test_levels_follow_the_milestones(stage1_file):
    module = make_module(stage1_file)
    assert module.level_list == [8, 16]
    assert module.active_levels(0) == [8] and module.active_levels(2) == [8, 16]
    assert module.area_limits == {"8": 0.3, "16": 0.3, "fused": 0.2}
    with pytest.raises(ValueError, match="level_milestones"):
        make_module(stage1_file, level_milestones=[5, 0])


def test_training_lowers_the_loss_and_the_hand_off_reloads(stage1_file, tmp_path):
    module = make_module(stage1_file)
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        first, _ = module._losses(x, module.net(module.generator, *module.encode(x), x, active_levels=[8, 16]))
    trainer(tmp_path, 12).fit(module, DataLoader(image_items(x), batch_size=4))
    with torch.no_grad():
        last, parts = module._losses(x, module.net(module.generator, *module.encode(x), x, active_levels=[8, 16]))
    assert last < first
    assert {"pixel", "lpips-random", "adv", "binarization", "area", "mask_mean"} <= set(parts)
    assert all(p.grad is None for p in module.generator.parameters())
    path = module.export_handoff(tmp_path)
    net, meta = load_align_mask(path)
    assert meta["encoder_checkpoint"] == str(stage1_file) and meta["global_step"] == 12
    codes, taps = module.encode(x)
    with torch.no_grad():
        ref = module.net_ema(module.generator, codes, taps, x)
        again = net(module.generator, codes, taps, x)
    torch.testing.assert_close(again.output, ref.output)


def test_another_generator_is_caught_naming_both_files(stage1_file, tmp_path):
    other = Generator(**dict(G_CFG, style_dim=16))
    path = export_generator(tmp_path / "other.pt", other, other.mean_latent(64, seed=0).reshape(-1))
    with pytest.raises(CheckpointError, match=r"other.pt and model.encoder_checkpoint=.*encoder.pt hold different"):
        make_module(stage1_file, generator_checkpoint=str(path))
    same_arch = Generator(**G_CFG)
    path = export_generator(tmp_path / "same_arch.pt", same_arch, same_arch.mean_latent(64, seed=0).reshape(-1))
    with pytest.raises(CheckpointError, match="different weights"):
        make_module(stage1_file, generator_checkpoint=str(path))
    make_module(stage1_file, generator_checkpoint=str(stage1_file.parent / "generator.pt"))  # the right one passes


def test_evaluation_keeps_mask_and_region_metrics(stage1_file, tmp_path):
    classifier = save_aux_net(tmp_path / "classifier.pt", AttributeClassifier(resolution=64, widths=(4, 8, 8, 8),
                                                                              feature_dim=8))
    direction = save_direction(tmp_path / "smile.pt", torch.randn(1, 32))
    module = make_module(stage1_file, edit=dict(direction=str(direction), classifier=str(classifier), strength=2.0))
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    gt = torch.zeros(3, 1, 64, 64)
    gt[:, :, 40:] = 1
    items = [{"image": x[i], "clean": x[i], "ood_mask": gt[i], "name": f"n{i}"} for i in range(3)]
    trainer(tmp_path, 1).test(module, DataLoader(items, batch_size=3), verbose=False)
    row = module.test_table.rows[0]
    assert row["name"] == "n0"
    for prefix in ("", "stage1_"):
        assert {prefix + k for k in ("psnr", "psnr_in", "psnr_out", "lpips-random", "edit_success", "edit_change",
                                     "edit_ood_psnr")} <= set(row)
    assert {"iou@0.5", "best_iou", "mask_mean"} <= set(row)
    assert set(module.grid_batch) == {"input", "stage1", "generated", "mask", "output", "ood_mask", "stage1_edit",
                                      "edit"}
    # stage one alone is the plain generator on the encoder's codes
    codes, _ = module.encode(x)
    with torch.no_grad():
        plain = module.generator.synthesize(codes).image
    torch.testing.assert_close(module.grid_batch["stage1"], plain[:2])
    # editing through stage two blends against the input: where the mask is ~1 the edit keeps the input
    with torch.no_grad():
        out = module.run(x, codes=codes + 2.0 * module.edit["direction"])
    torch.testing.assert_close(module.grid_batch["edit"], out.output[:2])
    summary = module.summary_markdown().splitlines()
    assert summary[0].startswith("| method | PSNR | SSIM | MSE | PSNR in OOD") and "edit success" in summary[0]
    assert summary[2].startswith("| stage 1 (encoder only) |") and summary[3].startswith("| stage 2")


def test_edit_needs_the_classifier(stage1_file, tmp_path):
    direction = save_direction(tmp_path / "smile.pt", torch.randn(1, 32))
    with pytest.raises(ValueError, match="model.edit.classifier"):
        make_module(stage1_file, edit=dict(direction=str(direction)))


def test_editing_blends_the_edit_against_the_input(stage1_file):
    """Editing through stage two: output = mask * input + (1 - mask) * G(edited code, aligned), with the taps and
    the mask computed from the input image (official inference), so the edit changes only the generated part."""
    module = make_module(stage1_file)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    codes, _ = module.encode(x)
    with torch.no_grad():
        plain = module.run(x)
        edited = module.run(x, codes=codes + 1.0)
    torch.testing.assert_close(edited.output, edited.mask * x + (1 - edited.mask) * edited.generated)
    assert not torch.allclose(edited.generated, plain.generated)
    torch.testing.assert_close(plain.output, plain.mask * x + (1 - plain.mask) * plain.generated)


def test_training_with_pasted_patches(stage1_file, tmp_path):
    module = make_module(stage1_file, train_patches=dict(p=1.0, max_patches=2, area=[0.05, 0.1]))
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    trainer(tmp_path, 2).fit(module, DataLoader(image_items(x), batch_size=4))
    assert module.global_step == 2


def test_patch_supervision_is_the_bce_of_the_fused_mask_against_the_pasted_patches(stage1_file, tmp_path):
    """The optional term: it needs pasted patches, it adds weight x BCE(fused mask, patch mask) to the loss, its
    gradient reaches the mask network, and training logs it."""
    with pytest.raises(ValueError, match=r"patch_supervision > 0 needs pasted training patches"):
        make_module(stage1_file, patch_supervision=1.0)
    module = make_module(stage1_file, patch_supervision=2.0, train_patches=dict(p=1.0, max_patches=1, area=[0.1, 0.15]))
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    patched, mask = paste_random_patches(x, p=1.0, max_patches=1, area=(0.1, 0.15),
                                         generator=torch.Generator().manual_seed(2))
    out = module.net(module.generator, *module.encode(patched), patched, active_levels=[8, 16])
    with_term, parts = module._losses(patched, out, mask)
    without, _ = module._losses(patched, out, None)
    expected = F.binary_cross_entropy(out.mask.clamp(1e-4, 1 - 1e-4), mask)
    torch.testing.assert_close(parts["patch_bce"], expected.detach())
    torch.testing.assert_close(with_term - without, 2.0 * expected)
    grads = torch.autograd.grad(with_term - without, [p for p in module.net.parameters() if p.requires_grad],
                                allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    trainer(tmp_path, 2).fit(module, DataLoader(image_items(x), batch_size=4))
    assert torch.isfinite(module.trainer.callback_metrics["train/patch_bce"])


def test_run_py_ood_blend_trains_evaluates_and_reports(compose_cfg, stage1_file, tmp_path, monkeypatch):
    """`+exp=ood_blend` end to end on a tiny rendered SynthFaces set: hand-off, per-image metrics with masks and
    edits, the stage-1 vs stage-2 summary, grids and mask overlays."""
    from experiments.run import train
    from networks.synthfaces_nets import AttributeClassifier, save_aux_net

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    classifier = save_aux_net(tmp_path / "classifier.pt", AttributeClassifier(resolution=64, widths=(4, 8, 8, 8),
                                                                              feature_dim=8))
    overrides = ["+exp=ood_blend", f"data.root={tmp_path / 'sf'}", "data.n_images=24", "data.n_eval=4",
                 "data.render_size=64", "data.batch_size=4", "data.num_workers=0",
                       f"model.encoder_checkpoint={stage1_file}", f"model.edit.classifier={classifier}",
                       "model.level_milestones=[0,1]", "logger=csv", "trainer=cpu", "trainer.max_steps=2",
                       "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                       "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
                       "model.edit.direction=" + str(save_direction(tmp_path / "d.pt", torch.randn(1, 32)))]
    path = train(compose_cfg(overrides))
    run = tmp_path / "run"
    assert path == run / "align_mask.pt"
    net, meta = load_align_mask(path)
    assert meta["encoder_checkpoint"] == str(stage1_file) and meta["global_step"] == 2
    rows = (run / "metrics" / "test.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 5 and {"iou@0.5", "best_iou", "psnr_in", "stage1_psnr_in", "edit_success",
                               "stage1_edit_ood_psnr"} <= set(header)
    summary = (run / "metrics" / "summary.md").read_text()
    assert "| stage 1 (encoder only) |" in summary and "mask IoU@0.5" in summary
    assert (run / "masks" / "test_step_000002.png").is_file() and (run / "masks" / "val_step_000002.png").is_file()
    assert (run / "reconstructions" / "step_000002.png").is_file()
    # re-test the finished run from its checkpoint: the same numbers
    first = (run / "metrics" / "test.csv").read_text()
    (run / "metrics" / "test.csv").unlink()
    assert train(compose_cfg(overrides + ["mode=evaluate", "resume=true"])) is None
    assert (run / "metrics" / "test.csv").read_text() == first


# ------------------------------------------------------------------------------------------- recipes
def test_synthfaces_experiment_states_our_resampling_variants_and_the_method_defaults_are_official(compose_cfg):
    model = compose_cfg(["+exp=ood_blend"]).model
    assert (model.blur_padding, model.warp_grid, model.gate_interpolation) == ("replicate", "identity", "bilinear")
    assert (model.inference_noise, model.discriminator_forward, model.encoder_resize) == ("stored", "shared",
                                                                                          "antialiased")
    model = compose_cfg(["model=ood_blend"]).model  # the method's config without the experiment
    assert (model.blur_padding, model.warp_grid, model.gate_interpolation) == ("zeros", "linspace", "bicubic")


def test_official_recipe_composes_and_trains_on_a_tiny_model(compose_cfg, stage1_file, tmp_path):
    """+exp=ood_blend_official: levels at 0 / 2k / 6k / 10k, lr x0.75 per 15k, fresh noise, detached adversarial term,
    VGG19 + Gram x50, ID 0.1 (scaled crop); weight paths are required. Two steps on the tiny stage-1 file with
    random VGG / ArcFace / LPIPS backbones (and a 1-step lr period so the decay shows)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose_cfg(["+exp=ood_blend_official"])
    m = cfg.model
    assert OmegaConf.to_container(m.level_milestones) == {"start": 2000, "step": 4000}
    assert OmegaConf.to_container(m.lr_schedule) == {"step": 15000, "gamma": 0.75}
    assert m.train_randomize_noise and not m.adversarial_grad and m.perceptual_kind == "vgg19"
    assert (m.perceptual, m.style, m.identity_weight, m.identity.crop, m.lr) == (1.0, 50.0, 0.1, "scaled", 2e-5)
    assert (m.blur_padding, m.warp_grid, m.gate_interpolation) == ("zeros", "linspace", "bicubic")
    assert (m.inference_noise, m.discriminator_forward, m.encoder_resize) == ("random", "separate", "bilinear")
    assert (cfg.generator.size, cfg.data.batch_size) == (1024, 2)
    # required weight paths: a run without them stops naming the key
    with pytest.raises(InstantiationException, match="model.encoder_checkpoint is required"):
        instantiate(cfg.model)
    with pytest.raises(InstantiationException, match="set model.vgg.weights=PATH"):
        instantiate(cfg.model, encoder_checkpoint=str(stage1_file), lpips={"allow_random_backbone": True})
    cfg = compose_cfg(["+exp=ood_blend_official", f"model.encoder_checkpoint={stage1_file}", "model.vgg.weights=null",
                       "model.vgg.allow_random=true", "model.identity.weights=null", "model.identity.allow_random=true",
                       "model.lpips.backbone_weights=null", "model.lpips.allow_random_backbone=true",
                       "model.lr_schedule.step=1", "model.n_grid=2"])
    pl.seed_everything(0, verbose=False)
    module = instantiate(cfg.model)
    assert module.milestones == [0, 2000]  # the tiny generator has two levels
    noises = []
    synthesize = module.generator.synthesize

    def spy(*args, **kwargs):
        noises.append(kwargs.get("noise"))
        return synthesize(*args, **kwargs)

    module.generator.synthesize = spy
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    trainer(tmp_path, 2).fit(module, DataLoader(image_items(x), batch_size=2))
    assert module.global_step == 2
    assert noises and all(n == [None] * module.generator.num_layers for n in noises)  # fresh noise, every layer
    metrics = module.trainer.callback_metrics
    assert {"train/vgg-random", "train/vgg-random_style", "train/id-random", "train/adv"} <= set(metrics)
    for opt in module.trainer.optimizers:
        assert opt.param_groups[0]["lr"] == pytest.approx(2e-5 * 0.75 ** 2)


def test_official_adversarial_term_sends_no_gradient(stage1_file):
    """adversarial_grad=false (official): the term is D(output.detach()), logged and added, but the module's gradient
    is that of the other terms alone; adversarial_grad=true (ours): the term's gradient reaches the module."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for grad in (False, True):
        module = make_module(stage1_file, adversarial_grad=grad)
        params = [p for p in module.net.parameters() if p.requires_grad]
        out = module.net(module.generator, *module.encode(x), x)
        loss, parts = module._losses(x, out)
        torch.testing.assert_close(parts["adv"], F.softplus(-module.discriminator(out.output)).mean().detach())
        with_adv = torch.autograd.grad(loss, params, retain_graph=True)
        module.hparams.adversarial = 0.0
        without = torch.autograd.grad(module._losses(x, out)[0], params)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(with_adv, without)) == (not grad)


def test_level_milestones_official_mapping_and_lr_schedule_checks(stage1_file):
    module = make_module(stage1_file, level_milestones={"start": 2000, "step": 4000})
    assert module.milestones == [0, 2000]
    assert module.active_levels(1999) == [8] and module.active_levels(2000) == [8, 16]
    with pytest.raises(ValueError, match="level_milestones"):
        make_module(stage1_file, level_milestones={"start": 2000})
    with pytest.raises(ValueError, match="lr_schedule"):
        make_module(stage1_file, lr_schedule={"step": 0, "gamma": 0.5})
    with pytest.raises(ValueError, match="perceptual_kind"):
        make_module(stage1_file, perceptual_kind="alex")


def test_official_and_our_noise_discriminator_and_encoder_resize_options(stage1_file, tmp_path):
    """discriminator_forward: "separate" (official) runs the module a second time for D's step, "shared" (ours) once;
    inference_noise: "random" (official) draws fresh maps at test, "stored" (ours) is reproducible and reaches the
    hand-off; encoder_resize: "bilinear" (official) vs "antialiased" (ours) on inputs of another size."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    calls = {}
    for forward in ("separate", "shared"):
        module = make_module(stage1_file, discriminator_forward=forward, level_milestones=None)
        count = []
        synthesize = module.generator.synthesize
        module.generator.synthesize = lambda *a, **k: (count.append(1), synthesize(*a, **k))[1]
        trainer(tmp_path / forward, 3, limit_val_batches=0).fit(module, DataLoader(image_items(x), batch_size=2))
        calls[forward] = len(count)
    assert calls == {"separate": 6, "shared": 3}

    for noise, same in (("random", False), ("stored", True)):
        module = make_module(stage1_file, inference_noise=noise)
        with torch.no_grad():
            for name, p in module.generator.named_parameters():  # the tiny G's noise strengths start at 0
                if "noise" in name:
                    p.fill_(0.5)
            a, b = module.run(x).generated, module.run(x).generated
        assert torch.equal(a, b) is same
        path = module.export_handoff(tmp_path / noise)
        assert load_align_mask(path)[0].inference_noise == noise

    big = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    encoded = {}
    for resize in ("bilinear", "antialiased"):
        module = make_module(stage1_file, encoder_resize=resize)
        size = int(module.encoder.config["input_size"])
        with pytest.warns(UserWarning, match="resizing images"):
            codes, _ = module.encode(big)
        want, _ = module.encoder.forward_features(F.interpolate(big, size=(size, size), mode="bilinear",
                                                                align_corners=False, antialias=resize != "bilinear"))
        torch.testing.assert_close(codes, want + module.latent_avg.unsqueeze(0))
        encoded[resize] = codes
    assert not torch.allclose(encoded["bilinear"], encoded["antialiased"])
    for key, value in (("discriminator_forward", "twice"), ("encoder_resize", "bicubic")):
        with pytest.raises(ValueError, match=f"model.{key}='{value}'"):
            make_module(stage1_file, **{key: value})
    with pytest.raises(ValueError, match="inference_noise"):
        make_module(stage1_file, inference_noise="fixed")
