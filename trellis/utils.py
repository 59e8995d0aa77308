"""Small helpers shared by every layer (nothing here imports the rest of Trellis)."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative integers: the blocks (or tiles) that ``a`` items fill."""
    return -(-a // b)
