"""Config values as plain Python containers (weights_only-loadable hyper-parameters and file metadata)."""
from __future__ import annotations

from typing import Any, Mapping


def to_plain(value: Any) -> Any:
    """OmegaConf containers, mappings and tuples -> plain dicts and lists (recursively); other values unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency, but callers need not be Hydra runs
        pass
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
