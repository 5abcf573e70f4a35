"""The in-domain factors of SynthFaces: their names, ranges, meaning, and the seeded sampler.

Every factor is a label. ``sample_factors`` draws one uniform matrix ``(n, len(FACTORS))`` from the
given ``torch.Generator`` in a single call and maps column k to factor k, so image i's factors do
not depend on ``n``: the first m images of ``sample_factors(seed, n)`` equal ``sample_factors(seed,
m)``. New factors must be appended to ``FACTORS`` (never inserted) to keep old seeds' images; the
tables themselves live in ``labels.synthfaces`` (shared with ``networks/``).
"""
from __future__ import annotations

from typing import Dict

import torch

from labels.synthfaces import (EYE_COLORS, FACTOR_NAMES, FACTORS, FRAME_COLORS, GLASSES, HAIR_COLORS,  # noqa: F401
                               HAIR_STYLES, Factor)

Tensor = torch.Tensor


_MOUTH_CLOSED_P = 0.5


def as_generator(seed_or_generator: int | torch.Generator) -> torch.Generator:
    """Return ``seed_or_generator`` if it is a ``torch.Generator``, else a CPU generator seeded with it."""
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    if isinstance(seed_or_generator, bool) or not isinstance(seed_or_generator, int):
        raise TypeError(f"seed must be an int or torch.Generator, got {type(seed_or_generator).__name__}")
    return torch.Generator().manual_seed(seed_or_generator)


def sample_factors(seed_or_generator: int | torch.Generator, n: int) -> Dict[str, Tensor]:
    """Draw the factors of ``n`` faces.

    Returns a dict name -> (n,) tensor: float32 for "float" factors, int64 for categories. Values lie
    in [low, high] of the matching ``Factor``. One ``torch.rand(n, K)`` call is made, so the result
    for image i is independent of ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = as_generator(seed_or_generator)
    u = torch.rand(n, len(FACTORS), generator=g, dtype=torch.float32)
    out: Dict[str, Tensor] = {}
    for k, f in enumerate(FACTORS):
        col = u[:, k].contiguous()
        if f.kind == "int":
            cum = torch.tensor(f.probs, dtype=torch.float32).cumsum(0)
            out[f.name] = torch.searchsorted(cum[:-1], col, right=True).to(torch.int64)
        elif f.name == "mouth_open":
            open_ = ((col - _MOUTH_CLOSED_P) / (1.0 - _MOUTH_CLOSED_P)).clamp(min=0.0)
            out[f.name] = f.low + (f.high - f.low) * open_
        else:
            out[f.name] = f.low + (f.high - f.low) * col
    return out


def check_factors(factors: Dict[str, Tensor]) -> int:
    """Validate a factor dict (all names present, equal (N,) shapes); return N or raise ValueError."""
    missing = [name for name in FACTOR_NAMES if name not in factors]
    if missing:
        raise ValueError(f"factors dict lacks {missing}; see datamodules.synthfaces.factors.FACTORS")
    n = factors[FACTOR_NAMES[0]].shape[0]
    bad = [name for name in FACTOR_NAMES if tuple(factors[name].shape) != (n,)]
    if bad:
        raise ValueError(f"factors {bad} must have shape ({n},) like {FACTOR_NAMES[0]!r}")
    return n
