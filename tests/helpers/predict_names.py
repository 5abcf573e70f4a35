"""A test-only callback that records which images each DDP process inverted (``trainer.predict``, mode=invert).

Added from the command line of experiments/run.py:
    +callbacks.names._target_=tests.helpers.predict_names.PredictNames +callbacks.names.out_dir=DIR
Every process appends the names of each predict batch it ran, with its global rank and pid, to
``DIR/predict_rank<global rank>.jsonl`` (one JSON line per batch). ``read_predict_names(DIR)`` returns
``{rank: [name, ...]}`` over every run that wrote there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

import pytorch_lightning as pl


def read_predict_names(out_dir) -> Dict[int, List[str]]:
    """``{global rank: names in the order that rank got them}`` from every ``predict_rank*.jsonl`` in ``out_dir``."""
    names: Dict[int, List[str]] = {}
    for path in sorted(Path(out_dir).glob("predict_rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            names.setdefault(record["rank"], []).extend(record["names"])
    return names


class PredictNames(pl.Callback):
    """Appends the names of every predict batch of this process to ``out_dir`` (see the module docstring).

    Args:
        out_dir: folder for the records (created if missing); keep it outside the run and output directories.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        names = [str(n) for n in batch["name"]] if isinstance(batch, dict) and "name" in batch else []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / f"predict_rank{trainer.global_rank}.jsonl").open("a") as handle:
            handle.write(json.dumps({"rank": trainer.global_rank, "pid": os.getpid(), "batch": batch_idx,
                                     "names": names}) + "\n")
