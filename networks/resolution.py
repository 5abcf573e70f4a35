"""Checks on image / feature sizes shared by the networks (the generator's resolutions are powers of two)."""
from __future__ import annotations


def is_power_of_two(n) -> bool:
    """True for an int (not a bool) n > 0 that is a power of two: 1, 2, 4, ..."""
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0
