"""The stage chain of `+exp=dhr`: stage 0 -> 1 -> 2 hand-offs, then the experiment's own stage in one run.py call.

The experiment config holds a `chain` mapping; each entry is one earlier stage, in order::

    chain:
      encoder:                                  # the stage's name (its folder: <run_dir>/stage_<name>/)
        checkpoint: /path/encoder.pt            # the hand-off to load; null = produce it in this run
        exp: e4e                                # the experiment that trains it (experiments/configs/exp/)
        file: encoder.pt                        # what that experiment hands off
        target: model.encoder_checkpoint        # key of THIS config that receives the hand-off (or null)
        inputs: {model.generator_checkpoint: generator}   # earlier stages' hand-offs the training run needs
        overrides: [trainer.max_steps=500]      # Hydra overrides of the training run
        enabled: true

For each enabled stage, in order:
1. the hand-off is *configured* when `target` (or, without a target, `checkpoint`) holds a path: it is loaded, and a
   missing file stops the chain before anything runs, naming the key;
2. else it is *reused* when `<run_dir>/stage_<name>/<file>` exists (a finished stage of this run; with
   `overwrite=true` every stage that is not configured is trained again);
3. else it is *trained*: the stage's experiment is composed with Hydra (`+exp=<exp>`, the run's data / generator /
   trainer / logger choices, the inputs, the overrides) and run in `<run_dir>/stage_<name>/` by the caller's
   stage runner; a stage killed before its hand-off continues from its `checkpoints/last.ckpt`.
The path then goes to `target`, so the next stages and the final one use it. Only the stages the final one needs
run: a stage with a target, and the inputs of a stage that is trained (a configured encoder needs no generator).
Configured files are checked to exist before anything trains; whether two hand-offs hold the same generator is
checked by the stage that loads them (generator fingerprints recorded by the producing stages).
`<run_dir>/chain.json` records, per stage, where the hand-off came from and what produced it (its own meta).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.utils.errors import UserError
from experiments.utils.pylogger import get_logger
from networks.checkpoints import handoff_metadata

log = get_logger(__name__)
CHAIN_RECORD = "chain.json"
# Command-line overrides a training stage inherits from the chain's command: the data, the generator, the
# hardware and the logger must be the chain's own. Everything else goes through chain.<stage>.overrides.
INHERITED_PREFIXES = ("data", "generator", "trainer", "logger", "paths.data_dir", "paths.output_dir", "seed",
                      "hydra/launcher")
STAGE_KEYS = {"checkpoint", "exp", "file", "target", "inputs", "overrides", "enabled"}


class ChainError(UserError):
    """The chain's configuration or its hand-offs do not fit together."""


@dataclass
class StageRecord:
    """Where one stage's hand-off came from: source = configured | reused | trained; producer = the file's meta."""

    name: str
    source: str
    path: str
    exp: str
    producer: Dict[str, Any] = field(default_factory=dict)


def stage_dir(run_dir: Path, name: str) -> Path:
    """The folder a chain stage trains in: `<run_dir>/stage_<name>`."""
    return Path(run_dir) / f"stage_{name}"


def handoff_meta(path: Path) -> Dict[str, Any]:
    """What produced a hand-off file: producer, global step, source checkpoints, generator config and fingerprint
    (empty for files without such records, e.g. official checkpoints)."""
    meta = handoff_metadata(path)
    keep = ("produced_by", "global_step", "generator_checkpoint", "encoder_checkpoint", "init_checkpoint",
            "generator_sha1", "generator", "generator_config", "encoder_type")
    return {k: meta[k] for k in keep if k in meta}


def _spec(cfg: DictConfig, name: str) -> Dict[str, Any]:
    spec = OmegaConf.to_container(cfg.chain[name], resolve=True)
    unknown = set(spec) - STAGE_KEYS
    if unknown or not spec.get("exp") or not spec.get("file"):
        raise ChainError(f"chain.{name}: needs exp and file (keys: {', '.join(sorted(STAGE_KEYS))}); "
                         f"unknown keys: {', '.join(sorted(unknown)) or 'none'}")
    return spec


def _configured(cfg: DictConfig, name: str, spec: Dict[str, Any]) -> Optional[str]:
    key = spec.get("target") or f"chain.{name}.checkpoint"
    value = OmegaConf.select(cfg, key)
    if value in (None, ""):
        return None
    if not Path(str(value)).expanduser().is_file():
        raise ChainError(f"{key}={value}: no such file (the {name} hand-off; set {key}=null to produce it in "
                         f"this run with +exp={spec['exp']})")
    return str(Path(str(value)).expanduser())


def inherited_overrides(command: Sequence[str]) -> List[str]:
    """The chain command's overrides a training stage takes over (see INHERITED_PREFIXES)."""
    out = []
    for item in command:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.startswith(INHERITED_PREFIXES) and key != "trainer.limit_test_batches":
            out.append(item)
    return out


def stage_overrides(spec: Dict[str, Any], inputs: Dict[str, str], command: Sequence[str],
                    extra: Sequence[str] = ()) -> List[str]:
    """The overrides of a stage's training run: `+exp=<exp>`, the inherited command overrides, its inputs, its own
    overrides and ``extra`` (in that order, later wins)."""
    return [f"+exp={spec['exp']}", *inherited_overrides(command),
            *[f"{key}={path}" for key, path in inputs.items()], *spec.get("overrides", []), *extra]


def compose_stage(overrides: Sequence[str], config_dir: Path) -> DictConfig:
    """Compose run.py's config for ``overrides``; uses the running Hydra app when there is one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return compose("config", overrides=overrides)


def needed_stages(enabled: Sequence[str], specs: Dict[str, Dict[str, Any]], available: set) -> List[str]:
    """The stages the final stage needs, in chain order: every stage with a ``target``, plus, for each needed stage
    whose hand-off is not ``available`` (configured or already in the run directory), the stages its ``inputs``
    name."""
    needed = {n for n in enabled if specs[n].get("target")}
    for name in reversed(enabled):
        if name in needed and name not in available:
            needed |= set((specs[name].get("inputs") or {}).values())
    return [n for n in enabled if n in needed]


def run_chain(cfg: DictConfig, run_dir: Path, command: Sequence[str], config_dir: Path,
              run_stage: Callable[[DictConfig, Path, List[str]], Optional[Path]], is_zero: bool = True
              ) -> List[StageRecord]:
    """Produce or load every earlier stage's hand-off (module docstring) and write their paths into ``cfg``.

    Args:
        cfg: the chain experiment's composed config (modified in place: each stage's ``target``).
        run_dir: the chain's run directory.
        command: the chain's command-line overrides.
        config_dir: experiments/configs (for composing outside a running Hydra app, e.g. in tests).
        run_stage: ``(stage cfg, stage run dir, stage overrides) -> hand-off path or None`` (run.py's stage runner);
            on every rank; returns None when training was interrupted.
        is_zero: global rank zero (writes chain.json).
    Returns:
        One StageRecord per stage that ran (``needed_stages``), in chain order.
    """
    enabled = [n for n in cfg.chain if OmegaConf.select(cfg, f"chain.{n}.enabled", default=True)]
    specs = {n: _spec(cfg, n) for n in enabled}
    for name, spec in specs.items():
        for key, source in (spec.get("inputs") or {}).items():
            if source not in specs or enabled.index(source) >= enabled.index(name):
                raise ChainError(f"chain.{name}.inputs.{key}={source}: no enabled chain stage of that name before "
                                 f"{name} (stages: {', '.join(enabled)})")
    records: Dict[str, StageRecord] = {}
    # every configured file is checked before anything trains
    for name in enabled:
        path = _configured(cfg, name, specs[name])
        if path:
            records[name] = StageRecord(name, "configured", path, specs[name]["exp"], handoff_meta(Path(path)))
    present = {n for n in enabled if not cfg.get("overwrite") and (stage_dir(run_dir, n) / specs[n]["file"]).is_file()}
    names = needed_stages(enabled, specs, set(records) | present)
    for name in names:
        spec = specs[name]
        if name not in records:
            folder = stage_dir(run_dir, name)
            handoff = folder / spec["file"]
            if name in present:
                records[name] = StageRecord(name, "reused", str(handoff), spec["exp"], handoff_meta(handoff))
                log.info(f"Chain stage {name}: reusing {handoff} (finished earlier in this run directory)")
            else:
                inputs = {key: records[src].path for key, src in (spec.get("inputs") or {}).items()}
                if cfg.get("overwrite"):  # start the stage over (its run deletes its earlier outputs)
                    extra = ["overwrite=true"] if handoff.is_file() or (folder / "checkpoints").is_dir() else []
                else:
                    extra = ["resume=true"] if (folder / "checkpoints" / "last.ckpt").is_file() else []
                if "resume=true" in extra:
                    log.info(f"Chain stage {name}: continuing from {folder / 'checkpoints' / 'last.ckpt'}")
                overrides = stage_overrides(spec, inputs, command, extra)
                stage_cfg = compose_stage(overrides, config_dir)
                with open_dict(stage_cfg):
                    stage_cfg.paths.run_dir = str(folder)
                    if OmegaConf.select(stage_cfg, "logger.wandb") is not None:
                        stage_cfg.logger.wandb.group = str(run_dir.name)
                        stage_cfg.logger.wandb.job_type = f"stage_{name}"
                log.info(f"Chain stage {name}: training with +exp={spec['exp']} in {folder}")
                produced = run_stage(stage_cfg, folder, overrides)
                if not handoff.is_file():
                    raise ChainError(f"Chain stage {name} stopped before writing {handoff}; finished steps are kept "
                                     f"in {folder / 'checkpoints'}. Continue with: resume=true paths.run_dir={run_dir}")
                if produced is not None and Path(produced) != handoff:
                    raise ChainError(f"Chain stage {name}: +exp={spec['exp']} handed off {produced}, but the chain "
                                     f"expects {handoff} (chain.{name}.file)")
                records[name] = StageRecord(name, "trained", str(handoff), spec["exp"], handoff_meta(handoff))
        with open_dict(cfg):
            OmegaConf.update(cfg, f"chain.{name}.checkpoint", records[name].path, merge=False)
            if spec.get("target"):
                OmegaConf.update(cfg, spec["target"], records[name].path, merge=False)
    if OmegaConf.select(cfg, "logger.wandb") is not None:  # the chain's W&B runs form one group
        with open_dict(cfg):
            cfg.logger.wandb.group = str(run_dir.name)
    if is_zero:
        write_chain_record(run_dir, [records[n] for n in names])
    return [records[n] for n in names]


def write_chain_record(run_dir: Path, records: Sequence[StageRecord]) -> Path:
    """`<run_dir>/chain.json`: one entry per stage (name, source, path, exp, producer); returns its path."""
    path = Path(run_dir) / CHAIN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"stages": [asdict(r) for r in records]}, indent=2, default=str))
    return path
