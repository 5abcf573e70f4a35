"""experiments/run.py: run-dir policy, command-line checks, user-facing errors, and the train() flow.

The flow tests swap the stage module for `StandInStage` (a one-layer LightningModule with the stage
contract: `export_handoff(run_dir) -> Path`), so they run in seconds and do not depend on stage 0.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from experiments.run import train
from experiments.utils import (
    RunDirError,
    UserError,
    apply_run_dir_plan,
    describe_user_error,
    plan_run_dir,
    previous_wandb_id,
    report_user_errors,
)
from experiments.utils.cli import check_command_line
from tests.conftest import CONFIG_DIR, ROOT


# ----------------------------------------------------------------------------- run-dir policy
def make_previous_run(run_dir: Path, last=True, handoff=True):
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / ("last.ckpt" if last else "step_0000010.ckpt")).write_bytes(b"ckpt")
    if handoff:
        (run_dir / "generator.pt").write_bytes(b"g")
    (run_dir / "config.yaml").write_text("a: 1\n")
    (run_dir / "wandb").mkdir()


def test_fresh_or_hydra_only_dir_needs_no_flag(tmp_path):
    assert plan_run_dir(tmp_path / "new", resume=False, overwrite=False).ckpt_path is None
    (tmp_path / "run.log").write_text("log")
    (tmp_path / "checkpoints").mkdir()  # empty: nothing to lose
    plan = plan_run_dir(tmp_path, resume=False, overwrite=False)
    assert plan.previous == [] and plan.remove == [] and plan.ckpt_path is None


def test_earlier_outputs_without_flag_refuse_and_name_both_flags(tmp_path):
    make_previous_run(tmp_path)
    with pytest.raises(RunDirError, match=r"checkpoints/, generator\.pt.*resume=true.*overwrite=true") as err:
        plan_run_dir(tmp_path, resume=False, overwrite=False)
    assert str(tmp_path) in str(err.value)
    assert (tmp_path / "generator.pt").exists()


def test_resume_uses_last_ckpt(tmp_path):
    make_previous_run(tmp_path)
    plan = plan_run_dir(tmp_path, resume=True, overwrite=False)
    assert plan.ckpt_path == tmp_path / "checkpoints" / "last.ckpt" and plan.remove == []


def test_resume_without_last_ckpt_points_to_overwrite_and_new_dir_starts_fresh(tmp_path):
    make_previous_run(tmp_path, last=False)
    with pytest.raises(RunDirError, match=r"last\.ckpt does not exist.*overwrite=true"):
        plan_run_dir(tmp_path, resume=True, overwrite=False)
    with pytest.raises(RunDirError, match=r"Pass overwrite=true") as err:  # no last.ckpt: resume is not offered
        plan_run_dir(tmp_path, resume=False, overwrite=False)
    assert "resume=true" not in str(err.value)
    assert plan_run_dir(tmp_path / "requeued", resume=True, overwrite=False).ckpt_path is None


def test_overwrite_deletes_checkpoints_and_handoffs_only(tmp_path):
    make_previous_run(tmp_path)
    plan = plan_run_dir(tmp_path, resume=False, overwrite=True)
    assert set(plan.remove) == {tmp_path / "checkpoints", tmp_path / "generator.pt"}
    apply_run_dir_plan(plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "wandb"]
    with pytest.raises(RunDirError, match="contradict"):
        plan_run_dir(tmp_path, resume=True, overwrite=True)


def test_previous_wandb_id_is_the_newest_run(tmp_path):
    assert previous_wandb_id(tmp_path) is None
    for name in ("offline-run-20240101_000000-old1", "run-20240102_000000-new2", "latest-run", "debug.log"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert previous_wandb_id(tmp_path) == "new2"


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], r"No experiment given: add \+exp=<name>\. Available experiments: .*stylegan"),
        (["seed=1"], r"No experiment given"),
        (["exp=stylegan"], r"needs a leading '\+'.*\+exp=stylegan.*Available experiments: .*stylegan"),
        (["+exp=nope"], r"Unknown experiment 'nope'.*Available experiments: .*stylegan"),
        (["+exp=stylegan,nope", "-m"], r"Unknown experiment 'nope'"),
        (["+exp=stylegan", "data.rooot=/x"], r"Unknown config key 'data\.rooot'.*Did you mean data\.root\?"),
        (["+exp=stylegan", "trainer.nope.x=1"], r"Unknown config key 'trainer\.nope'.*under 'trainer':.*max_steps"),
        (["+exp=stylegan", "data=nope"], r"Could not find 'data/nope'.*image_folder"),
        (["+exp=stylegan", "data.root"], r"Could not parse an override"),
    ],
)
def test_bad_command_lines_get_one_clear_message(argv, expected):
    message = check_command_line(argv, CONFIG_DIR)
    assert message is not None and re.search(expected, message, re.S), message
    assert "Config search path" not in message


@pytest.mark.parametrize(
    "argv",
    [["+exp=stylegan"], ["--help"], ["+exp=nope", "--help"], ["-m", "+exp=stylegan", "seed=1,2"],
     ["+exp=stylegan", "+new.key=1"], ["--cfg", "job"]],
)
def test_good_or_help_command_lines_pass(argv):
    assert check_command_line(argv, CONFIG_DIR) is None


def test_user_errors_print_one_message_and_exit_1(capsys):
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue) as err:
        OmegaConf.create({"data": {"root": "???"}}).data.root
    assert describe_user_error(err.value).startswith("Config key 'data.root' has no value")
    assert describe_user_error(KeyError("bug")) is None  # bugs keep their traceback
    with pytest.raises(SystemExit) as exit_info, report_user_errors():
        raise UserError("something to fix")
    assert exit_info.value.code == 1 and capsys.readouterr().err == "Error: something to fix\n"


# ----------------------------------------------------------------------------- train() flow
class StandInStage(pl.LightningModule):
    """One linear layer on the image means; counts training steps; hands off `run_dir/standin.pt`."""

    steps_run = 0

    def __init__(self, **config):
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        StandInStage.steps_run += 1
        return self.layer(batch["image"].mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def export_handoff(self, run_dir) -> Path:
        path = Path(run_dir) / "standin.pt"
        torch.save({"global_step": self.global_step, "state_dict": self.state_dict()}, path)
        return path


@pytest.fixture
def run_cfg(compose_cfg, make_images, tmp_path, monkeypatch):
    """`cfg(*extra_overrides)`: +exp=stylegan on 6 tiny images with StandInStage, CSV logger, CPU, 2 steps."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))  # train() sets it; restore afterwards
    make_images(tmp_path / "images", [f"{i}.png" for i in range(6)], size=(8, 8))
    base = ["+exp=stylegan", "data=image_folder", f"data.root={tmp_path / 'images'}", "generator.size=8", "data.batch_size=2",
            "data.num_workers=0", "model._target_=tests.test_run.StandInStage", "callbacks=default",
            "callbacks.model_checkpoint.every_n_train_steps=1", "logger=csv", "trainer=cpu", "trainer.max_steps=2",
            "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]

    def _cfg(*extra):
        StandInStage.steps_run = 0
        return compose_cfg(base + list(extra))

    return _cfg


def test_train_writes_configs_checkpoints_and_handoff(run_cfg, tmp_path):
    run = tmp_path / "run"
    path = train(run_cfg())
    assert path == run / "standin.pt" and torch.load(path, weights_only=True)["global_step"] == 2
    assert StandInStage.steps_run == 2
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.paths.run_dir == str(run) and saved.data.root == str(tmp_path / "images")
    assert saved.callbacks.model_checkpoint.dirpath == str(run / "checkpoints")  # resolved
    assert "+exp=stylegan" in OmegaConf.load(run / ".hydra" / "overrides.yaml")
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "csv" / "version_0" / "hparams.yaml").is_file()


def test_train_refuses_then_resumes_then_overwrites(run_cfg, tmp_path):
    run = tmp_path / "run"
    train(run_cfg())
    with pytest.raises(RunDirError, match=r"resume=true.*overwrite=true"):
        train(run_cfg())

    train(run_cfg("resume=true", "trainer.max_steps=3"))
    assert StandInStage.steps_run == 1  # continued at step 2
    assert torch.load(run / "standin.pt", weights_only=True)["global_step"] == 3
    assert (run / "checkpoints" / "step_0000003.ckpt").is_file()

    train(run_cfg("overwrite=true"))
    assert StandInStage.steps_run == 2  # started over
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_0000002.ckpt"]


def test_train_without_exp_or_with_missing_folder_fails_clearly(run_cfg, compose_cfg, tmp_path):
    with pytest.raises(UserError, match=r"No experiment given: add \+exp=<name>.*stylegan"):
        train(compose_cfg([]))
    with pytest.raises(Exception) as err:
        train(run_cfg(f"data.root={tmp_path / 'nowhere'}"))
    message = describe_user_error(err.value)
    assert "nowhere does not exist" in message and "data.root" in message and "`data`" in message
    assert not (tmp_path / "run" / "config.yaml").exists()  # failed before touching the run dir


# ----------------------------------------------------------------------------- the script itself
def run_script(*args, cwd):
    env = dict(os.environ, WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_help_lists_experiments_groups_and_main_keys(tmp_path):
    result = run_script("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for text in ("+exp=<experiment>", "trainer: cpu, ddp, ddp_cpu", "resume=true", "overwrite=true",
                 "data.root=PATH", "evaluate=true"):
        assert text in result.stdout
    exp_line = next(line for line in result.stdout.splitlines() if line.startswith("exp: "))
    assert {"stylegan", "e4e", "psp", "ood_blend", "dhr", "pti", "feature_only"} <= set(exp_line[5:].split(", "))


@pytest.mark.parametrize("args, expected", [(["+exp=nope"], "Available experiments: dhr, e4e, feature_only, ood_blend, ood_blend_official, ood_blend_unsupervised, psp, pti, stylegan"),
                                            (["exp=stylegan"], "Write +exp=stylegan")])
def test_script_rejects_bad_exp_without_traceback(tmp_path, args, expected):
    result = run_script(*args, cwd=tmp_path)
    assert result.returncode == 1 and expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_script_names_missing_image_folder_and_config_key(tmp_path):
    missing = tmp_path / "no_such_images"
    result = run_script("+exp=stylegan", "data=image_folder", f"data.root={missing}", f"paths.run_dir={tmp_path / 'run'}", "logger=none",
                        cwd=tmp_path)
    assert result.returncode == 1
    assert f"Image folder {missing} does not exist" in result.stderr and "data.root" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert (tmp_path / "run" / "run.log").is_file()  # Hydra's own output dir follows paths.run_dir
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written before the error


def test_invert_with_fewer_images_than_processes_is_refused(compose_cfg, make_images, tmp_path):
    from experiments.run import train

    make_images(tmp_path / "one", ["a.png"], size=(64, 64))
    with pytest.raises(UserError, match=r"holds 1 image\(s\) for 2 processes"):
        train(compose_cfg(["+exp=dhr", "mode=invert", f"input={tmp_path / 'one'}", "trainer=ddp_cpu", "logger=csv"]))
