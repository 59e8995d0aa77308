"""Small helpers shared by every layer (nothing here imports the rest of Trellis)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import operator
import sys
from collections.abc import Iterable

import torch


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative integers: the blocks (or tiles) that ``a`` items fill."""
    return -(-a // b)


def is_positive_int(value: object) -> bool:
    """An ``int`` above zero; ``bool`` is an ``int`` to Python, never a size here."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def token_ids(tokens: Iterable, what: str = "prompt") -> list[int]:
    """``tokens`` as a list of ints: Python or NumPy integers, integer tensors of one element, or
    a 1-D integer tensor or array. Anything else (floats, which would be truncated; strings; None)
    is a ``TypeError`` naming ``what``."""
    if isinstance(tokens, str):
        raise TypeError(f"{what} must be token ids, not a string: tokenize it first")
    if hasattr(tokens, "tolist"):  # a tensor or array: one conversion, not one object per element
        tokens = tokens.tolist()
    try:
        items = iter(tokens)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of token ids, got {type(tokens).__name__}") from None
    ids = []
    for t in items:
        try:
            ids.append(operator.index(t))
        except TypeError:
            raise TypeError(f"{what}: token ids must be integers, got {t!r}") from None
    return ids


_HUGE_PAGE = 2 << 20  # x86-64's and arm64's transparent huge page
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name, use_errno=True) if name else None


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back the whole 2 MiB pages of a large CPU tensor's memory with transparent huge
    pages (``madvise(MADV_HUGEPAGE)``), before anything touches them; whether the kernel took the
    advice. Where THP is enabled only on request (``madvise``, the usual default), a page
    touched for the first time otherwise faults in 4 KiB at a time: the KV pool, written block by
    block as prompts arrive, paid that in every prefill (on the 2-core Xeon ~0.5 ms a layer of a
    448-token prompt). Elsewhere (not Linux, THP off, a GPU tensor) nothing happens."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or (libc := _libc()) is None:
        return False
    start = tensor.data_ptr()
    first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    end = (start + tensor.untyped_storage().nbytes()) // _HUGE_PAGE * _HUGE_PAGE
    if end <= first:
        return False
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), _MADV_HUGEPAGE) == 0
