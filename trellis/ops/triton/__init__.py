"""The ``triton`` backend: checked launchers of the three ops (``KERNELS``), and ``load()``.

Importing this package never needs Triton: the kernel modules (``store``, ``decode``,
``extend``, and ``tile``, the key tile both attention kernels share) are imported only where
Triton is installed, and ``load()`` registers the launchers for the CUDA dispatch key of
``trellis::`` only where a CUDA device exists too. The launchers also take CPU tensors under
``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU (the interpreter has no
bf16 arithmetic: fp16/fp32 there). (``import triton`` in these modules is the Triton package:
imports are absolute.)

Supported: fp16, bf16, fp32; head dim a power of two from 16 to 256; any block size (tiles
gather keys across blocks); any GQA group (padded to 16 query heads inside the decode kernel, and
split over programs where the GPU's shared memory is short: ``decode.decode_tiles``).

The launches need two host numbers: the longest query (1 routes to the split-K decode kernel,
more to the extend kernel, whose grid it sizes) and the number of decode splits (from the
longest context). A plan holds them (``plan_paged_attention``, from numbers the caller knows);
``paged_attention`` without one reads the two maxima back from the device, in one transfer.
Kernels launch on their tensors' device (``launch_device``), whichever device is current.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from types import SimpleNamespace

import torch

from trellis.ops.checks import check_paged_attention, check_plan, check_store_kv, refuse_batch_invariant, require
from trellis.utils import cdiv

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton defines kernels interpreted (``TRITON_INTERPRET=1``). ``triton.knobs`` holds the
    setting from Triton 3.4 on; 3.2 and 3.3 read the variable itself when a kernel is defined."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


INTERPRETED = False
if HAS_TRITON:
    from trellis.ops.triton.decode import decode_attention
    from trellis.ops.triton.extend import extend_attention
    from trellis.ops.triton.store import store_kv_rows

    # Triton picks compiled or interpreted kernels when they are defined, i.e. just above.
    INTERPRETED = interpreting()

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SPLITS = 32  # the merge kernel holds [splits, D] partials in registers
_MIN_SPLIT_KEYS = 256  # below this a slice costs more to merge than it saves
_impl: torch.library.Library | None = None


def load() -> bool:
    """Register the launchers for CUDA tensors where a CUDA device exists; False without Triton."""
    global _impl
    if not HAS_TRITON:
        return False
    if _impl is None and torch.cuda.is_available():
        _impl = torch.library.Library("trellis", "IMPL")
        for name, launcher in vars(KERNELS).items():
            _impl.impl(name, launcher, "CUDA")
    return True


def runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and INTERPRETED)


def fits_head_dim(head_dim: int) -> bool:
    """Whether the kernels take heads of ``head_dim``: powers of two from 16 to 256."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def _check_head_dim(head_dim: int) -> None:
    require(fits_head_dim(head_dim), "the Triton kernels need a power-of-two head_dim from 16 to 256, got ", head_dim)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """``trellis::store_kv`` on CUDA (or CPU under the interpreter); see ``trellis.ops.reference``.
    A row whose slot lies outside the cache is skipped, not refused (``store.py``)."""
    check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    _check_runs_here(k_cache)
    _check_head_dim(k_cache.shape[3])
    with launch_device(k_cache.device):
        store_kv_rows(k, v, k_cache, v_cache, slot_mapping)


def plan_paged_attention(
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    num_q_heads: int,
    max_q_len: int,
    max_kv_len: int,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """``trellis::plan_paged_attention``: the launch numbers, CPU int64 ``[max_q_len, num_splits]``.
    ``max_q_len`` and ``max_kv_len`` are trusted within the bounds the shapes set (reading the
    lengths would stall the device): one too small leaves query rows unwritten."""
    refuse_batch_invariant(batch_invariant)
    check_plan(k_cache, block_table, seq_lens, cu_seqlens_q, num_q_heads)
    capacity = block_table.shape[1] * k_cache.shape[1]
    require(0 <= max_q_len <= max_kv_len <= capacity, "max_q_len, max_kv_len = ", max_q_len, ", ", max_kv_len,
            ": a query is no longer than its context, and a context holds at most the block table's ", capacity,
            " keys")
    decode = max_q_len == 1
    num_splits = decode_splits(block_table.shape[0], k_cache.shape[2], max_kv_len, k_cache.device) if decode else 1
    return torch.tensor([max_q_len, num_splits])


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    plan: torch.Tensor | None = None,
) -> None:
    """``trellis::paged_attention`` on CUDA (or CPU under the interpreter); see ``trellis.ops.reference``."""
    check_paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out)
    _check_runs_here(q)
    _check_head_dim(q.shape[2])
    require(block_table.stride(1) == 1, "block_table rows must be contiguous")
    require(seq_lens.is_contiguous() and cu_seqlens_q.is_contiguous(), "seq_lens and cu_seqlens_q must be contiguous")
    if block_table.shape[0] == 0 or q.shape[0] == 0:  # nothing to compute, if the query ranges say so too
        ends = cu_seqlens_q[[0, -1]].tolist()
        require(ends == [0, q.shape[0]], "cu_seqlens_q must run from 0 to T = ", q.shape[0], ", got ", ends)
        return
    if plan is None:
        max_q_len, max_kv_len = _checked_lengths(q.shape[0], k_cache, block_table, seq_lens, cu_seqlens_q)
        plan = plan_paged_attention(k_cache, block_table, seq_lens, cu_seqlens_q, q.shape[1], max_q_len, max_kv_len)
    require(
        plan.dtype == torch.int64 and plan.shape == (2,) and plan.device.type == "cpu",
        "plan is not a Triton plan from trellis::plan_paged_attention",
    )
    max_q_len, num_splits = plan.tolist()  # host memory: no device sync
    args = (q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, out)
    with launch_device(q.device):
        if max_q_len == 1:
            decode_attention(*args, num_splits=num_splits)
        else:
            extend_attention(*args, max_q_len=max_q_len)


def _checked_lengths(
    num_tokens: int, k_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor
) -> tuple[int, int]:
    """The longest query and context of a call without a plan, read back in one transfer with what
    the kernels trust (as the C++ plan checks): the query ranges, the lengths, every block id read."""
    cu, lens = cu_seqlens_q.long(), seq_lens.long()
    q_lens = cu[1:] - cu[:-1]
    num_blocks, block_size = k_cache.shape[:2]
    used = torch.arange(block_table.shape[1], device=lens.device) < ((lens + block_size - 1) // block_size)[:, None]
    used &= (q_lens > 0)[:, None]
    bad_ids = (((block_table < 0) | (block_table >= num_blocks)) & used).sum()
    bad_lens = ((q_lens < 0) | (q_lens > lens) | (lens > block_table.shape[1] * block_size)).sum()
    max_q, max_kv, first, last, bad_lens, bad_ids = torch.stack(
        [q_lens.max(), lens.max(), cu[0], cu[-1], bad_lens, bad_ids]
    ).tolist()  # the one-off call's sync
    require(first == 0 and last == num_tokens, "cu_seqlens_q must run from 0 to T = ", num_tokens, ", got ", first,
            " to ", last)
    require(bad_lens == 0, "every sequence needs 0 <= queries <= seq_lens <= its block table's keys (",
            block_table.shape[1], " blocks of ", block_size, "): ", bad_lens, " do not")
    require(bad_ids == 0, bad_ids, " block ids that the kernels would read lie outside the cache (", num_blocks,
            " blocks)")
    return max_q, max_kv


def decode_splits(batch: int, num_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    """Slices per context: two waves of programs on the GPU, but at least ``_MIN_SPLIT_KEYS`` keys each."""
    if device.type != "cuda":  # the interpreter runs programs one after another: splitting only adds work
        return 1
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    by_length = cdiv(max_kv_len, _MIN_SPLIT_KEYS)
    by_occupancy = cdiv(programs, batch * num_kv_heads)
    return max(1, min(_MAX_SPLITS, by_length, by_occupancy))


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` made the current CUDA device while kernels launch: Triton launches on the current
    device and its stream, not on the tensors' (a model on cuda:1, or a thread that never chose a
    device, would launch on cuda:0 with cuda:1's pointers). Nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_runs_here(t: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton backend needs the triton package")
    require(t.dtype in _DTYPES, "the Triton kernels take ", _DTYPES, ", got ", t.dtype)
    if t.device.type == "cuda":
        return
    require(INTERPRETED, "the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got ", t.device)
    require(t.dtype != torch.bfloat16, "the Triton interpreter has no bf16 arithmetic; use fp16 or fp32 on the CPU")


# The op functions, by the schema's names (backends.kernels("triton")).
KERNELS = SimpleNamespace(store_kv=store_kv, paged_attention=paged_attention, plan_paged_attention=plan_paged_attention)
