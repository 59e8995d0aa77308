"""The Triton backend: checked launchers for ``store_kv`` and ``paged_attention``, and ``load()``.

Importing this module never needs Triton: the kernel modules are imported only where Triton is
installed, and ``load()`` registers the launchers for the CUDA dispatch key only where a CUDA
device exists too. The launchers also take CPU tensors under ``TRITON_INTERPRET=1``, which is how
the kernels are tested without a GPU (the interpreter has no bf16 arithmetic: fp16/fp32 there).

Supported: fp16, bf16, fp32; head dim a power of two from 16 to 256; any block size (tiles
gather keys across blocks); any GQA group (padded to 16 query heads inside the decode kernel).

``paged_attention`` reads two numbers back from the device per call, in one transfer: the
longest query (1 routes to the split-K decode kernel, more to the extend kernel, whose grid it
sizes) and the longest context (which sizes the decode split). That is the backend's one sync.
Kernels launch on the current CUDA device: one GPU per process, or set it before calling.
"""

from __future__ import annotations

import importlib.util

import torch

from trellis.ops import _check_paged_attention, _check_store_kv, _require

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from triton import knobs

    from trellis.ops.triton_decode import decode_attention
    from trellis.ops.triton_extend import extend_attention
    from trellis.ops.triton_store import store_kv_rows

    # Triton picks compiled or interpreted kernels when they are defined, i.e. just above.
    INTERPRETED = knobs.runtime.interpret

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 32  # the merge kernel holds [splits, D] partials in registers
_MIN_SPLIT_KEYS = 256  # below this a slice costs more to merge than it saves
_impl: torch.library.Library | None = None


def load() -> bool:
    """Register the Triton launchers for CUDA; False where Triton or a CUDA device is missing."""
    global _impl
    if not HAS_TRITON or not torch.cuda.is_available():
        return False
    if _impl is None:
        _impl = torch.library.Library("trellis", "IMPL")
        _impl.impl("store_kv", store_kv, "CUDA")
        _impl.impl("paged_attention", paged_attention, "CUDA")
    return True


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """``trellis::store_kv`` on CUDA (or CPU under the interpreter); see ``trellis.ops.reference``."""
    _check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    _check_runs_here(k_cache)
    store_kv_rows(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """``trellis::paged_attention`` on CUDA (or CPU under the interpreter); see ``trellis.ops.reference``."""
    _check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out)
    _check_runs_here(q)
    head_dim = q.shape[2]
    _require(
        16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0,
        f"the Triton kernels need a power-of-two head_dim from 16 to 256, got {head_dim}",
    )
    _require(block_table.stride(1) == 1, "block_table rows must be contiguous")
    _require(seq_lens.is_contiguous() and cu_seqlens_q.is_contiguous(), "seq_lens and cu_seqlens_q must be contiguous")
    batch, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    if batch == 0 or q.shape[0] == 0:
        return
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]  # [B]
    max_q_len, max_kv_len = torch.stack([q_lens.max(), seq_lens.max()]).tolist()  # the one host sync
    args = (q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, out)
    if max_q_len == 1:
        decode_attention(*args, num_splits=decode_splits(batch, num_kv_heads, max_kv_len, q.device))
    else:
        extend_attention(*args, max_q_len=max_q_len)


def decode_splits(batch: int, num_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    """Slices per context: two waves of programs on the GPU, but at least ``_MIN_SPLIT_KEYS`` keys each."""
    if device.type != "cuda":  # the interpreter runs programs one after another: splitting only adds work
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    by_length = -(-max_kv_len // _MIN_SPLIT_KEYS)
    by_occupancy = -(-programs // (batch * num_kv_heads))
    return max(1, min(_MAX_SPLITS, by_length, by_occupancy))


def _check_runs_here(t: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton backend needs the triton package")
    _require(t.dtype in _DTYPES, f"the Triton kernels take {_DTYPES}, got {t.dtype}")
    if t.device.type == "cuda":
        return
    _require(INTERPRETED, f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")
    _require(t.dtype != torch.bfloat16, "the Triton interpreter has no bf16 arithmetic; use fp16 or fp32 on the CPU")
