"""DDP from the command line: `python experiments/run.py ... trainer=ddp_cpu` (2 CPU processes, gloo; Lightning's
launcher re-runs run.py for rank 1), and a rank that dies.

* Stage 3 evaluation under DDP equals one process: the same per-image rows in metrics/test.csv (dataset order,
  each image once although the sampler pads the odd test set) and the same logged means.
* Stage 3 `mode=invert` under DDP: each image inverted by one rank, every folder once, a complete manifest.
* A process that dies (test-only callback tests/helpers/ddp_crash.py kills it at a given step): the run ends
  within seconds with a message naming the rank, the checkpoint / finished folders that are kept, and the exact
  command that continues; that command finishes the run.
Pure helpers (row merging, the failure message) are tested without processes.
"""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from experiments.utils.distributed import (
    RankFailure,
    checkpoint_steps,
    continue_command,
    describe_exit,
    failure_message,
    is_connection_error,
)
from lightning_modules.metrics import MetricTable, loader_size, merge_rank_rows
from tests.conftest import ROOT
from tests.helpers.distributed_runs import tiny_e4e_overrides, tiny_stage1_inputs
from tests.helpers.predict_names import read_predict_names
from tests.test_stage3 import files  # noqa: F401  (the module fixture of tiny stage-1 / stage-2 hand-offs)

pytestmark = pytest.mark.usefixtures("single_thread")
N_EVAL = 5  # odd: 2 processes get 3 + 2 test images, the sampler pads rank 1 with a copy of the first one


# ----------------------------------------------------------------------------- helpers
def run_py(*overrides, timeout=420):
    """`python experiments/run.py <overrides>` from the repository root; returns (CompletedProcess, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "experiments/run.py", *overrides], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - start


def run_continue_command(stderr: str, timeout=420):
    """Runs the command the failure message printed, exactly (only `python` becomes this interpreter)."""
    lines = stderr.splitlines()
    command = lines[lines.index("Continue with:") + 1].strip()
    args = shlex.split(command)
    assert args[:2] == ["python", "experiments/run.py"], command
    return run_py(*args[2:], timeout=timeout)


def stage3_overrides(files, tmp_path, method):  # noqa: F811
    return ["+exp=dhr", f"data.root={tmp_path / 'sf'}", "data.n_images=24", f"data.n_eval={N_EVAL}",
            "data.render_size=64", "data.batch_size=2", "data.num_workers=0", "logger=csv",
            "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", f"model.method={method}",
            f"model.encoder_checkpoint={files['encoder']}", f"model.align_mask_checkpoint={files['align']}",
            f"model.segmentation.parser={files['parser']}", "model.segmentation.coarse.steps=2",
            "model.segmentation.superpixels.n_segments=20", "model.refine.weight_steps=2",
            "model.refine.feature_steps=2", "model.pti.steps=3", "model.feature_only.steps=2",
            f"model.edit.direction={files['direction']}", f"model.edit.classifier={files['classifier']}",
            f"model.edits.0.path={files['direction']}"]


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def logged_test_means(run_dir):
    """The `test/*` values the CSV logger received (one row: trainer.test logs once)."""
    rows = [r for r in read_rows(run_dir / "csv" / "version_0" / "metrics.csv") if r.get("test/psnr")]
    assert len(rows) == 1, rows
    return {k: float(v) for k, v in rows[0].items() if k.startswith("test/") and v != ""}


def assert_same_numbers(a: dict, b: dict, skip=("seconds", "test/seconds")):
    """Equal keys; equal values to 1e-5 except wall-clock timings; NaN equals NaN."""
    assert set(a) == set(b)
    for key in a:
        if key in skip or key == "name":
            continue
        x, y = float(a[key]), float(b[key])
        assert (x != x and y != y) or x == pytest.approx(y, abs=1e-5, rel=1e-5), (key, x, y)


def tiny_e4e(tmp_path, max_steps):
    """A 16 px generator file and 9 images (3 held out: the test set, odd) for 2-process stage-1 training runs."""
    images, generator = tiny_stage1_inputs(tmp_path, n_images=9)
    return tiny_e4e_overrides(images, generator, max_steps=max_steps, held_out=3) + ["trainer=ddp_cpu"]


def crash(rank=1, step=3, how="kill", stage="fit", marker=None):
    """Overrides adding tests.helpers.ddp_crash.CrashRank."""
    out = ["+callbacks.crash._target_=tests.helpers.ddp_crash.CrashRank", f"+callbacks.crash.rank={rank}",
           f"+callbacks.crash.step={step}", f"+callbacks.crash.how={how}", f"+callbacks.crash.stage={stage}"]
    return out + ([f"+callbacks.crash.marker={marker}"] if marker else [])


# ----------------------------------------------------------------------------- pure helpers
def sampler_shards(n, world, limit=None):
    """What Lightning's test DistributedSampler gives each rank (no shuffle, padded), as one row per item."""
    from torch.utils.data import DistributedSampler

    shards = []
    for rank in range(world):
        indices = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))[:limit]
        shards.append([{"name": f"img{i}", "psnr": float(i)} for i in indices])
    return shards


@pytest.mark.parametrize("n, world", [(1, 2), (5, 2), (6, 2), (7, 3), (2, 3)])
def test_merged_rows_are_in_dataset_order_once_without_the_padding(n, world):
    expected = [f"img{i}" for i in range(n)]
    assert [r["name"] for r in merge_rank_rows(sampler_shards(n, world), num_items=n)] == expected
    assert [r["name"] for r in merge_rank_rows(sampler_shards(n, world))] == expected  # size unknown: by name
    # limit_test_batches cuts every rank's share: the merge is still the dataset's first items
    cut = merge_rank_rows(sampler_shards(7, 2, limit=2), num_items=7)
    assert [r["name"] for r in cut] == ["img0", "img1", "img2", "img3"]


def test_gathered_without_a_process_group_is_a_copy_and_loader_size_reads_the_dataset():
    table = MetricTable([{"name": "a", "psnr": 1.0}, {"name": "a", "psnr": 2.0}])
    copy = table.gathered(num_items=1)
    assert copy.rows == table.rows and copy is not table  # one process: nothing is dropped
    loader = torch.utils.data.DataLoader(list(range(7)), batch_size=2)
    assert loader_size(loader) == 7 and loader_size([loader]) == 7
    assert loader_size([loader, loader]) is None and loader_size(None) is None


def test_failure_message_names_rank_kept_checkpoint_and_the_continue_command(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"global_step": 4, "state_dict": {}}, run / "checkpoints" / "last.ckpt")
    overrides = ["+exp=e4e", "model.encoder.units=[1,1,1,1]", f"paths.run_dir={tmp_path / 'old'}", "resume=false",
                 "ckpt_path=/x.ckpt", "trainer=ddp_cpu"]
    text = failure_message(RankFailure(1, 4242, -signal.SIGKILL), run, overrides, "train")
    lines = text.splitlines()
    assert lines[0].startswith("Error: DDP rank 1 (pid 4242) was killed by SIGKILL")
    assert f"Kept: {run / 'checkpoints' / 'last.ckpt'} (step 4)" in text
    assert lines[-2] == "Continue with:"
    assert shlex.split(lines[-1]) == ["python", "experiments/run.py", "+exp=e4e", "model.encoder.units=[1,1,1,1]",
                                      "trainer=ddp_cpu", "resume=true", f"paths.run_dir={run}"]
    assert checkpoint_steps(run) == [(run / "checkpoints" / "last.ckpt", 4)]
    # nothing saved yet / an inversion run / an unknown peer
    empty = failure_message(RankFailure(0, 7, None), tmp_path / "fresh", ["+exp=e4e"], "train", rank=1)
    assert "DDP rank 0 (pid 7) is gone" in empty and "reported by rank 1" in empty
    assert "No checkpoint had been saved" in empty
    inv = tmp_path / "inv"
    for name in ("a", "sub/b"):
        (inv / name).mkdir(parents=True)
        (inv / name / "record.json").write_text("{}")
    text = failure_message(None, tmp_path / "r", ["+exp=dhr", "mode=invert"], "invert", inversion_dir=inv,
                           error=RuntimeError("[gloo] Connection reset by peer"))
    assert "lost the connection" in text and "Connection reset by peer" in text
    assert f"Kept: 2 finished image folder(s) under {inv}" in text
    expected = f"python run.py 'a=b c' resume=true paths.run_dir={tmp_path}"
    assert continue_command(["a=b c"], tmp_path, "run.py") == expected


def test_exit_descriptions_and_connection_errors():
    assert describe_exit(3) == "exited with status 3"
    assert "SIGKILL" in describe_exit(-9) and "its own error is printed above" in describe_exit(1)
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    assert is_connection_error(gloo)
    try:
        try:
            raise gloo
        except RuntimeError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert is_connection_error(outer)
    assert not is_connection_error(RuntimeError("CUDA out of memory")) and not is_connection_error(ValueError("x"))


# ----------------------------------------------------------------------------- stage 3 under DDP
@pytest.mark.parametrize("method", ["e4e", pytest.param("pti", marks=pytest.mark.slow)])
def test_stage3_evaluate_under_ddp_equals_one_process(files, compose_cfg, tmp_path, monkeypatch, method):  # noqa: F811
    """One process (run.py's train() in this process) vs `trainer=ddp_cpu` from the command line, 5 images."""
    from experiments.run import train

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    overrides = stage3_overrides(files, tmp_path, method)
    single = tmp_path / "single"
    train(compose_cfg(overrides + ["trainer=cpu"], run_dir=single))
    ddp = tmp_path / "ddp"
    result, seconds = run_py(*overrides, "trainer=ddp_cpu", f"paths.run_dir={ddp}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting with 2 processes" in result.stdout + result.stderr  # really two processes

    one, two = read_rows(single / "metrics" / "test.csv"), read_rows(ddp / "metrics" / "test.csv")
    assert len(one) == N_EVAL and [r["name"] for r in two] == [r["name"] for r in one]  # order, each image once
    for a, b in zip(one, two):
        assert_same_numbers(a, b)
    assert_same_numbers(logged_test_means(single), logged_test_means(ddp))
    mean_psnr = sum(float(r["psnr"]) for r in two) / N_EVAL
    assert logged_test_means(ddp)["test/psnr"] == pytest.approx(mean_psnr, abs=1e-5)  # not a mean of rank means
    assert f"Test ({N_EVAL} images)" in result.stdout
    print(f"ddp_cpu stage-3 {method} run: {seconds:.1f} s")


@pytest.mark.slow
def test_stage3_invert_under_ddp_writes_every_image_once(files, make_images, tmp_path):  # noqa: F811
    names = ["a", "b", "c", "sub/d", "sub/e"]
    make_images(tmp_path / "photos", [f"{n}.png" for n in names], size=(64, 64))
    run, probe = tmp_path / "run", tmp_path / "probe"
    result, _ = run_py(*stage3_overrides(files, tmp_path, "e4e"), "trainer=ddp_cpu", "mode=invert",
                       f"input={tmp_path / 'photos'}", f"paths.run_dir={run}",
                       "+callbacks.names._target_=tests.helpers.predict_names.PredictNames",
                       f"+callbacks.names.out_dir={probe}")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = read_predict_names(probe)
    assert set(seen) == {0, 1} and not set(seen[0]) & set(seen[1])  # each image went to one rank
    assert sorted(seen[0] + seen[1]) == names
    manifest = json.loads((run / "inversions" / "manifest.json").read_text())
    assert manifest["images"] == manifest["ok"] == 5 and [r["name"] for r in manifest["records"]] == names
    assert sorted(str(p.parent.relative_to(run / "inversions")) for p in run.rglob("record.json")) == names
    assert "Inverted 5 image(s)" in result.stdout


@pytest.mark.slow
def test_stage2_evaluate_under_ddp_equals_one_process(files, compose_cfg, tmp_path, monkeypatch):  # noqa: F811
    """A tiny +exp=ood_blend run, then its checkpoint re-tested (mode=evaluate resume=true) by one process and by
    `trainer=ddp_cpu` in copies of the run directory: byte-identical metrics/test.csv."""
    import shutil

    from experiments.run import train

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    overrides = ["+exp=ood_blend", f"data.root={tmp_path / 'sf'}", "data.n_images=24", f"data.n_eval={N_EVAL}",
                 "data.render_size=64", "data.batch_size=2", "data.num_workers=0",
                 f"model.encoder_checkpoint={files['encoder']}", f"model.edit.classifier={files['classifier']}",
                 f"model.edit.direction={files['direction']}", "model.level_milestones=[0,1]", "logger=csv",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                 "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
    trained = tmp_path / "trained"
    train(compose_cfg(overrides + ["trainer=cpu", "evaluate=false"], run_dir=trained))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    shutil.copytree(trained, single)
    shutil.copytree(trained, ddp)
    train(compose_cfg(overrides + ["trainer=cpu", "mode=evaluate", "resume=true"], run_dir=single))
    result, _ = run_py(*overrides, "trainer=ddp_cpu", "mode=evaluate", "resume=true", f"paths.run_dir={ddp}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = (single / "metrics" / "test.csv").read_text()
    assert len(text.splitlines()) == N_EVAL + 1 and (ddp / "metrics" / "test.csv").read_text() == text
    assert (ddp / "metrics" / "summary.md").read_text() == (single / "metrics" / "summary.md").read_text()


# ----------------------------------------------------------------------------- a rank that dies
@pytest.mark.slow
def test_rank_killed_during_training_reports_and_the_printed_command_resumes(tmp_path):
    """Rank 1 is SIGKILLed at step 5 (checkpoints every 2 steps): a clear error within seconds, step 4 kept, and the
    printed command finishes the run from step 4."""
    from networks.encoder_checkpoints import load_e4e_checkpoint

    run, marker = tmp_path / "run", tmp_path / "crashed.json"
    base = tiny_e4e(tmp_path, 6) + [f"paths.run_dir={run}"]
    result, seconds = run_py(*base, *crash(rank=1, step=5, marker=marker))
    died = json.loads(marker.read_text())
    assert result.returncode == 1 and died["rank"] == 1 and died["step"] == 5
    err = result.stderr
    assert f"Error: DDP rank 1 (pid {died['pid']}) was killed by SIGKILL" in err, err[-3000:]
    assert f"Kept: {run / 'checkpoints' / 'last.ckpt'} (step 4)" in err
    assert "Traceback" not in err and seconds < 150
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 4
    assert not (run / "encoder.pt").exists()

    again, _ = run_continue_command(err)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Restoring states from the checkpoint path at" in again.stdout + again.stderr
    assert load_e4e_checkpoint(run / "encoder.pt").opts["global_step"] == 6
    assert len(read_rows(run / "metrics" / "test.csv")) == 3  # the 3 held-out images, each once


@pytest.mark.slow
def test_rank0_killed_is_reported_by_rank1(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "crashed.json"
    result, seconds = run_py(*tiny_e4e(tmp_path, 6), f"paths.run_dir={run}",
                             *crash(rank=0, step=3, marker=marker))
    died = json.loads(marker.read_text())
    assert result.returncode == -signal.SIGKILL  # what the shell sees: the process it started was killed
    assert f"Error: DDP rank 0 (pid {died['pid']}) is gone; the run stopped (reported by rank 1)." in result.stderr
    assert f"Kept: {run / 'checkpoints' / 'last.ckpt'} (step 2)" in result.stderr
    assert f"resume=true paths.run_dir={run}" in result.stderr and seconds < 150


@pytest.mark.slow
def test_rank_killed_during_invert_keeps_finished_and_rerun_completes(files, make_images, tmp_path):  # noqa: F811
    names = ["a", "b", "c", "sub/d", "sub/e"]
    make_images(tmp_path / "photos", [f"{n}.png" for n in names], size=(64, 64))
    run, probe, marker = tmp_path / "run", tmp_path / "probe", tmp_path / "crashed.json"
    result, _ = run_py(*stage3_overrides(files, tmp_path, "e4e"), "trainer=ddp_cpu", "mode=invert",
                       "data.batch_size=1", f"input={tmp_path / 'photos'}", f"paths.run_dir={run}",
                       "+callbacks.names._target_=tests.helpers.predict_names.PredictNames",
                       f"+callbacks.names.out_dir={probe}", *crash(rank=1, step=1, stage="predict", marker=marker))
    assert result.returncode == 1, result.stderr[-3000:]
    first = read_predict_names(probe)
    lost = first[1][1]  # rank 1 died when it started its second image
    done = {str(p.parent.relative_to(run / "inversions")): p.stat().st_mtime_ns for p in run.rglob("record.json")}
    assert lost not in done and first[1][0] in done and set(done) <= set(names)
    assert f"Kept: {len(done)} finished image folder(s) under {run / 'inversions'}" in result.stderr

    again, _ = run_continue_command(result.stderr)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {str(p.parent.relative_to(run / "inversions")): p.stat().st_mtime_ns for p in run.rglob("record.json")}
    assert sorted(after) == names and all(after[n] == t for n, t in done.items())  # finished folders not rewritten
    manifest = json.loads((run / "inversions" / "manifest.json").read_text())
    assert manifest["ok"] == 5 and [r["name"] for r in manifest["records"]] == names


@pytest.mark.slow
def test_rank_dying_before_the_process_group_exists_ends_within_seconds(tmp_path):
    """Rank 1 exits while run.py builds its callbacks: rank 0 waits in the rendezvous (30 min by default) inside
    one C call, so the watcher itself reports after its grace period and ends the run."""
    from experiments.utils.distributed import GRACE_S

    run = tmp_path / "run"
    result, seconds = run_py(*tiny_e4e(tmp_path, 4), f"paths.run_dir={run}",
                             *crash(rank=1, stage="start", how="exit"))
    assert result.returncode == 1
    assert "Error: DDP rank 1 (pid" in result.stderr and "exited with status 3" in result.stderr, result.stderr[-3000:]
    assert f"No checkpoint had been saved in {run} yet" in result.stderr
    assert f"resume=true paths.run_dir={run}" in result.stderr and seconds < 60 + GRACE_S
