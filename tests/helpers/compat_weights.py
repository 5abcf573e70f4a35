"""Rebuild the deterministic weights of the compatibility vectors in ``tests/data/compat``.

Each vectors file holds ``spec`` (state-dict keys and shapes as the reference implementation names
them), ``fixed`` (entries kept exactly), ``seed`` and ``cases``. Every other entry is drawn from a
normal distribution seeded by ``seed + crc32(key)`` and shaped by the rules below, so a network that
names its parameters like the reference can load them and must reproduce the cases. Entries of two or more
dimensions whose key starts with one of the file's ``fan_in_prefixes`` (default ``["encoder."]``, the plain
layers of the e4e file; ``[""]`` = every key) are divided by sqrt(fan-in) so that deep plain networks keep
activations of order one. ``tests/data/compat/README.md`` says how each file was made.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Dict

import torch

COMPAT_DIR = Path(__file__).resolve().parents[1] / "data" / "compat"
DEFAULT_FAN_IN_PREFIXES = ("encoder.",)


def draw(key: str, shape, seed: int, fan_in_prefixes=DEFAULT_FAN_IN_PREFIXES) -> torch.Tensor:
    """The weight recipe for one entry (see module docstring)."""
    gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
    t = torch.randn(tuple(shape), generator=gen)
    if key.endswith("modulation.bias"):
        return 1.0 + 0.1 * t
    if key.endswith("running_var"):
        return 1.0 + 0.1 * t.abs()
    if key.endswith("bias") or key.endswith("running_mean"):
        return 0.1 * t
    if key.endswith(".weight") and len(shape) == 1:
        return 0.1 * t if "noise" in key else 1.0 + 0.1 * t
    if len(shape) >= 2 and any(key.startswith(prefix) for prefix in fan_in_prefixes):
        return t / math.sqrt(math.prod(shape[1:]))
    return t


def load_vectors(name: str) -> Dict:
    """Load ``tests/data/compat/<name>`` (plain tensors, lists and dicts: weights_only is enough)."""
    return torch.load(COMPAT_DIR / name, map_location="cpu", weights_only=True)


def state_dict_from_vectors(vectors: Dict) -> Dict[str, torch.Tensor]:
    """All weights of a vectors file, in spec order."""
    fixed = vectors["fixed"]
    prefixes = tuple(vectors.get("fan_in_prefixes", DEFAULT_FAN_IN_PREFIXES))
    return {k: fixed[k].clone() if k in fixed else draw(k, shape, vectors["seed"], prefixes)
            for k, shape in vectors["spec"]}
