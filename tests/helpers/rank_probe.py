"""A test-only callback that records, in every process, how Lightning placed it in a distributed run.

Added from the command line of experiments/run.py (the repository root is on sys.path there):
    +callbacks.rank_probe._target_=tests.helpers.rank_probe.RankProbe +callbacks.rank_probe.out_dir=DIR
Each process writes ``DIR/<stage>_rank<global rank>.json`` (stage: fit, test, ...) with the world size
and ranks Lightning saw, the cluster environment it chose, the ranks gathered over the real process
group, the run directory, the step training started from (after a checkpoint restore), a digest of the
weights at the end of training and at the start of testing, and the names of the test images it evaluated.
With ``signal_at_step=N`` the process sends itself SIGUSR1 once training reaches step N, as SLURM does
``--signal=SIGUSR1@<seconds>`` before a job's time limit.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch

from networks.checkpoints import weights_fingerprint


def read_probes(out_dir, stage: str) -> dict[int, dict]:
    """Returns ``{global rank: record}`` of every ``<stage>_rank*.json`` under ``out_dir``."""
    records = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob(f"{stage}_rank*.json"))]
    return {r["global_rank"]: r for r in records}


class RankProbe(pl.Callback):
    """Writes one JSON record per process and stage (see the module docstring).

    Args:
        out_dir: folder for the records (created if missing); use one outside the run directory so that the
            probe's files do not count as run outputs.
        signal_at_step: send SIGUSR1 to this process after the training step that reaches this global step.
    """

    def __init__(self, out_dir: str, signal_at_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.signal_at_step = signal_at_step
        self.test_names: list[str] = []
        self.rank = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Called after the process group is up: records the placement and an all_gather of the global ranks."""
        stage = getattr(stage, "value", stage)  # a TrainerFn enum: its value ("fit") names the file
        self.test_names = []
        self.rank = trainer.global_rank
        ranks = trainer.strategy.all_gather(torch.tensor([trainer.global_rank]))
        dist = torch.distributed
        record = {
            "stage": stage,
            "pid": os.getpid(),
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "num_nodes": trainer.num_nodes,
            "num_devices": trainer.num_devices,
            "is_global_zero": trainer.is_global_zero,
            "strategy": type(trainer.strategy).__name__,
            # the environment Lightning detected (what its SLURM signal handling looks at), also for one process
            "environment": type(trainer._accelerator_connector.cluster_environment).__name__,
            "process_group_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else None,
            "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
            "gathered_ranks": sorted(int(r) for r in ranks.flatten().tolist()),
            "default_root_dir": str(Path(trainer.default_root_dir).resolve()),
            "main_address": os.environ.get("MASTER_ADDR"),
            "main_port": os.environ.get("MASTER_PORT"),
        }
        self._write(stage, record)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        """Keeps the names of the images this process tests (dict batches with a "name" list)."""
        if isinstance(batch, dict) and "name" in batch:
            self.test_names.extend(str(n) for n in batch["name"])

    def on_train_start(self, trainer, pl_module) -> None:
        """Adds the step training starts from (non-zero after a checkpoint was restored) to the fit record."""
        self._update("fit", {"start_step": trainer.global_step})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Sends SIGUSR1 once ``signal_at_step`` is reached (Lightning's SLURM handler runs right after)."""
        if self.signal_at_step is not None and trainer.global_step == self.signal_at_step:
            self.signal_at_step = None
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_end(self, trainer, pl_module) -> None:
        """Adds the final global step and a digest of the trained weights to the fit record."""
        self._update("fit", {"global_step": trainer.global_step, "final_weights": weights_fingerprint(pl_module)})

    def on_test_start(self, trainer, pl_module) -> None:
        """Adds a digest of the weights being tested (after any checkpoint Lightning loaded) to the test record."""
        self._update("test", {"tested_weights": weights_fingerprint(pl_module)})

    def on_test_end(self, trainer, pl_module) -> None:
        """Adds the tested image names (this process's share of the test set) to the test record."""
        self._update("test", {"test_names": self.test_names})

    def _path(self, stage: str) -> Path:
        return self.out_dir / f"{stage}_rank{self.rank}.json"

    def _write(self, stage: str, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._path(stage).write_text(json.dumps(record, indent=1))

    def _update(self, stage: str, extra: dict) -> None:
        path = self._path(stage)
        record = json.loads(path.read_text()) if path.is_file() else {"stage": stage}
        record.update(extra)
        path.write_text(json.dumps(record, indent=1))
