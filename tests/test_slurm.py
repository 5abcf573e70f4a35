"""SLURM without a cluster: the sbatch script, the submitit launcher config, srun tasks and requeueing.

- experiments/slurm/dhr.sbatch is executed by bash with fake `srun` / python that record their arguments, so
  the test sees the exact command line srun would start on every task, then composes it with Hydra.
- hydra/launcher=slurm is turned into the sbatch file submitit would submit.
- Two local processes with the variables srun sets (SLURM_PROCID, SLURM_NTASKS, ...) form one DDP group
  through Lightning's SLURMEnvironment and agree on the run directory (outputs/<task>/<SLURM_JOB_ID>).
- A SIGUSR1 (what `#SBATCH --signal=SIGUSR1@90` sends) makes Lightning save an HPC checkpoint and call
  `scontrol requeue <job id>` (a fake that records the call and kills the job, as SLURM does); the requeued
  job (same job id, `resume=true`) continues from that checkpoint.
- A real Hydra multirun through hydra/launcher=submitit_local: two jobs, each with its own run directory.
"""
import os
import signal
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.utils.cli import check_command_line
from networks.encoder_checkpoints import load_e4e_checkpoint
from tests.conftest import CONFIG_DIR, ROOT
from tests.helpers.distributed_runs import (
    clean_env,
    probe_overrides,
    run_py,
    slurm_job_id_with_free_port,
    start,
    tiny_e4e_overrides,
    tiny_stage1_inputs,
    wait_all,
)
from tests.helpers.rank_probe import read_probes

pytestmark = pytest.mark.usefixtures("single_thread")

SBATCH = ROOT / "experiments" / "slurm" / "dhr.sbatch"


def sbatch_directives(path) -> dict[str, str]:
    """`#SBATCH --key=value` lines of the script's leading comment block (where sbatch reads them) as a dict."""
    directives = {}
    for line in path.read_text().splitlines()[1:]:
        if line and not line.startswith("#"):
            break  # sbatch ignores #SBATCH lines after the first command
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].strip().partition("=")
            directives[key.lstrip("-")] = value
    return directives


def fake_tools(bin_dir, log_dir) -> dict[str, str]:
    """Executables `srun`, `scontrol` and `fake-python` in ``bin_dir`` that write their arguments (NUL separated)
    to ``log_dir/<name>.args``; `srun` also writes the WANDB_MODE it was given to ``log_dir/srun.wandb_mode``;
    `scontrol` then kills its parent (a requeued job is killed by SLURM). Returns environment additions."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, tail in (("srun", f"printf '%s' \"$WANDB_MODE\" > '{log_dir}/srun.wandb_mode'\n"), ("fake-python", ""),
                       ("scontrol", "kill -KILL $PPID\n")):
        tool = bin_dir / name
        tool.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" >> '{log_dir / name}.args'\n{tail}")
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "fake-python")}


def recorded_args(log_dir, name) -> list[str] | None:
    """The arguments a fake tool was called with (None: it was not called)."""
    path = log_dir / f"{name}.args"
    return path.read_text().split("\0")[:-1] if path.is_file() else None


def slurm_env(job_id: str, ntasks: int, nnodes: int, rank: int, **extra: str) -> dict[str, str]:
    """The variables srun sets for task ``rank`` of a job with one task per node (node id = rank)."""
    env = dict(SLURM_JOB_ID=job_id, SLURM_JOB_NAME="invertlab", SLURM_NTASKS=str(ntasks),
               SLURM_NTASKS_PER_NODE=str(ntasks // nnodes), SLURM_NNODES=str(nnodes), SLURM_PROCID=str(rank),
               SLURM_LOCALID=str(rank % (ntasks // nnodes)), SLURM_NODEID=str(rank // (ntasks // nnodes)),
               SLURM_NODELIST="127.0.0.1")
    env.update(extra)
    return env


def compose_run(overrides) -> DictConfig:
    """The config run.py composes from ``overrides`` (hydra node included), registered with HydraConfig."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


# ----------------------------------------------------------------------------- the sbatch script
def test_sbatch_script_starts_one_ddp_task_per_gpu_that_composes(tmp_path, monkeypatch):
    from lightning_fabric.plugins.environments import SLURMEnvironment

    directives = sbatch_directives(SBATCH)
    nodes, per_node = int(directives["nodes"]), int(directives["ntasks-per-node"])
    assert directives["gres"] == f"gpu:{per_node}", "one task per GPU: --gres=gpu:N must equal --ntasks-per-node"
    signal_name, _, lead_s = directives["signal"].partition("@")
    assert "requeue" in directives and int(lead_s) >= 60

    logs = tmp_path / "calls"
    env = clean_env(**fake_tools(tmp_path / "bin", logs), SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="4242",
                    SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(per_node), SLURM_CPUS_PER_TASK="8")
    done = subprocess.run(["bash", str(SBATCH), "seed=3"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = recorded_args(logs, "srun")
    assert argv[:2] == [env["PYTHON"], "experiments/run.py"] and argv[-1] == "seed=3"  # "$@" appended
    overrides = argv[2:]
    assert check_command_line(overrides, CONFIG_DIR) is None  # run.py's own command-line check

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("DATA_DIR", raising=False)
    cfg = compose_run(overrides)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (nodes, per_node)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.strategy.startswith("ddp")
    assert cfg.resume is True and cfg.seed == 3 and cfg.hydra.runtime.choices.exp == "dhr"
    assert cfg.paths.run_dir == cfg.hydra.run.dir == f"{ROOT}/outputs/dhr/4242"  # the same on every task

    # the one-off SynthFaces render before srun writes what data=synthfaces reads
    render = recorded_args(logs, "fake-python")
    assert render[:2] == ["-m", "datamodules.synthfaces"]
    opts = dict(zip(render[2::2], render[3::2]))
    assert ROOT / opts["--out"] == ROOT / "data" / "synthfaces" and cfg.data.root == str(ROOT / "data" / "synthfaces")
    assert (int(opts["--n"]), int(opts["--size"]), int(opts["--seed"]), int(opts["--n-eval"])) == \
        (cfg.data.n_images, cfg.data.render_size, cfg.data.render_seed, cfg.data.n_eval)

    # Lightning accepts these trainer settings for that allocation and listens for the script's signal
    for key, value in slurm_env("4242", nodes * per_node, nodes, 0, SLURM_JOB_NAME="dhr").items():
        monkeypatch.setenv(key, value)
    env_plugin = SLURMEnvironment()
    env_plugin.validate_settings(num_devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes)
    assert env_plugin.requeue_signal == getattr(signal, signal_name) and env_plugin.auto_requeue
    with pytest.raises(ValueError, match="ntasks-per-node"):
        env_plugin.validate_settings(num_devices=per_node - 1, num_nodes=nodes)


def test_sbatch_script_skips_the_render_for_other_data(tmp_path):
    logs = tmp_path / "calls"
    env = clean_env(**fake_tools(tmp_path / "bin", logs), SLURM_SUBMIT_DIR=str(ROOT), SLURM_NNODES="1",
                    SLURM_NTASKS_PER_NODE="2")
    done = subprocess.run(["bash", str(SBATCH), "data=celebahq", "data.root=/data/celebahq"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert recorded_args(logs, "fake-python") is None
    argv = recorded_args(logs, "srun")
    assert argv[-2:] == ["data=celebahq", "data.root=/data/celebahq"]
    assert "trainer.num_nodes=1" in argv and "trainer.devices=2" in argv


def test_wandb_agent_script_runs_one_online_agent_run_per_array_task(tmp_path):
    script = ROOT / "experiments" / "slurm" / "wandb_agent.sbatch"
    logs = tmp_path / "calls"
    env = clean_env(**fake_tools(tmp_path / "bin", logs), SLURM_SUBMIT_DIR=str(ROOT), WANDB_MODE="offline")
    done = subprocess.run(["bash", str(script), "me/invertlab/abc123"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert recorded_args(logs, "srun") == ["wandb", "agent", "--count", "1", "me/invertlab/abc123"]
    assert (logs / "srun.wandb_mode").read_text() == "online"  # agents fetch their parameters from the server
    directives = sbatch_directives(script)
    assert directives["ntasks-per-node"] == "1" and directives["gres"] == "gpu:1"
    missing = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "usage: sbatch --array=0-N" in missing.stderr


def test_default_run_dir_is_the_job_id_for_every_task_and_a_time_stamp_outside_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "31337")
    dirs = []
    for rank in (0, 1):
        monkeypatch.setenv("SLURM_PROCID", str(rank))
        dirs.append(compose_run(["+exp=e4e"]).paths.run_dir)
    assert dirs == [f"{ROOT}/outputs/e4e/31337"] * 2
    monkeypatch.delenv("SLURM_JOB_ID")
    stamps = {compose_run(["+exp=e4e"]).paths.run_dir for _ in range(2)}
    assert len(stamps) == 2  # torchrun outside SLURM: the processes would not agree, so pass paths.run_dir


# ----------------------------------------------------------------------------- the submitit launcher
def test_slurm_launcher_config_becomes_the_expected_sbatch_file(tmp_path, monkeypatch):
    import hydra
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    env = fake_tools(tmp_path / "bin", tmp_path / "calls")  # submitit's SlurmExecutor looks for srun
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "sweep"
    cfg = compose_run(["+exp=dhr", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp",
                       "trainer.devices=4", "trainer.num_nodes=2", f"hydra.sweep.dir={sweep}",
                       "model.refine.feature_steps=50"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    params = launcher.params
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (2, 4, 4)  # wired to trainer
    assert params["submitit_folder"] == f"{sweep}/.submitit/%j"

    # what BaseSubmititLauncher.launch hands to submitit, turned into the sbatch text submitit would submit
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(folder=str(sweep / ".submitit"), cluster="slurm")
    executor.update_parameters(**{k if k in base_keys else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    text = executor._executor._make_submission_file_text("python -u -m submitit.core._submit DIR", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --time=1440",
                 "#SBATCH --signal=USR2@120", "export WANDB_MODE=offline", "export OMP_NUM_THREADS=8"):
        assert line in text.splitlines(), f"{line!r} not in\n{text}"
    assert text.rstrip().splitlines()[-1].startswith("srun ")  # every task runs the Hydra job


@pytest.mark.slow
def test_submitit_local_multirun_gives_each_job_its_own_run_dir(tmp_path):
    """`python experiments/run.py -m hydra/launcher=submitit_local ... seed=1,2`: two jobs in their own processes."""
    images, generator = tiny_stage1_inputs(tmp_path)
    sweep = tmp_path / "sweep"
    args = run_py("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}",
                  *tiny_e4e_overrides(images, generator, max_steps=2), "trainer=cpu", "seed=1,2")
    done = subprocess.run(args, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert OmegaConf.load(sweep / "multirun.yaml").hydra.launcher._target_.endswith("LocalLauncher")
    encoders = []
    for num, seed in ((0, 1), (1, 2)):
        run = sweep / str(num)
        saved = OmegaConf.load(run / "config.yaml")
        assert saved.paths.run_dir == str(run) and saved.seed == seed
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step_0000002.ckpt"]
        rows = (run / "metrics" / "test.csv").read_text().splitlines()
        assert rows[0].startswith("name,mse,psnr") and len(rows) == 4
        encoders.append(torch.load(run / "encoder.pt", weights_only=True)["state_dict"])
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert logs.count("Hand-off written:") == 2  # each job ran in a submitit process of its own
    differs = [k for k in encoders[0] if not torch.equal(encoders[0][k], encoders[1][k])]
    assert differs, "seed=1 and seed=2 trained identical encoders"


# ----------------------------------------------------------------------------- srun tasks
@pytest.mark.slow
def test_two_srun_tasks_form_one_group_and_agree_on_the_job_run_dir(tmp_path):
    images, generator = tiny_stage1_inputs(tmp_path)
    job_id = slurm_job_id_with_free_port()  # no MASTER_PORT: Lightning derives it from the job id, as under srun
    out, probes = tmp_path / "outputs", tmp_path / "probes"
    args = run_py(*tiny_e4e_overrides(images, generator), "trainer=multinode_cpu", f"paths.output_dir={out}",
                  *probe_overrides(probes))
    logs = [tmp_path / f"task{rank}.log" for rank in (0, 1)]
    procs = [start(args, clean_env(**slurm_env(job_id, 2, 2, rank)), log, cwd=tmp_path)
             for rank, log in zip((0, 1), logs)]
    wait_all(procs, logs, timeout=300)

    run = (out / "e4e" / job_id).resolve()
    for stage in ("fit", "test"):
        records = read_probes(probes, stage)
        assert sorted(records) == [0, 1]
        for rank, r in records.items():
            assert r["environment"] == "SLURMEnvironment" and r["world_size"] == r["process_group_size"] == 2
            assert (r["node_rank"], r["local_rank"], r["gathered_ranks"]) == (rank, 0, [0, 1])
            assert r["default_root_dir"] == str(run)  # outputs/<task>/<SLURM_JOB_ID> on both tasks
            assert r["main_address"] == "127.0.0.1" and r["main_port"] == str(15000 + int(job_id[-4:]))
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints", "config.yaml", "csv", "encoder.pt",
                                                     "metrics", "reconstructions", "run.log"]
    assert [p.name for p in (out / "e4e").iterdir()] == [job_id]  # no second run dir from the other task
    assert OmegaConf.load(run / "config.yaml").paths.run_dir == str(run)
    assert load_e4e_checkpoint(run / "encoder.pt").encoder.config["input_size"] == 16
    text = [log.read_text() for log in logs]
    assert "Hand-off written" in text[0] and "Hand-off written" not in text[1]
    assert "SLURM auto-requeueing enabled" in text[0]  # the SIGUSR1 handler of `--signal=SIGUSR1@90` is set


@pytest.mark.slow
def test_sigusr1_saves_an_hpc_checkpoint_requeues_and_the_requeued_job_continues_from_it(tmp_path):
    images, generator = tiny_stage1_inputs(tmp_path)
    calls = tmp_path / "calls"
    job_id, out, probes = "5151", tmp_path / "outputs", tmp_path / "probes"
    env = clean_env(**fake_tools(tmp_path / "bin", calls), **slurm_env(job_id, 1, 1, 0))
    base = [*tiny_e4e_overrides(images, generator), "trainer=cpu", f"paths.output_dir={out}", "resume=true",
            *probe_overrides(probes)]
    run = out / "e4e" / job_id

    # the job: SIGUSR1 after step 3; periodic checkpoints every 2 steps, so last.ckpt is older (step 2)
    first = subprocess.run(run_py(*base, "trainer.max_steps=50", "+callbacks.rank_probe.signal_at_step=3"),
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    assert recorded_args(calls, "scontrol") == ["requeue", job_id]
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert hpc["global_step"] == 3
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 2

    # the requeued job: same job id, so the same run dir; it must continue from the newest state (step 3)
    second = subprocess.run(run_py(*base, "trainer.max_steps=5"), env=dict(env, SLURM_RESTART_COUNT="1"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    fit, test = read_probes(probes, "fit")[0], read_probes(probes, "test")[0]
    assert fit["start_step"] == 3, f"resumed from step {fit['start_step']}, not from the HPC checkpoint (step 3)"
    assert fit["global_step"] == 5
    assert test["tested_weights"] == fit["final_weights"], "the test after training did not use the trained weights"
