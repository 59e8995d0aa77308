"""Small helpers shared by every layer (nothing here imports the rest of Trellis)."""

from __future__ import annotations

import importlib.metadata
import numbers
import operator
import os
from collections.abc import Iterable, Mapping, Sequence


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative integers: the blocks (or tiles) that ``a`` items fill."""
    return -(-a // b)


def is_int(value: object) -> bool:
    """An integer (a Python or NumPy one, as transformers takes) that is not a ``bool``: Python
    counts ``True`` as 1, never a size, count or id here. Keep ``int(value)`` of what passes: a
    NumPy integer overflows at 64 bits where a Python one does not."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def store_as_ints(instance: object, names: Iterable[str]) -> None:
    """Set each of ``instance``'s attributes ``names`` that is not None to ``int()`` of itself (a
    frozen dataclass's too): what ``is_int`` passed, NumPy integers included, kept as Python ints."""
    for name in names:
        if getattr(instance, name) is not None:
            object.__setattr__(instance, name, int(getattr(instance, name)))


def is_positive_int(value: object) -> bool:
    """An ``int`` above zero (``is_int``)."""
    return is_int(value) and value > 0


def read_utf8(path: str | os.PathLike) -> str:
    """A UTF-8 text file's text (line ends read as "\n"); a file that is not UTF-8 is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def token_ids(tokens: Iterable, what: str = "prompt") -> list[int]:
    """``tokens`` as a list of ints: Python or NumPy integers, integer tensors of one element, or
    a 1-D integer tensor or array. Anything else (floats, which would be truncated; strings; None;
    bools, which Python counts as ints: an attention mask passed for the ids) is a ``TypeError``
    naming ``what``."""
    if isinstance(tokens, (str, bytes, bytearray)):
        kind = "a string" if isinstance(tokens, str) else type(tokens).__name__
        raise TypeError(f"{what} must be token ids, not {kind}: tokenize it first")
    if isinstance(tokens, (set, frozenset, Mapping)):
        raise TypeError(f"{what} must be a sequence of token ids, got a {type(tokens).__name__}, which has no order")
    if hasattr(tokens, "tolist"):  # a tensor or array: one conversion, not one object per element
        tokens = tokens.tolist()
    try:
        items = iter(tokens)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of token ids, got {type(tokens).__name__}") from None
    ids = []
    for t in items:
        try:
            if isinstance(t, bool):
                raise TypeError
            ids.append(operator.index(t))
        except TypeError:
            raise TypeError(f"{what}: token ids must be integers, got {t!r}") from None
    return ids


def head_dim_of(config) -> int:
    """A Llama config's attention head size: ``head_dim``, else ``hidden_size / num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def outside_vocabulary(tokens: Sequence[int], vocab_size: int) -> str | None:
    """Why ``tokens`` cannot be a model's input (the first id outside ``[0, vocab_size)``), or None."""
    if not tokens or (0 <= min(tokens) and max(tokens) < vocab_size):
        return None
    bad = next(t for t in tokens if not 0 <= t < vocab_size)
    return f"token id {bad} is outside the vocabulary [0, {vocab_size})"


def package_version() -> str:
    """Trellis' version as installed (its metadata); "unknown" where it runs uninstalled, from a
    checkout on ``PYTHONPATH``."""
    try:
        return importlib.metadata.version("trellis")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
