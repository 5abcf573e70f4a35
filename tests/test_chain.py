"""The `+exp=dhr` chain: stage hand-offs configured / reused / trained, resume after a crash, the run-dir lock."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

from experiments.utils.chain import ChainError, needed_stages
from experiments.utils.run_lock import LOCK_NAME, RunDirLockedError, acquire_run_lock, release_run_lock
from networks.align_mask import AlignMaskNet, default_levels, load_align_mask, save_align_mask
from networks.checkpoints import CheckpointError, export_generator, weights_fingerprint
from networks.encoder_checkpoints import load_e4e_checkpoint
from networks.stylegan2 import Generator
from tests.helpers.tiny_stage1 import export_tiny_stage1

pytestmark = pytest.mark.usefixtures("single_thread")
G_CFG = dict(size=64, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny generator file and the folder its SynthFaces data is rendered into (once per module)."""
    root = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    g = Generator(**G_CFG)
    path = export_generator(root / "generator.pt", g, g.mean_latent(64, seed=0), meta={"produced_by": "test"})
    return {"generator": path, "data": root / "sf"}


def chain_overrides(shared, *extra):
    """`+exp=dhr` on tiny SynthFaces: stage 0 configured, stages 1 and 2 trained (2 / 3 steps), stage 3 ood_blend."""
    quick = "'trainer.limit_val_batches=1','callbacks.model_checkpoint.every_n_train_steps=1','evaluate=false'"
    return ["+exp=dhr", f"data.root={shared['data']}", "data.n_images=24", "data.n_eval=4", "data.render_size=64",
            "data.batch_size=4", "data.num_workers=0", "logger=csv", "trainer=cpu",
            "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "trainer.limit_test_batches=1",
            f"chain.generator.checkpoint={shared['generator']}", "chain.encoder.checkpoint=null",
            "chain.align_mask.checkpoint=null",
            f"chain.encoder.overrides=[{quick},'trainer.max_steps=2','trainer.val_check_interval=2',"
            "'model.encoder.units=[1,1,1,1]']",
            f"chain.align_mask.overrides=[{quick},'trainer.max_steps=3','trainer.val_check_interval=3',"
            "'model.level_milestones=[0,1]','model.edit.direction=null'" + "".join(f",'{e}'" for e in extra) + "]",
            "model.method=ood_blend", "model.edit.direction=null", "model.edits=[]"]


def test_chain_trains_each_stage_resumes_after_a_crash_and_reuses_finished_stages(shared, compose_cfg, tmp_path,
                                                                                   monkeypatch, capsys, caplog):
    from experiments.run import train

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    run = tmp_path / "run"
    crash = ["+callbacks.crash._target_=tests.helpers.ddp_crash.CrashRank", "+callbacks.crash.rank=0",
             "+callbacks.crash.step=2", "+callbacks.crash.how=raise"]
    with pytest.raises(RuntimeError, match="rank 0 fails on purpose at step 2"):
        train(compose_cfg(chain_overrides(shared, *crash)))
    encoder = run / "stage_encoder" / "encoder.pt"
    assert encoder.is_file() and not (run / "stage_align_mask" / "align_mask.pt").exists()
    last = run / "stage_align_mask" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2  # the crash came as step 3 started
    assert not (run / LOCK_NAME).exists()  # released although the run died
    stamp = encoder.stat().st_mtime_ns

    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(compose_cfg(chain_overrides(shared)))  # the same command again, without the crash
    assert encoder.stat().st_mtime_ns == stamp  # stage 1 was not retrained
    _, meta = load_align_mask(run / "stage_align_mask" / "align_mask.pt")
    assert meta["global_step"] == 3 and meta["encoder_checkpoint"] == str(encoder)
    assert f"Restoring states from the checkpoint path at {last}" in caplog.text  # continued, not restarted
    record = json.loads((run / "chain.json").read_text())["stages"]
    # a finished encoder needs no generator stage
    assert [(s["name"], s["source"]) for s in record] == [("encoder", "reused"), ("align_mask", "trained")]
    assert record[0]["producer"]["produced_by"] == "stage1 EncoderModule"
    assert record[0]["producer"]["generator_checkpoint"] == str(shared["generator"])
    assert record[1]["producer"]["produced_by"] == "stage2 AlignMaskModule"
    g = load_e4e_checkpoint(encoder).generator
    assert record[0]["producer"]["generator_sha1"] == record[1]["producer"]["generator_sha1"] == \
        weights_fingerprint(g)
    # stage 3 ran in the chain's own run directory on the trained hand-offs and printed its table
    rows = (run / "metrics" / "test.csv").read_text().splitlines()
    assert len(rows) == 5 and "iou@0.5" in rows[0]
    assert "| ood_blend |" in capsys.readouterr().out and (run / "metrics" / "summary.md").is_file()

    # a third call: every stage reused, nothing retrained
    stamp2 = (run / "stage_align_mask" / "align_mask.pt").stat().st_mtime_ns
    train(compose_cfg(chain_overrides(shared)))
    assert (run / "stage_align_mask" / "align_mask.pt").stat().st_mtime_ns == stamp2
    sources = [s["source"] for s in json.loads((run / "chain.json").read_text())["stages"]]
    assert sources == ["reused", "reused"]


def test_configured_handoffs_skip_training_and_missing_files_are_named(compose_cfg, tmp_path):
    from experiments.run import train

    with pytest.raises(ChainError, match=r"chain.generator.checkpoint=/nowhere/g.pt: no such file"):
        train(compose_cfg(["+exp=dhr", "chain.encoder.checkpoint=null", "chain.generator.checkpoint=/nowhere/g.pt"]))
    with pytest.raises(ChainError, match=r"model.encoder_checkpoint=/nowhere/e.pt: no such file.*\+exp=e4e"):
        train(compose_cfg(["+exp=dhr", "model.encoder_checkpoint=/nowhere/e.pt"]))
    assert not (tmp_path / "run" / "stage_encoder").exists()  # nothing started


def test_needed_stages_follow_only_what_must_be_trained():
    specs = {"generator": {}, "encoder": {"target": "model.encoder_checkpoint", "inputs": {"g": "generator"}},
             "align_mask": {"target": "model.align_mask_checkpoint", "inputs": {"e": "encoder"}}}
    order = list(specs)
    assert needed_stages(order, specs, {"encoder", "align_mask"}) == ["encoder", "align_mask"]
    assert needed_stages(order, specs, {"encoder"}) == ["encoder", "align_mask"]
    assert needed_stages(order, specs, set()) == ["generator", "encoder", "align_mask"]


def test_a_handoff_from_another_runs_generator_is_refused(tmp_path):
    """Same architecture, different weights: stage 3 names both files instead of blending with the wrong G."""
    from lightning_modules.stage3_module import RefineModule

    first = export_tiny_stage1(tmp_path / "a" / "encoder.pt", seed=0)
    second = export_tiny_stage1(tmp_path / "b" / "encoder.pt", seed=1)
    net = AlignMaskNet(dict(second.generator.channels), dict(second.encoder.feature_channels), default_levels(64), 64)
    align = save_align_mask(tmp_path / "b" / "align_mask.pt", net,
                            {"generator": dict(second.generator.config),
                             "generator_sha1": weights_fingerprint(second.generator)})
    with pytest.raises(CheckpointError, match=r"align_mask.pt was trained with another generator than the one "
                                              r"inside model.encoder_checkpoint=.*a/encoder.pt"):
        RefineModule(str(first.path), method="ood_blend", align_mask_checkpoint=str(align),
                     lpips=dict(allow_random_backbone=True))
    RefineModule(str(second.path), method="ood_blend", align_mask_checkpoint=str(align),
                 lpips=dict(allow_random_backbone=True))  # its own generator: accepted


def test_two_runs_cannot_write_one_directory(tmp_path, compose_cfg):
    from experiments.run import train

    run = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.mkdir()
        (run / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid,
                                                 "started": "earlier"}))
        with pytest.raises(RunDirLockedError, match=rf"in use by another run \(pid {other.pid}.*{LOCK_NAME}"):
            train(compose_cfg(["+exp=dhr", "mode=evaluate"]))
    finally:
        other.kill()
        other.wait()
    # its owner is gone now: the lock is stale and taken over
    path = acquire_run_lock(run)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirLockedError):
        acquire_run_lock(run)  # held by this (live) process
    release_run_lock(path)
    assert not path.exists()


def test_torchrun_without_a_run_dir_is_refused(compose_cfg, monkeypatch):
    from experiments.run import train
    from experiments.utils import UserError

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"Under torchrun .* pass paths.run_dir=DIR"):
        train(compose_cfg(["+exp=dhr"]))
