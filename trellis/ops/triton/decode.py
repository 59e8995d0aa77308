"""Split-K ("flash decoding") paged attention for batches where every sequence has one query.

A decode step has too little work per sequence to fill a GPU if one program walks a whole
context, so the context is cut into ``num_splits`` slices: program ``(seq, kv_head, split)``
attends the ``GROUP`` query heads of one KV head to one slice (a ``[GROUP, D]`` tile against each
key tile, so K/V are read once per group, not once per query head) and writes its partial
``(max, sum, acc)``; a second kernel merges the slices of each head by log-sum-exp. A group whose
tiles would not fit the GPU's shared memory is split over several programs (``decode_tiles``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from trellis.ops.triton.tile import LOG2E, attend_tile, paged_kv_offsets

# (TILE_N, num_warps) by element size, then head dim (16 and 32 use 64's): tiles that ptxas
# compiles for sm_80 and sm_90 without spilling registers. Timed on an H200 (docs/benchmarks.md), not tuned.
_TILES = {2: {64: (64, 4), 128: (64, 4), 256: (32, 4)}, 4: {64: (64, 8), 128: (32, 8), 256: (16, 8)}}
_MIN_TILE_N = 16  # tl.dot's smallest K (P·V's is TILE_N) in Triton 3.6; 3.9 allows 8 in fp32
_MIN_HEADS = 16  # tl.dot's smallest M on tensor cores: the group is padded up to it
# Triton's own scratch beside the dot operands (reductions): up to 640 bytes on sm_80 and sm_86 with
# Triton 3.6 and 3.9, up to 1,536 with 3.2.
_SHARED_SCRATCH = 2048


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [blocks, BLOCK_SIZE, Hkv, D]
    v_cache_ptr,
    block_table_ptr,  # [B, max_blocks] int32, row stride table_stride
    seq_lens_ptr,  # [B] int32
    cu_seqlens_q_ptr,  # [B+1] int32
    part_acc_ptr,  # [B, Hq, splits, D] fp32: unnormalised output of each split
    part_stats_ptr,  # [B, Hq, splits, 2] fp32: (running max, sum of exp2) of each split
    qk_scale,
    table_stride,
    num_kv_heads,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,  # query heads per program: a power of two >= 16; the group may take several
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE_N: tl.constexpr,
):
    seq = tl.program_id(0)
    head_tiles = (GROUP + HEADS - 1) // HEADS  # programs per KV head (constexpr)
    kv_head = tl.program_id(1) // head_tiles
    head_tile = tl.program_id(1) % head_tiles
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    q_row = tl.load(cu_seqlens_q_ptr + seq)
    if tl.load(cu_seqlens_q_ptr + seq + 1) == q_row:  # no query for this sequence in this step
        return
    kv_len = tl.load(seq_lens_ptr + seq)
    # Slices are whole tiles, so only the last tile of the last non-empty slice is partial.
    split_len = tl.cdiv(tl.cdiv(kv_len, num_splits), TILE_N) * TILE_N
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)

    g = head_tile * HEADS + tl.arange(0, HEADS)  # [HEADS] this program's heads within the group
    d = tl.arange(0, HEAD_DIM)
    head_valid = g < GROUP  # the group is padded to a power of two >= 16 for tl.dot
    heads = kv_head * GROUP + g  # [HEADS] query heads of this KV head
    num_q_heads = num_kv_heads * GROUP
    q = tl.load(
        q_ptr + (q_row * num_q_heads + heads)[:, None] * HEAD_DIM + d[None, :], mask=head_valid[:, None], other=0.0
    )  # [HEADS, D]

    m_i = tl.full([HEADS], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS], tl.float32)
    acc = tl.zeros([HEADS, HEAD_DIM], tl.float32)
    table_row_ptr = block_table_ptr + seq.to(tl.int64) * table_stride
    for n in range(start, end, TILE_N):
        key_pos = n + tl.arange(0, TILE_N)  # [TILE_N]
        key_valid = key_pos < end
        offsets = paged_kv_offsets(table_row_ptr, key_pos, key_valid, kv_head, num_kv_heads, BLOCK_SIZE, HEAD_DIM)
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, offsets, key_valid, key_valid[None, :], qk_scale, MASKED=True
        )

    # An empty slice (short context) stores max -inf and sum 0: the merge gives it weight 0.
    part = (seq * num_q_heads + heads) * num_splits + split  # [HEADS]
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=head_valid[:, None])
    tl.store(part_stats_ptr + part * 2, m_i, mask=head_valid)
    tl.store(part_stats_ptr + part * 2 + 1, l_i, mask=head_valid)


@triton.jit
def _decode_merge_kernel(
    part_acc_ptr,  # [B, Hq, splits, D] fp32
    part_stats_ptr,  # [B, Hq, splits, 2] fp32
    cu_seqlens_q_ptr,  # [B+1] int32
    out_ptr,  # [T, Hq, D]
    num_q_heads,
    num_splits,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_row = tl.load(cu_seqlens_q_ptr + seq)
    if tl.load(cu_seqlens_q_ptr + seq + 1) == q_row:
        return
    s = tl.arange(0, SPLITS_PAD)
    split_valid = s < num_splits
    part = (seq * num_q_heads + head) * num_splits + s  # [SPLITS_PAD]
    split_max = tl.load(part_stats_ptr + part * 2, mask=split_valid, other=float("-inf"))  # [SPLITS_PAD]
    split_sum = tl.load(part_stats_ptr + part * 2 + 1, mask=split_valid, other=0.0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=split_valid[:, None], other=0.0)
    weight = tl.exp2(split_max - tl.max(split_max, 0))  # [SPLITS_PAD], 0 for empty slices
    o = tl.sum(weight[:, None] * acc, 0) / tl.sum(weight * split_sum, 0)  # [D]
    tl.store(out_ptr + (q_row * num_q_heads + head) * HEAD_DIM + d, o.to(out_ptr.dtype.element_ty))


def shared_bytes(element_size: int, head_dim: int, heads: int, tile_n: int) -> int:
    """Shared memory a split program stages its ``tl.dot`` operands in: the query tile ``[heads,
    D]``, a K and a V tile ``[tile_n, D]`` and the probabilities ``[heads, tile_n]``. Triton 3.2 to
    3.9 allot this plus ``_SHARED_SCRATCH`` at most on sm_80 and sm_86 (measured by compiling every
    dtype, head dim and group up to 128). On sm_90, fp16/bf16 groups of 64 or more take up to 29 kB
    more (wgmma), the largest program 131,200 of its 232,448 bytes."""
    return element_size * (heads * head_dim + 2 * tile_n * head_dim + heads * tile_n)


def decode_tiles(element_size: int, head_dim: int, group: int, shared_limit: int | None) -> tuple[int, int, int]:
    """``(heads per program, TILE_N, num_warps)`` for a GQA group of ``group`` query heads: the
    whole group and the ``_TILES`` tile, halving the key tile (to 16) and then the heads (to 16)
    until the program's shared memory fits ``shared_limit`` bytes (None: no limit, the
    interpreter). Smaller key tiles cost speed; fewer heads per program read K/V once per program."""
    tile_n, num_warps = _TILES[element_size][max(64, head_dim)]
    heads = max(_MIN_HEADS, triton.next_power_of_2(group))

    def fits() -> bool:
        return shared_limit is None or shared_bytes(element_size, head_dim, heads, tile_n) + _SHARED_SCRATCH <= shared_limit

    while not fits() and tile_n > _MIN_TILE_N:
        tile_n //= 2
    while not fits() and heads > _MIN_HEADS:
        heads //= 2
    return heads, tile_n, num_warps


@functools.cache
def shared_memory_limit(device: torch.device) -> int | None:
    """The shared memory a program may use on ``device`` (the opt-in maximum Triton checks a launch
    against: 99 KiB on sm_86/sm_89, 163 KiB on sm_80, 227 KiB on sm_90); None off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int,
) -> None:
    """Paged attention when every ``q_len`` is 0 or 1, each context cut into ``num_splits`` slices.

    Arguments as in ``trellis.ops.reference``, already checked by ``trellis.ops.triton``.
    """
    batch = seq_lens.shape[0]
    num_q_heads, head_dim = q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1:3]
    group = num_q_heads // num_kv_heads
    heads, tile_n, num_warps = decode_tiles(q.element_size(), head_dim, group, shared_memory_limit(q.device))
    part_acc = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_stats = torch.empty(batch, num_q_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, num_kv_heads * triton.cdiv(group, heads), num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, part_acc, part_stats,
        scale * LOG2E, block_table.stride(0), num_kv_heads,
        GROUP=group,
        HEADS=heads,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        TILE_N=tile_n,
        num_warps=num_warps,
    )  # fmt: skip
    _decode_merge_kernel[(batch, num_q_heads)](
        part_acc, part_stats, cu_seqlens_q, out, num_q_heads, num_splits,
        SPLITS_PAD=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim,
    )  # fmt: skip
