"""Who a W&B run is and where its inputs came from: run names / tags from the config, the W&B group of a Hydra
multirun, and the hand-off provenance logged into the run config.

Used by run.py (every stage) and experiments/benchmark.py (one run per method), so that runs of one comparison share
the same names, tags, table schema and config keys:

- ``run_identity(cfg)``: experiment (``task_name``), method (``model.method``, stage 3), data (the data module's class,
  e.g. ``synthfaces``) and generator (``stylegan2-<size>px``);
- ``run_name`` / ``run_tags``: ``dhr-e4e-synthfaces-stylegan2-64px``; ``exp:dhr``, ``method:e4e``,
  ``data:synthfaces``, ``generator:stylegan2-64px``;
- ``apply_wandb_identity(cfg)``: puts them into ``cfg.logger.wandb`` (a name set by the user is kept; tags are added);
- ``handoff_provenance(cfg, run_dir)``: for each hand-off the stage loads (``model.generator_checkpoint``,
  ``model.encoder_checkpoint``, ``model.align_mask_checkpoint``): its path, where the chain got it (``chain.json``:
  configured / reused / trained) and the file's own producer record.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

HANDOFF_KEYS = ("model.generator_checkpoint", "model.encoder_checkpoint", "model.align_mask_checkpoint")


def _data_name(cfg: DictConfig) -> str:
    target = str(OmegaConf.select(cfg, "data._target_", default="") or "")
    name = target.rsplit(".", 1)[-1]
    name = re.sub(r"DataModule$", "", name) or "none"
    return name.lower()


def run_identity(cfg: DictConfig) -> Dict[str, Optional[str]]:
    """{"experiment", "method", "data", "generator"} of a composed run.py config (method None outside stage 3)."""
    method = OmegaConf.select(cfg, "model.method", default=None)
    size = OmegaConf.select(cfg, "generator.size", default=None)
    return {"experiment": str(cfg.get("task_name") or "run"), "method": str(method) if method else None,
            "data": _data_name(cfg), "generator": f"stylegan2-{size}px" if size else "none"}


def run_name(identity: Mapping[str, Optional[str]]) -> str:
    """``<experiment>-<method>-<data>-<generator>`` (no method part when there is none)."""
    return "-".join(str(identity[k]) for k in ("experiment", "method", "data", "generator") if identity.get(k))


def run_tags(identity: Mapping[str, Optional[str]]) -> List[str]:
    """``exp:<experiment>``, ``method:<method>``, ``data:<data>``, ``generator:<generator>`` (W&B tags)."""
    short = {"experiment": "exp", "method": "method", "data": "data", "generator": "generator"}
    return [f"{short[k]}:{identity[k]}"[:64] for k in short if identity.get(k)]


def apply_wandb_identity(cfg: DictConfig, group: Optional[str] = None) -> None:
    """Set ``logger.wandb.name`` (when null) and add the identity tags (and ``group`` when given), in place; a config
    without a W&B logger is left alone."""
    node = OmegaConf.select(cfg, "logger.wandb")
    if node is None:
        return
    identity = run_identity(cfg)
    with open_dict(cfg):
        if not node.get("name"):
            node.name = run_name(identity)
        tags = list(node.get("tags") or [])
        node.tags = tags + [t for t in run_tags(identity) if t not in tags]
        if group:
            node.group = str(group)


def handoff_provenance(cfg: DictConfig, run_dir) -> Dict[str, Dict[str, Any]]:
    """{config key: {"path", "source", "exp", "producer"}} for each hand-off file the stage loads (see the module
    docstring); source / exp come from ``<run_dir>/chain.json`` when the chain recorded the file, else "configured"."""
    from networks.checkpoints import handoff_metadata

    records = {}
    chain = Path(run_dir) / "chain.json"
    if chain.is_file():
        try:
            records = {str(Path(r["path"]).resolve()): r for r in json.loads(chain.read_text()).get("stages", [])}
        except (ValueError, KeyError, TypeError):
            records = {}
    out: Dict[str, Dict[str, Any]] = {}
    for key in HANDOFF_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if not value or not Path(str(value)).expanduser().is_file():
            continue
        path = Path(str(value)).expanduser()
        record = records.get(str(path.resolve()))
        out[key] = {"path": str(path), "source": record["source"] if record else "configured",
                    "exp": record.get("exp") if record else None,
                    "producer": record["producer"] if record and record.get("producer") else handoff_metadata(path)}
    return out


def benchmark_wandb(cfg: DictConfig, method: str, group: str, run_dir, job_type: str = "benchmark"):
    """One W&B run of a benchmark method, built like run.py's: (logger, callbacks) for ``pl.Trainer``.

    The logger is ``cfg.logger.wandb`` (offline unless ``WANDB_MODE=online``) in ``group``, named and tagged by
    ``run_identity`` with ``method`` as the method (a benchmark pseudo-method such as ``dhr_oracle`` keeps its own
    name), files under ``<run_dir>/wandb``; its config holds the resolved config and ``handoff_provenance``. The
    callbacks are the experiment's ``callbacks.wandb_metric_table`` (the per-image table with pictures and the
    ``test_mean/*`` summary), so every method's run has run.py's table schema and summary keys. Finish the run with
    ``logger.experiment.finish()`` after testing.
    """
    import hydra

    node = OmegaConf.select(cfg, "logger.wandb")
    if node is None:
        raise ValueError("benchmark --wandb: the config has no logger.wandb (compose it with logger=wandb)")
    identity = {**run_identity(cfg), "method": method}
    with open_dict(cfg):
        node.name = run_name(identity)
        node.tags = list(node.get("tags") or []) + [t for t in run_tags(identity) + [job_type]
                                                    if t not in (node.get("tags") or [])]
        node.group, node.job_type, node.save_dir = str(group), job_type, str(run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    logger = hydra.utils.instantiate(node)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    logger.log_hyperparams({"handoff_provenance": handoff_provenance(cfg, run_dir), "benchmark_method": method})
    table = OmegaConf.select(cfg, "callbacks.wandb_metric_table")
    callbacks = [hydra.utils.instantiate(table)] if table is not None else []
    return logger, callbacks
