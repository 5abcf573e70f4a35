"""Config values as plain Python containers (weights_only-loadable hyper-parameters and file metadata)."""
from __future__ import annotations

from typing import Any

from networks.checkpoints import plain_containers


def to_plain(value: Any) -> Any:
    """OmegaConf containers, mappings and tuples -> plain dicts and lists (recursively); other values unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but callers need not be Hydra runs
        pass
    return plain_containers(value)
