"""Paged KV ops: one schema (``trellis::store_kv``, ``trellis::paged_attention``), several backends.

The ops are registered with ``torch.library``; the pure-PyTorch reference serves every device
(it is registered as CompositeExplicitAutograd), and compiled backends register for their own
dispatch key when they load: the C++ kernels for CPU, the Triton kernels for CUDA. The functions
below load the best backend for the device on first use, let a caller (or
``TRELLIS_BACKEND=reference|cpp|triton``) force one, and check arguments with clear errors
(the compiled launchers check their own). See ``reference.py`` for shapes.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from trellis.ops import reference

_lib = torch.library.Library("trellis", "DEF")
_lib.define("store_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()")
_lib.define(
    "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
    "Tensor cu_seqlens_q, float scale, Tensor(a!) out) -> ()"
)
_lib.impl("store_kv", reference.store_kv, "CompositeExplicitAutograd")
_lib.impl("paged_attention", reference.paged_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("trellis::store_kv")
def _store_kv_fake(k, v, k_cache, v_cache, slot_mapping) -> None:
    return None


@torch.library.register_fake("trellis::paged_attention")
def _paged_attention_fake(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, out) -> None:
    return None


# backend name -> (module, the device type it serves); each module has ``load() -> bool``
# that registers its kernels for that device's dispatch key.
_COMPILED_BACKENDS = {"cpp": ("trellis.ops.cpu", "cpu"), "triton": ("trellis.ops.triton_kernels", "cuda")}
_loaded: dict[str, bool] = {}
BACKENDS = ("reference", *_COMPILED_BACKENDS)


def load_backend(name: str) -> bool:
    """Load (build if needed) a compiled backend; False, with one warning, if it cannot be."""
    if name not in _loaded:
        module_name, _ = _COMPILED_BACKENDS[name]
        try:
            _loaded[name] = importlib.import_module(module_name).load()
        except Exception as exc:  # noqa: BLE001 -- a missing compiler or Triton must not break inference
            warnings.warn(f"trellis: the {name} backend is unavailable ({exc}); using the PyTorch reference")
            _loaded[name] = False
    return _loaded[name]


_defaults: dict[tuple[str | None, str], str] = {}  # (TRELLIS_BACKEND, device type) -> backend


def default_backend(device: torch.device) -> str:
    """The fastest backend that works on ``device``: ``TRELLIS_BACKEND`` if set, else by device type.
    Resolved once per device type (this sits on the per-layer path)."""
    key = (os.environ.get("TRELLIS_BACKEND") or None, device.type)
    if key not in _defaults:
        forced, _ = key
        if forced:
            check_backend(forced, device)
        _defaults[key] = forced or next(
            (name for name, (_, kind) in _COMPILED_BACKENDS.items() if kind == device.type and load_backend(name)),
            "reference",
        )
    return _defaults[key]


def check_backend(name: str, device: torch.device) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "reference":
        return
    device_type = _COMPILED_BACKENDS[name][1]
    if device.type != device_type:
        raise ValueError(f"the {name} backend runs on {device_type} tensors, not {device.type}")
    if not load_backend(name):
        raise RuntimeError(f"the {name} backend could not be loaded on this machine")


_usable: set[tuple[str, str]] = set()  # (backend, device type) pairs that passed check_backend


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend to run on ``device``: ``backend`` once checked usable there, else the default."""
    if backend is None:
        return default_backend(device)
    if (backend, device.type) not in _usable:  # checked once per pair: this sits on the per-layer path
        check_backend(backend, device)
        _usable.add((backend, device.type))
    return backend


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str | None = None,
) -> None:
    """Write new K/V ``[T, Hkv, D]`` into the paged caches at ``slot_mapping[T]`` (int64)."""
    if resolve_backend(backend, k.device) == "reference":
        _check_store_kv(k, v, k_cache, v_cache, slot_mapping)
        reference.store_kv(k, v, k_cache, v_cache, slot_mapping)
    else:  # the compiled launchers check their own arguments
        torch.ops.trellis.store_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``q[T, Hq, D]`` over each sequence's paged K/V; returns ``out``."""
    if out is None:
        out = torch.empty_like(q)
    if resolve_backend(backend, q.device) == "reference":
        _check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out)
        reference.paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, out)
    else:  # the compiled launchers check their own arguments
        torch.ops.trellis.paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, out)
    return out


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _require(k_cache.dim() == 4, f"k_cache must be [num_blocks, block_size, Hkv, D], got {tuple(k_cache.shape)}")
    _require(k_cache.shape == v_cache.shape, "k_cache and v_cache shapes differ")
    _require(k_cache.dtype == v_cache.dtype, "k_cache and v_cache dtypes differ")
    _require(k_cache.is_contiguous() and v_cache.is_contiguous(), "k_cache and v_cache must be contiguous")


def _check_store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    _check_cache(k_cache, v_cache)
    _require(k.shape == v.shape and k.dim() == 3, f"k and v must both be [T, Hkv, D], got {tuple(k.shape)}, {tuple(v.shape)}")
    _require(tuple(k.shape[1:]) == tuple(k_cache.shape[2:]), f"k heads/dim {tuple(k.shape[1:])} != cache {tuple(k_cache.shape[2:])}")
    _require(slot_mapping.dtype == torch.int64 and slot_mapping.shape == (k.shape[0],), "slot_mapping must be int64 [T]")
    _require(k.dtype == k_cache.dtype and v.dtype == k_cache.dtype, f"k/v dtype {k.dtype} != cache dtype {k_cache.dtype}")
    _require(
        len({t.device for t in (k, v, k_cache, v_cache, slot_mapping)}) == 1, "store_kv tensors are on different devices"
    )


def _check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out) -> None:
    _check_cache(k_cache, v_cache)
    _require(q.dim() == 3, f"q must be [T, Hq, D], got {tuple(q.shape)}")
    _require(q.shape[2] == k_cache.shape[3], f"q head_dim {q.shape[2]} != cache head_dim {k_cache.shape[3]}")
    _require(q.shape[1] % k_cache.shape[2] == 0, f"query heads {q.shape[1]} not a multiple of KV heads {k_cache.shape[2]}")
    _require(q.dtype == k_cache.dtype, f"q dtype {q.dtype} != cache dtype {k_cache.dtype}")
    _require(out.shape == q.shape and out.dtype == q.dtype, "out must match q in shape and dtype")
    _require(q.is_contiguous() and out.is_contiguous(), "q and out must be contiguous")
    _require(block_table.dtype == torch.int32 and block_table.dim() == 2, "block_table must be int32 [B, max_blocks]")
    batch = block_table.shape[0]
    _require(seq_lens.dtype == torch.int32 and seq_lens.shape == (batch,), f"seq_lens must be int32 [{batch}]")
    _require(
        cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.shape == (batch + 1,), f"cu_seqlens_q must be int32 [{batch + 1}]"
    )
    _require(
        len({t.device for t in (q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out)}) == 1,
        "paged_attention tensors are on different devices",
    )
