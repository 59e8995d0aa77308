"""Prefill / extend paged attention: many queries per sequence, bottom-right causal.

The new tokens' K/V are already in the cache (``store_kv`` runs first), so the cached prefix and
the new tokens are read alike, through the block table. Program ``(seq, head, query block)``
runs an fp32 online softmax over key tiles in two phases: tiles every query of the block sees
(no masks at all), then the tiles across the diagonal (masked); tiles past the block's last
query are never visited. Sequences with ``q_len == 1`` in a mixed batch are a one-row block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trellis.ops.triton.tile import LOG2E, attend_tile, paged_kv_offsets

# (BLOCK_M, BLOCK_N, num_warps) by element size, then head dim (16 and 32 use 64's): the largest
# tiles that ptxas compiles for sm_80 and sm_90 with at most 32 bytes of stack (no real spilling).
# Timed on an H200 (docs/benchmarks.md), not tuned.
# fp32 needs smaller tiles: its exact ("ieee") dots run on FMA units, not tensor cores.
_TILES = {
    2: {64: (64, 64, 4), 128: (64, 32, 4), 256: (32, 32, 8)},
    4: {64: (64, 32, 8), 128: (32, 16, 8), 256: (32, 16, 8)},
}


@triton.jit
def _extend_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [blocks, BLOCK_SIZE, Hkv, D]
    v_cache_ptr,
    block_table_ptr,  # [B, max_blocks] int32, row stride table_stride
    seq_lens_ptr,  # [B] int32
    cu_seqlens_q_ptr,  # [B+1] int32
    out_ptr,  # [T, Hq, D]
    qk_scale,
    table_stride,
    num_q_heads,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq).to(tl.int64)  # q's offsets pass 2**31 at 128K tokens x 128 heads x 128
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if m_block * BLOCK_M >= q_len:  # the grid is sized for the longest sequence
        return
    kv_len = tl.load(seq_lens_ptr + seq)
    kv_head = head // (num_q_heads // num_kv_heads)

    i = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index within the sequence
    q_valid = i < q_len
    q_pos = kv_len - q_len + i  # absolute position: query i sees keys 0 .. q_pos
    d = tl.arange(0, HEAD_DIM)
    q_offsets = ((q_start + i) * num_q_heads + head)[:, None] * HEAD_DIM + d[None, :]  # [BLOCK_M, D]
    q = tl.load(q_ptr + q_offsets, mask=q_valid[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table_row_ptr = block_table_ptr + seq.to(tl.int64) * table_stride
    first_pos = kv_len - q_len + m_block * BLOCK_M
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys below are seen by every query of the block
    causal_end = tl.minimum(kv_len, first_pos + BLOCK_M)  # keys from here on are seen by none
    # Padding rows (i >= q_len) compute on zeros and are never stored.
    for n in range(0, full_end, BLOCK_N):
        key_pos = n + tl.arange(0, BLOCK_N)
        offsets = paged_kv_offsets(table_row_ptr, key_pos, None, kv_head, num_kv_heads, BLOCK_SIZE, HEAD_DIM)
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, offsets, None, None, qk_scale, MASKED=False
        )
    for n in range(full_end, causal_end, BLOCK_N):
        key_pos = n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        key_valid = key_pos < causal_end
        visible = key_pos[None, :] <= q_pos[:, None]  # [BLOCK_M, BLOCK_N]
        offsets = paged_kv_offsets(table_row_ptr, key_pos, key_valid, kv_head, num_kv_heads, BLOCK_SIZE, HEAD_DIM)
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, offsets, key_valid, visible, qk_scale, MASKED=True
        )

    o = acc / l_i[:, None]  # [BLOCK_M, D]
    tl.store(out_ptr + q_offsets, o.to(out_ptr.dtype.element_ty), mask=q_valid[:, None])


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    max_q_len: int,
) -> None:
    """Paged attention for any mix of query lengths; ``max_q_len`` sizes the grid.

    Arguments as in ``trellis.ops.reference``, already checked by ``trellis.ops.triton``.
    """
    num_q_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    block_m, block_n, num_warps = _TILES[q.element_size()][max(64, head_dim)]
    grid = (seq_lens.shape[0], num_q_heads, triton.cdiv(max_q_len, block_m))
    _extend_kernel[grid](
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out,
        scale * LOG2E, block_table.stride(0), num_q_heads, num_kv_heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )  # fmt: skip
