"""One key tile of paged attention in Triton, shared by the decode and the extend kernels.

A tile is ``N`` key positions of one sequence; each position finds its block through the block
table, so tiles cross block boundaries and any block size works (1 included) while ``tl.dot``
still sees tiles of at least 16 keys. The caches are contiguous ``[blocks, BLOCK_SIZE, Hkv, D]``.
Scores live in the log2 domain (``qk_scale`` includes ``log2(e)``), so the softmax uses ``exp2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores are scaled by this so the softmax can use exp2


@triton.jit
def paged_kv_offsets(
    table_row_ptr, key_pos, key_valid, kv_head, num_kv_heads, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr
):
    """Element offsets ``[N, HEAD_DIM]`` of the keys at ``key_pos[N]`` (head ``kv_head``) in the cache.

    ``key_valid [N]`` (or None: all valid) keeps the block-table reads inside the sequence.
    """
    # Invalid keys get undefined block ids: their K/V loads are masked too.
    block_ids = tl.load(table_row_ptr + key_pos // BLOCK_SIZE, mask=key_valid).to(tl.int64)  # [N]
    rows = (block_ids * BLOCK_SIZE + key_pos % BLOCK_SIZE) * num_kv_heads + kv_head  # [N] in a [slots * Hkv, D] view
    # Multiplying by the constexpr HEAD_DIM last tells the compiler every row starts aligned: vector loads.
    return rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def attend_tile(
    q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, kv_offsets, key_valid, visible, qk_scale, MASKED: tl.constexpr
):
    """Online-softmax update of ``(acc [M, D], m_i [M], l_i [M])`` with one tile of keys.

    ``q [M, D]`` are the queries; ``key_valid [N]`` marks keys inside the sequence and ``visible
    [M, N]`` which query sees which key. With ``MASKED=False`` every key is valid and visible, and
    both masks are skipped (pass None). Every row must see a key in its first tile: the running
    max is finite from then on, so ``exp2`` never sees ``-inf - -inf``.
    """
    if MASKED:
        k = tl.load(k_cache_ptr + kv_offsets, mask=key_valid[:, None], other=0.0)  # [N, D]
        v = tl.load(v_cache_ptr + kv_offsets, mask=key_valid[:, None], other=0.0)  # [N, D]
    else:
        k = tl.load(k_cache_ptr + kv_offsets)
        v = tl.load(v_cache_ptr + kv_offsets)
    # "ieee" keeps fp32 inputs exact (the default would be tf32); fp16/bf16 ignore it.
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [M, N] fp32
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [M]
    alpha = tl.exp2(m_i - m_new)  # [M] rescales what was accumulated under the old max
    p = tl.exp2(s - m_new[:, None])  # [M, N]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")  # [M, D]
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i
