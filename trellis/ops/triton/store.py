"""``store_kv`` in Triton: scatter each new token's K/V rows ``[Hkv, D]`` into its cache slot.

A row whose slot lies outside the cache (-1, as padding, or past its end) is skipped: checking the
slots would read them back from the device in every layer. The CPU kernels refuse such a slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [T, Hkv, D], any strides
    v_ptr,
    k_cache_ptr,  # [blocks, block_size, Hkv, D] contiguous, seen as [slots, Hkv, D]
    v_cache_ptr,
    slot_mapping_ptr,  # [T] int64
    k_stride_t,
    k_stride_h,
    k_stride_d,
    v_stride_t,
    v_stride_h,
    v_stride_d,
    num_kv_heads,
    num_slots,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)  # int64: slot * Hkv * D may pass 2**31
    h = tl.arange(0, HEADS_PAD)[:, None]  # [HEADS_PAD, 1]
    d = tl.arange(0, HEAD_DIM)[None, :]  # [1, D]
    # The slot compared as a tensor: the interpreter's `&` of a scalar and a tensor is no mask.
    slots = slot + tl.zeros([HEADS_PAD, HEAD_DIM], dtype=tl.int64)
    mask = (h < num_kv_heads) & (slots >= 0) & (slots < num_slots)  # [HEADS_PAD, D]
    cache_offsets = (slot * num_kv_heads + h) * HEAD_DIM + d  # [HEADS_PAD, D]
    k = tl.load(k_ptr + token * k_stride_t + h * k_stride_h + d * k_stride_d, mask=mask)
    tl.store(k_cache_ptr + cache_offsets, k, mask=mask)
    v = tl.load(v_ptr + token * v_stride_t + h * v_stride_h + d * v_stride_d, mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v, mask=mask)


def store_kv_rows(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write ``k, v [T, Hkv, D]`` (any strides, e.g. views of a fused QKV) at ``slot_mapping[T]``."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, *k.stride(), *v.stride(), num_kv_heads,
        k_cache.shape[0] * k_cache.shape[1],
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
    )  # fmt: skip
