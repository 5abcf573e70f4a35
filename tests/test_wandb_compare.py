"""Runs that compare in W&B (issue 18), read back from offline runs: `benchmark.py --wandb` (one group, one run per
method, one table schema and summary keys, names / tags, config with hand-off provenance), run names and the
multirun group of run.py, and the W&B sweep file's command run for two parameter sets (the agent played by the test)."""
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments.utils.wandb_run import apply_wandb_identity, run_identity, run_name, run_tags
from experiments.utils.wandb_offline import config, logged_tables, read_records, run_file, summary

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = Path(__file__).resolve().parents[1]


def run_record(path):
    """The run's ``RunRecord`` (name, group, tags, job type) from its run file."""
    return next(r.run for r in read_records(path) if r.WhichOneof("record_type") == "run")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny hand-offs of one generator (stages 1 and 2), a smile direction and an attribute classifier."""
    from tests.helpers.tiny_handoffs import export_tiny_handoffs

    return export_tiny_handoffs(tmp_path_factory.mktemp("compare"), produced_by="test stage 2")


def fast(files, tmp_path):
    """Overrides of `+exp=dhr` on the tiny hand-offs and a tiny rendered SynthFaces set (4 test images)."""
    return [f"data.root={tmp_path / 'sf'}", "data.n_images=24", "data.n_eval=4", "data.render_size=64",
            "data.num_workers=0", f"model.encoder_checkpoint={files['encoder']}",
            f"model.align_mask_checkpoint={files['align']}", f"model.edit.direction={files['direction']}",
            f"model.edit.classifier={files['classifier']}", "model.edits=[]", "model.lpips.allow_random_backbone=true",
            "model.refine.weight_steps=2", "model.refine.feature_steps=2", "model.refine.feature_resolution=16",
            "model.segmentation.coarse.steps=2", "model.segmentation.superpixels.n_segments=20"]


def test_run_identity_names_experiment_method_data_generator(compose_cfg):
    cfg = compose_cfg(["+exp=dhr", "model.method=e4e"])
    identity = run_identity(cfg)
    assert identity == {"experiment": "dhr", "method": "e4e", "data": "synthfaces", "generator": "stylegan2-64px"}
    assert run_name(identity) == "dhr-e4e-synthfaces-stylegan2-64px"
    assert run_tags(identity) == ["exp:dhr", "method:e4e", "data:synthfaces", "generator:stylegan2-64px"]
    assert run_name(run_identity(compose_cfg(["+exp=e4e", "data=celebahq", "generator=ffhq256"]))) == \
        "e4e-celebahq-stylegan2-256px"  # no method outside stage 3
    cfg = compose_cfg(["+exp=dhr", "logger.wandb.name=mine", "logger.wandb.tags=[x]"])
    apply_wandb_identity(cfg, group="g")
    assert cfg.logger.wandb.name == "mine" and cfg.logger.wandb.group == "g"  # the user's name is kept
    assert list(cfg.logger.wandb.tags) == ["x", "exp:dhr", "method:dhr", "data:synthfaces", "generator:stylegan2-64px"]


def test_benchmark_wandb_logs_one_group_with_a_run_per_method(files, tmp_path, monkeypatch):
    from experiments import benchmark

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    out = tmp_path / "bench"
    benchmark.main(["--methods", "e4e,ood_blend", "--n", "2", "--batch", "2", "--out", str(out), "--wandb",
                    "--wandb-group", "cmp1", "--", *fast(files, tmp_path),
                    "callbacks.wandb_metric_table.thumbnail=16"])
    runs = {}
    for method in ("e4e", "ood_blend"):
        [wandb_dir] = list((out / "runs" / method).glob("wandb/offline-run-*"))
        runs[method] = run_file(wandb_dir)
    records = {m: run_record(p) for m, p in runs.items()}
    assert {r.run_group for r in records.values()} == {"cmp1"}
    assert {r.job_type for r in records.values()} == {"benchmark"}
    for method, record in records.items():
        assert record.display_name == f"dhr-{method}-synthfaces-stylegan2-64px"
        assert set(record.tags) >= {"exp:dhr", f"method:{method}", "data:synthfaces", "generator:stylegan2-64px"}
    # one table schema: e4e has no predicted mask, yet its table has the mask columns (empty) too
    tables = {m: logged_tables(p, "test/per_image")[0] for m, p in runs.items()}
    assert tables["e4e"]["columns"] == tables["ood_blend"]["columns"]
    assert tables["e4e"]["columns"][:3] == ["name", "psnr", "ssim"] and "input" in tables["e4e"]["columns"]
    iou = tables["e4e"]["columns"].index("iou@0.5")
    assert all(row[iou] is None for row in tables["e4e"]["data"])
    assert all(row[iou] is not None for row in tables["ood_blend"]["data"])
    assert "mask" in tables["ood_blend"]["columns"] and len(tables["ood_blend"]["data"]) == 2
    sums = {m: summary(p) for m, p in runs.items()}
    for key in ("test/psnr", "test_mean/psnr", "test_mean/ssim", "test_mean/edit_success"):
        assert all(key in s for s in sums.values()), key
    for method, path in runs.items():
        cfg = config(path)
        assert cfg["model"]["method"] == method and cfg["benchmark_method"] == method
        provenance = cfg["handoff_provenance"]
        assert provenance["model.encoder_checkpoint"]["path"] == files["encoder"]
        assert provenance["model.align_mask_checkpoint"]["producer"]["produced_by"] == "test stage 2"
        assert provenance["model.encoder_checkpoint"]["source"] == "configured"
    assert (out / "benchmark.md").is_file()


def test_run_py_names_the_run_and_logs_provenance(files, compose_cfg, tmp_path, monkeypatch):
    from experiments.run import finish_wandb, train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    overrides = ["+exp=dhr", "trainer=cpu", "trainer.enable_progress_bar=false", "data.batch_size=2",
                 "model.method=e4e", "chain.align_mask.enabled=false", "callbacks.wandb_metric_table.pictures=0",
                 *fast(files, tmp_path)]
    try:
        train(compose_cfg(overrides))
    finally:
        finish_wandb()
    [wandb_dir] = list((tmp_path / "run").glob("wandb/offline-run-*"))
    path = run_file(wandb_dir)
    record = run_record(path)
    assert record.display_name == "dhr-e4e-synthfaces-stylegan2-64px"
    assert "method:e4e" in record.tags
    provenance = config(path)["handoff_provenance"]
    assert provenance["model.encoder_checkpoint"]["source"] == "configured"  # the chain's record (chain.json)
    assert provenance["model.encoder_checkpoint"]["exp"] == "e4e"
    assert provenance["model.align_mask_checkpoint"]["producer"]["produced_by"] == "test stage 2"


def sweep_commands(sweep, extra, count=2):
    """The W&B agent's part: the sweep file's command for the first ``count`` parameter sets of its grid."""
    names = list(sweep["parameters"])
    grid = list(itertools.product(*(sweep["parameters"][n]["values"] for n in names)))[:count]
    commands = []
    for values in grid:
        args = [f"{n}={v}" for n, v in zip(names, values)]
        command = []
        for part in sweep["command"]:
            if part == "${env}":
                continue  # /usr/bin/env: the environment is passed below
            elif part == "python":
                command.append(sys.executable)
            elif part == "${program}":
                command.append(str(ROOT / sweep["program"]))
            elif part == "${args_no_hyphens}":
                command += args
            else:
                command.append(part)
        commands.append((dict(zip(names, values)), command + extra))
    return commands


def _dotted(cfg, name):
    value = cfg
    for part in name.split("."):
        value = value[part]
    return value


def test_sweep_command_runs_log_the_metric_and_the_parameters(files, tmp_path):
    """Run the sweep's command for two of its parameter sets (no W&B server) and read both offline runs back: the
    metric the sweep optimises is in each run's summary, and each parameter is in the run config under its name
    (W&B shows nested config keys dotted: model.refine.feature_steps)."""
    sweep = yaml.safe_load((ROOT / "experiments" / "sweeps" / "dhr.yaml").read_text())
    metric = sweep["metric"]["name"]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
               OMP_NUM_THREADS="1")
    env.pop("WANDB_DIR", None)
    for k, (params, command) in enumerate(sweep_commands(sweep, [])):
        run_dir = tmp_path / f"sweep{k}"
        extra = [f"paths.run_dir={run_dir}", "trainer=cpu", "trainer.enable_progress_bar=false", "data.batch_size=1",
                 "trainer.limit_test_batches=1", "callbacks.edit_grid.n_images=1", *fast(files, tmp_path)]
        # the parameters win over the fast settings: drop a fast override of a swept key
        extra = [o for o in extra if o.split("=")[0] not in params]
        done = subprocess.run(command + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        [wandb_dir] = list(run_dir.glob("wandb/offline-run-*"))
        path = run_file(wandb_dir)
        assert metric in summary(path), f"the sweep optimises {metric!r}, which the run never logs"
        cfg = config(path)
        for name, value in params.items():
            assert _dotted(cfg, name) == value, name


def test_hydra_multirun_over_methods_is_one_wandb_group(files, tmp_path):
    """`run.py -m +exp=dhr model.method=e4e,ood_blend`: one W&B run per job, all in the group named after the sweep
    directory, each named by its method, with the same per-image table columns."""
    sweep = tmp_path / "multirun_methods"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
               OMP_NUM_THREADS="1")
    env.pop("WANDB_DIR", None)
    command = [sys.executable, str(ROOT / "experiments" / "run.py"), "-m", "+exp=dhr", "model.method=e4e,ood_blend",
               f"hydra.sweep.dir={sweep}", "trainer=cpu", "trainer.enable_progress_bar=false", "data.batch_size=2",
               "chain.align_mask.enabled=false", "callbacks.wandb_metric_table.thumbnail=16",
               *fast(files, tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    paths = {}
    for job, method in enumerate(("e4e", "ood_blend")):
        [wandb_dir] = list((sweep / str(job)).glob("wandb/offline-run-*"))
        paths[method] = run_file(wandb_dir)
    records = {m: run_record(p) for m, p in paths.items()}
    assert {r.run_group for r in records.values()} == {"multirun_methods"}
    assert [r.display_name for r in records.values()] == ["dhr-e4e-synthfaces-stylegan2-64px",
                                                           "dhr-ood_blend-synthfaces-stylegan2-64px"]
    columns = [logged_tables(p, "test/per_image")[0]["columns"] for p in paths.values()]
    assert columns[0] == columns[1] and {"name", "psnr", "iou@0.5", "input", "reconstruction", "mask", "edit"} <= \
        set(columns[0])
