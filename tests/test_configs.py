"""The Hydra config tree: every experiment composes and builds; +exp semantics; presets; paths."""
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from experiments.utils import instantiate_callbacks, instantiate_loggers
from experiments.utils.cli import available_exps
from tests.conftest import CONFIG_DIR

EXPS = available_exps(CONFIG_DIR)


def raw_compose(overrides):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_exp_folder_lists_the_experiments():
    assert "stylegan" in EXPS
    for name in EXPS:
        assert (CONFIG_DIR / "exp" / f"{name}.yaml").read_text().startswith("# @package _global_")


@pytest.mark.parametrize("exp", EXPS)
def test_every_exp_composes_and_builds_data_trainer_callbacks(exp, compose_cfg, make_images, tmp_path):
    make_images(tmp_path / "images", [f"{i}.png" for i in range(4)], size=(8, 8))
    cfg = compose_cfg([f"+exp={exp}", "data=image_folder", f"data.root={tmp_path / 'images'}", "data.num_workers=0", "data.batch_size=2",
                       "trainer=cpu", "logger=csv"])
    OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolation or ??? left
    assert cfg.task_name == exp
    dm = instantiate(cfg.data)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["image"].shape[1:] == (3, cfg.generator.size, cfg.generator.size)
    callbacks = instantiate_callbacks(cfg.callbacks)
    loggers = instantiate_loggers(cfg.logger)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    assert trainer.max_steps == cfg.trainer.max_steps
    if cfg.trainer.get("enable_checkpointing", True):  # stage 3 trains nothing and keeps no checkpoints
        assert Path(trainer.checkpoint_callback.dirpath) == tmp_path / "run" / "checkpoints"
    else:
        assert trainer.checkpoint_callback is None and cfg.mode == "evaluate"
    assert Path(trainer.logger.log_dir).is_relative_to(tmp_path / "run")


def test_stage0_model_builds_from_config(compose_cfg):
    module = pytest.importorskip("lightning_modules.stylegan2_module")
    cfg = compose_cfg(["+exp=stylegan", "data=image_folder", "data.root=unused", "generator.size=16", "generator.channel_max=16"])
    model = instantiate(cfg.model)
    assert isinstance(model, module.StyleGAN2Module)
    assert model.hparams.generator["size"] == 16 and model.hparams.discriminator["size"] == 16
    assert isinstance(model.hparams.generator, dict) and isinstance(model.hparams.generator["blur_kernel"], list)


def test_exp_is_appended_not_a_default():
    cfg = raw_compose([])
    assert "exp" not in cfg.hydra.runtime.choices and cfg.task_name == "run"
    with pytest.raises(ConfigCompositionException, match=r"\+exp=stylegan"):
        raw_compose(["exp=stylegan"])
    assert raw_compose(["+exp=stylegan"]).hydra.runtime.choices.exp == "stylegan"


def test_command_line_wins_over_exp_and_sizes_follow_the_generator():
    cfg = raw_compose(["+exp=stylegan", "generator=ffhq256", "data.batch_size=3", "trainer.max_steps=7"])
    assert cfg.generator.size == 256 and cfg.data.resolution == 256
    assert cfg.model.discriminator == {"size": 256, "channel_multiplier": 2, "channel_max": 512}
    assert cfg.data.batch_size == 3 and cfg.trainer.max_steps == 7


def test_debug_fdr_keeps_its_settings_next_to_an_exp():
    cfg = raw_compose(["+exp=stylegan", "debug=fdr"])
    assert cfg.trainer.fast_dev_run is True and cfg.trainer.accelerator == "cpu"
    assert cfg.data.num_workers == 0 and not cfg.logger
    assert cfg.paths.output_dir.endswith("outputs/debug")


def test_generator_presets_match_rosinality_configs():
    expected = {
        "tiny": dict(size=64, style_dim=128, n_mlp=4, channel_multiplier=1, channel_max=64),
        "ffhq256": dict(size=256, style_dim=512, n_mlp=8, channel_multiplier=2, channel_max=512),
        "ffhq1024": dict(size=1024, style_dim=512, n_mlp=8, channel_multiplier=2, channel_max=512),
    }
    for name, values in expected.items():
        g = raw_compose([f"generator={name}"]).generator
        assert {k: g[k] for k in values} == values and g.lr_mlp == 0.01 and list(g.blur_kernel) == [1, 3, 3, 1]


def test_stage0_model_keys():
    base = raw_compose(["model=stylegan"]).model  # rosinality's defaults in the model group
    assert base._target_ == "lightning_modules.stylegan2_module.StyleGAN2Module"
    assert (base.lr, base.r1_gamma, base.r1_every, base.pl_weight, base.pl_every) == (0.002, 10.0, 16, 0.0, 4)
    assert (base.ema_beta, base.mixing_prob, base.sample_every_n_steps, base.n_samples) == (0.999, 0.9, 500, 16)
    model = raw_compose(["+exp=stylegan"]).model  # the SynthFaces 64 px experiment's small-resolution settings
    assert (model.r1_gamma, model.ema_beta, model.sample_every_n_steps) == (0.1, 0.998, 250)


def test_trainer_presets():
    t = {name: raw_compose([f"trainer={name}"]).trainer for name in ("cpu", "gpu", "gpu_amp", "ddp", "ddp_cpu")}
    assert t["cpu"].accelerator == "cpu"
    assert t["gpu"].accelerator == "gpu" and t["gpu"].precision == "32-true"
    assert t["gpu_amp"].precision == "16-mixed"
    assert t["ddp"].strategy == t["ddp_cpu"].strategy == "ddp_find_unused_parameters_true"
    assert (t["ddp_cpu"].accelerator, t["ddp_cpu"].devices) == ("cpu", 2)


def test_run_dir_defaults_unique_or_slurm_job_and_can_be_set(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = raw_compose(["+exp=stylegan"])
    assert cfg.hydra.run.dir == cfg.paths.run_dir
    assert re.fullmatch(r".*/outputs/stylegan/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}", cfg.paths.run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = raw_compose(["+exp=stylegan"])
    assert cfg.paths.run_dir.endswith("outputs/stylegan/4242")
    # the sweep dir is a time stamp even under SLURM: submitit array tasks re-resolve it with their own job ids
    assert re.fullmatch(r".*/outputs/stylegan/multirun_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}", cfg.hydra.sweep.dir)
    assert raw_compose(["+exp=stylegan", "paths.run_dir=/x/my_run"]).hydra.run.dir == "/x/my_run"


def test_wandb_logger_offline_by_default_into_the_run_dir(compose_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg(["+exp=stylegan", "logger=wandb"])
    node = cfg.logger.wandb
    assert node.mode == "offline" and node.project == "invertlab" and node.save_dir == cfg.paths.run_dir
    monkeypatch.setenv("WANDB_MODE", "online")
    assert cfg.logger.wandb.mode == "online"
    none = raw_compose(["logger=none", "callbacks=none"])
    assert instantiate_loggers(none.logger) == [] and instantiate_callbacks(none.callbacks) == []


def test_wandb_sweep_file_drives_run_py_with_valid_overrides(compose_cfg):
    import itertools

    import yaml

    root = Path(__file__).resolve().parents[1]
    sweep = yaml.safe_load((root / "experiments" / "sweeps" / "dhr.yaml").read_text())
    assert (root / sweep["program"]).is_file()
    assert sweep["command"][-2:] == ["+exp=dhr", "${args_no_hyphens}"]
    names = list(sweep["parameters"])
    for values in itertools.product(*(sweep["parameters"][n]["values"] for n in names)):
        cfg = compose_cfg(["+exp=dhr", *(f"{n}={v}" for n, v in zip(names, values))])
        for name, value in zip(names, values):
            assert OmegaConf.select(cfg, name) == value


def test_stage3_settings_are_dataclasses_whose_defaults_the_yaml_lists():
    """model.refine / pti / feature_only / segmentation: Hydra builds the dataclasses (their one place of defaults);
    model/refine.yaml lists exactly those defaults (documentation, command-line overrides), experiments override."""
    from dataclasses import asdict, is_dataclass

    from networks.refine.hybrid import RefineConfig
    from networks.refine.methods import FeatureOnlyConfig, PTIConfig
    from networks.refine.segmenter import SegmentationConfig

    model = raw_compose(["model=refine"]).model
    for key, cls in (("refine", RefineConfig), ("pti", PTIConfig), ("feature_only", FeatureOnlyConfig),
                     ("segmentation", SegmentationConfig)):
        node = OmegaConf.to_container(model[key])
        assert node.pop("_target_") == f"{cls.__module__}.{cls.__qualname__}", key
        defaults = asdict(cls())
        assert node == defaults, key
        built = instantiate(model[key], _convert_="all")
        assert type(built) is cls and all(is_dataclass(v) for k, v in vars(built).items()
                                          if k in ("coarse", "lpips", "superpixels")), key
    dhr = instantiate(raw_compose(["+exp=dhr", "paths.run_dir=/tmp/unused"]).model.segmentation, _convert_="all")
    assert dhr.lpips.net == "synthfaces" and dhr.coarse.resolution is None and dhr.coarse.steps == 40  # overridden / kept
    assert is_dataclass(dhr.lpips)


def test_unsupervised_stage2_differs_from_the_shipped_recipe_only_in_the_mask_labels():
    supervised, unsupervised = raw_compose(["+exp=ood_blend"]), raw_compose(["+exp=ood_blend_unsupervised"])
    assert supervised.model.patch_supervision > 0 and unsupervised.model.patch_supervision == 0
    assert unsupervised.model.train_patches.p > 0  # the unlabelled OOD content stays in the training images
    a, b = (OmegaConf.to_container(c, resolve=False) for c in (supervised, unsupervised))
    for cfg in (a, b):
        cfg.pop("hydra"), cfg.pop("task_name"), cfg["model"].pop("patch_supervision")
    assert a == b


def test_benchmark_unsupervised_row_uses_its_own_stage2_file():
    from experiments.benchmark import PSEUDO_METHODS, UNSUPERVISED_STAGE2, compose as benchmark_compose

    method, own = PSEUDO_METHODS[UNSUPERVISED_STAGE2]
    cfg = benchmark_compose(["+exp=dhr", f"model.method={method}", *own])
    assert cfg.model.method == "ood_blend"
    assert cfg.model.align_mask_checkpoint == str(CONFIG_DIR.parents[1] / "experiments" / "weights" / "synthfaces"
                                                  / "align_mask_unsupervised.pt")
