"""Build lists of callbacks / loggers from config dicts of `_target_` nodes (a null or empty group -> [])."""
from typing import Any

import hydra
from omegaconf import DictConfig


def _instantiate_all(cfg: DictConfig | None, group: str) -> list[Any]:
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"`{group}` must be a dict of {{name: {{_target_: ...}}}} entries, got {type(cfg).__name__}")
    # Entries without _target_ (e.g. a value left behind after switching the group off) are ignored.
    nodes = [node for node in cfg.values() if isinstance(node, DictConfig) and "_target_" in node]
    return [hydra.utils.instantiate(node) for node in nodes]


def instantiate_callbacks(cfg: DictConfig | None) -> list[Any]:
    """Instantiates every `_target_` child of `cfg.callbacks`; returns a list of Lightning callbacks."""
    return _instantiate_all(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Any]:
    """Instantiates every `_target_` child of `cfg.logger`; returns a list of Lightning loggers (maybe empty)."""
    return _instantiate_all(cfg, "logger")
