"""Argument checks with clear errors (``ValueError``), for the reference path and the Triton launchers.

They read only shapes, dtypes and devices, never tensor values: no device sync. (The C++ kernels
check their own arguments, values included, with the same messages.)
"""

from __future__ import annotations

import torch


def require(cond: bool, *message: object) -> None:
    """Raise ``ValueError(message)`` unless ``cond``; the parts are joined only then (per-layer path)."""
    if not cond:
        raise ValueError("".join(map(str, message)))


def refuse_batch_invariant(batch_invariant: bool) -> None:
    """The plans of the backends other than C++'s, which sum a query row in an order that depends on the batch."""
    require(not batch_invariant, "a batch-invariant plan (every query row summed in one order in any batch) is the C++ "
            "CPU backend's alone")


def check_cache_heads(k_cache: torch.Tensor) -> None:
    require(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, Hkv, D], got ", tuple(k_cache.shape))
    require(k_cache.shape[2] > 0 and k_cache.shape[3] > 0, "the cache needs a KV head and a head_dim of 1 or more, got ",
            tuple(k_cache.shape))


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    check_cache_heads(k_cache)
    require(k_cache.shape == v_cache.shape, "k_cache and v_cache shapes differ")
    require(k_cache.dtype == v_cache.dtype, "k_cache and v_cache dtypes differ")
    require(k_cache.is_contiguous() and v_cache.is_contiguous(), "k_cache and v_cache must be contiguous")


def check_store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    check_cache(k_cache, v_cache)
    require(
        k.shape == v.shape and k.dim() == 3,
        "k and v must both be [T, Hkv, D], got ",
        tuple(k.shape),
        ", ",
        tuple(v.shape),
    )
    require(
        k.shape[1:] == k_cache.shape[2:], "k heads/dim ", tuple(k.shape[1:]), " != cache ", tuple(k_cache.shape[2:])
    )
    require(slot_mapping.dtype == torch.int64 and slot_mapping.shape == (k.shape[0],), "slot_mapping must be int64 [T]")
    require(
        k.dtype == k_cache.dtype and v.dtype == k_cache.dtype,
        "k/v dtypes ", k.dtype, "/", v.dtype, " != cache dtype ", k_cache.dtype,
    )
    require(
        len({t.device for t in (k, v, k_cache, v_cache, slot_mapping)}) == 1,
        "store_kv tensors are on different devices",
    )


def check_sequences(block_table: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor) -> None:
    """The batch description's dtypes and shapes (its values are the kernels' to trust or check)."""
    require(block_table.dtype == torch.int32 and block_table.dim() == 2, "block_table must be int32 [B, max_blocks]")
    batch = block_table.shape[0]
    require(seq_lens.dtype == torch.int32 and seq_lens.shape == (batch,), "seq_lens must be int32 [", batch, "]")
    require(
        cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.shape == (batch + 1,),
        "cu_seqlens_q must be int32 [",
        batch + 1,
        "]",
    )


def check_plan(
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    num_q_heads: int,
) -> None:
    """The arguments of ``plan_paged_attention`` (its ``max_q_len``/``max_kv_len`` are trusted)."""
    check_sequences(block_table, seq_lens, cu_seqlens_q)
    check_cache_heads(k_cache)
    require(
        num_q_heads > 0 and num_q_heads % k_cache.shape[2] == 0,
        "query heads ",
        num_q_heads,
        " not a multiple of KV heads ",
        k_cache.shape[2],
    )
    require(
        len({t.device for t in (k_cache, block_table, seq_lens, cu_seqlens_q)}) == 1,
        "plan_paged_attention tensors are on different devices",
    )


def check_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    out: torch.Tensor,
) -> None:
    check_cache(k_cache, v_cache)
    require(q.dim() == 3, "q must be [T, Hq, D], got ", tuple(q.shape))
    require(q.shape[1] > 0, "q needs a query head, got ", q.shape[1])
    require(q.shape[2] == k_cache.shape[3], "q head_dim ", q.shape[2], " != cache head_dim ", k_cache.shape[3])
    require(
        q.shape[1] % k_cache.shape[2] == 0, "query heads ", q.shape[1], " not a multiple of KV heads ", k_cache.shape[2]
    )
    require(q.dtype == k_cache.dtype, "q dtype ", q.dtype, " != cache dtype ", k_cache.dtype)
    require(out.shape == q.shape and out.dtype == q.dtype, "out must match q in shape and dtype")
    require(q.is_contiguous() and out.is_contiguous(), "q and out must be contiguous")
    check_sequences(block_table, seq_lens, cu_seqlens_q)
    require(
        len({t.device for t in (q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out)}) == 1,
        "paged_attention tensors are on different devices",
    )


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the fused decoder-layer kernels take


def check_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    require(x.dim() == 2, "add_rms_norm: x must be [T, H], got ", tuple(x.shape))
    require(x.dtype in FUSED_DTYPES, "add_rms_norm: x must be float32, bfloat16 or float16, got ", x.dtype)
    require(weight.shape == (x.shape[1],), "add_rms_norm: weight must be [", x.shape[1], "], got ", tuple(weight.shape))
    require(weight.dtype == x.dtype, "add_rms_norm: weight dtype ", weight.dtype, " != x dtype ", x.dtype)
    if residual is not None:
        require(residual.shape == x.shape, "add_rms_norm: residual ", tuple(residual.shape), " != x ", tuple(x.shape))
        require(residual.dtype == x.dtype, "add_rms_norm: residual dtype ", residual.dtype, " != x dtype ", x.dtype)
        # As ATen's in-place ops see overlap: a dimension of more than one element with stride 0.
        require(not any(size > 1 and stride == 0 for size, stride in zip(x.shape, x.stride())),
                "add_rms_norm: x is updated in place, and more than one element of it refers to a single memory "
                "location (an expanded tensor)")


def check_rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    require(q.dim() == 3, "rope_store_kv: q must be [T, Hq, D], got ", tuple(q.shape))
    require(k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:], "rope_store_kv: k ", tuple(k.shape),
            " does not fit q ", tuple(q.shape))
    require(q.shape[2] % 2 == 0, "rope_store_kv: head_dim ", q.shape[2], " must be even")
    require(cos.shape == sin.shape == (q.shape[0], q.shape[2]), "rope_store_kv: cos and sin must both be [",
            q.shape[0], ", ", q.shape[2], "], got ", tuple(cos.shape), ", ", tuple(sin.shape))
    require(len({t.dtype for t in (q, k, v, cos, sin)}) == 1, "rope_store_kv: q, k, v, cos, sin and the caches "
            "must share a dtype")
    check_store_kv(k, v, k_cache, v_cache, slot_mapping)


def check_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> None:
    require(gate.dim() == 2, "silu_mul: gate must be [T, H], got ", tuple(gate.shape))
    require(gate.shape == up.shape, "silu_mul: gate ", tuple(gate.shape), " != up ", tuple(up.shape))
    require(gate.dtype == up.dtype, "silu_mul: gate dtype ", gate.dtype, " != up dtype ", up.dtype)
