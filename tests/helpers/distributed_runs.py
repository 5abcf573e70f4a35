"""Starting experiments/run.py as several real processes (torchrun "nodes", SLURM tasks) in tests.

A tiny stage-1 run (`+exp=e4e` on a folder of 16 px images, a 16 px generator file, a narrow encoder)
keeps each process to seconds; most of a test's time is the processes importing torch and Lightning.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = ROOT / "experiments" / "run.py"
# Variables that would make Lightning or torch.distributed believe the test itself runs under a launcher.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                  "MASTER_PORT")


def tiny_stage1_inputs(root: Path, n_images: int = 7) -> tuple[Path, Path]:
    """Writes ``n_images`` random 16x16 PNGs to ``root/images`` and a seeded 16 px generator to
    ``root/generator.pt``; returns (image folder, generator file)."""
    from networks.checkpoints import export_generator
    from networks.stylegan2 import Generator

    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    torch.manual_seed(0)
    g = Generator(16, style_dim=32, n_mlp=2, channel_multiplier=1, channel_max=32)
    generator = export_generator(root / "generator.pt", g, g.mean_latent(256, seed=0).reshape(-1))
    return images, Path(generator)


def tiny_e4e_overrides(images: Path, generator: Path, max_steps: int = 4, held_out: int = 3) -> list[str]:
    """Hydra overrides of a tiny `+exp=e4e` run: ``held_out`` test images, a checkpoint and a validation grid
    every 2 steps, CSV logger, no progress bar. Add a `trainer=` choice and the run directory."""
    return ["+exp=e4e", "data=image_folder", f"data.root={images}", "generator.size=16", "data.batch_size=2",
            "data.num_workers=0", f"data.val_count={held_out}", f"model.generator_checkpoint={generator}",
            "model.encoder.width=0.25", "model.encoder.units=[1,1,1,1]", "logger=csv", f"trainer.max_steps={max_steps}",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
            "+trainer.enable_model_summary=false", "callbacks.model_checkpoint.every_n_train_steps=2"]


def probe_overrides(out_dir: Path) -> list[str]:
    """Overrides adding tests.helpers.rank_probe.RankProbe (records in ``out_dir``) to the run's callbacks."""
    return ["+callbacks.rank_probe._target_=tests.helpers.rank_probe.RankProbe",
            f"+callbacks.rank_probe.out_dir={out_dir}"]


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without SLURM / torchrun variables, with one thread per process, W&B disabled and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "SUBMITIT_")) and k not in _LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", WANDB_SILENT="true", HYDRA_FULL_ERROR="1",
               PROJECT_ROOT=str(ROOT), NO_ALBUMENTATIONS_UPDATE="1")
    env.update(extra)
    return env


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``127.0.0.1:port`` (so a rendezvous store can bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_job_id_with_free_port() -> str:
    """A SLURM job id whose Lightning default port (15000 + its last four digits) is free on this machine."""
    for _ in range(200):
        tail = random.randint(1000, 9999)
        if port_is_free(15000 + tail):
            return f"7{tail}"
    raise RuntimeError("no free port in 16000..24999 for a simulated SLURM job")


def start(args: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """Starts ``args`` with stdout + stderr to ``log``; the caller waits with `wait_all`."""
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    """Waits for every process. When one exits non-zero or the time is up, kills the ones still running (each by
    its own pid: a rank left alone would wait for its peers) and raises AssertionError with every log's tail."""
    deadline = time.monotonic() + timeout
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs):
            failed = "exit codes " + ", ".join(str(p.returncode) for p in procs)
        elif time.monotonic() > deadline:
            failed = f"still running after {timeout} s"
        else:
            time.sleep(0.2)
    if failed is None and any(p.returncode != 0 for p in procs):
        failed = "exit codes " + ", ".join(str(p.returncode) for p in procs)
    if failed:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # torchrun stops its worker on SIGTERM
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        tails = "\n".join(f"--- {log}\n{log.read_text()[-3000:]}" for log in logs)
        raise AssertionError(f"a process failed ({failed}):\n{tails}")


def run_py(*overrides: str) -> list[str]:
    """``[python, experiments/run.py, *overrides]`` with this interpreter."""
    return [sys.executable, str(RUN_PY), *overrides]


def torchrun(node_rank: int, nnodes: int, port: int, *overrides: str) -> list[str]:
    """One torchrun "node" (one process) of an ``nnodes``-node job rendezvousing on ``127.0.0.1:port``."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc_per_node=1",
            f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}", str(RUN_PY), *overrides]
