"""One forward's packed batch over the paged KV cache, built on the host once per step."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from trellis import ops
from trellis.cache.block_pool import BlockPool
from trellis.cache.manager import PagedSequence


@dataclass
class PagedBatch:
    """What one forward computes: the new tokens of each sequence, packed end to end.

    The attention of layer ``l`` writes the new K/V into ``kv_layers[l]`` (the pool's K and V
    caches of that layer) and reads each sequence through its block table, as ``plan`` (made
    once for every layer) says.
    """

    input_ids: torch.Tensor  # [T] int64, the new tokens of every sequence, packed
    positions: torch.Tensor  # [T] int64, each token's position in its sequence
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, K/V length of each sequence after this forward
    cu_seqlens_q: torch.Tensor  # [B+1] int32, sequence i's tokens are [cu[i], cu[i+1])
    slot_mapping: torch.Tensor  # [T] int64, where each new token's K/V go
    kv_layers: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer index -> its K and V caches [N, S, Hkv, D]
    plan: ops.AttentionPlan  # the attention of every layer, planned once (backend resolved and checked)
    host_cu_seqlens_q: list[int]  # cu_seqlens_q and seq_lens as the host built them
    host_seq_lens: list[int]


def build_batch(seqs: Sequence[PagedSequence], pool: BlockPool, num_q_heads: int, backend: str | None = None,
                positions: Sequence[Sequence[int]] | None = None, batch_invariant: bool = False) -> PagedBatch:
    """Pack the uncomputed tokens of ``seqs`` (each must have blocks reserved for them in ``pool``)
    and plan their attention (``batch_invariant``: see ``ops.plan_attention``); ``backend`` None
    means the fastest for the pool's device. Sequence ``i``'s new tokens sit at ``positions[i]``,
    by default right after its computed ones."""
    block_size = pool.block_size
    ids: list[int] = []
    packed_positions: list[int] = []
    slots: list[int] = []
    cu = [0]
    for i, seq in enumerate(seqs):
        start, end = seq.num_cached, len(seq.token_ids)
        ids.extend(seq.token_ids[start:end])
        packed_positions.extend(range(start, end) if positions is None else positions[i])
        slots.extend(seq.block_ids[p // block_size] * block_size + p % block_size for p in range(start, end))
        cu.append(len(ids))
    if len(packed_positions) != len(ids):
        raise ValueError(f"{len(packed_positions)} positions for {len(ids)} new tokens")
    max_blocks = max(len(seq.block_ids) for seq in seqs)
    table = [seq.block_ids + [0] * (max_blocks - len(seq.block_ids)) for seq in seqs]
    device = pool.kv.device
    as_tensor = functools.partial(torch.tensor, device=device)
    return plan_batch(as_tensor(ids, dtype=torch.int64), as_tensor(packed_positions, dtype=torch.int64),
                      as_tensor(slots, dtype=torch.int64), as_tensor(table, dtype=torch.int32), cu,
                      [len(seq.token_ids) for seq in seqs], pool, num_q_heads, backend, batch_invariant)


def plan_batch(input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
               cu_seqlens_q: list[int], seq_lens: list[int], pool: BlockPool, num_q_heads: int,
               backend: str | None = None, batch_invariant: bool = False) -> PagedBatch:
    """A batch from its packed tensors (on the pool's device) and its host-side sequence bounds,
    with attention planned for ``pool`` (which may hold a range of the model's layers only)."""
    device = pool.kv.device
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    cu_t = torch.tensor(cu_seqlens_q, dtype=torch.int32, device=device)
    plan = ops.plan_attention(block_table, seq_lens_t, cu_t, num_tokens=input_ids.shape[0], num_q_heads=num_q_heads,
                              k_cache=pool.kv[0, 0],  # any layer's: they share one geometry
                              max_q_len=max(end - start for start, end in pairwise(cu_seqlens_q)),
                              max_kv_len=max(seq_lens), batch_invariant=batch_invariant, backend=backend)
    return PagedBatch(
        input_ids=input_ids,
        positions=positions,
        block_table=block_table,
        seq_lens=seq_lens_t,
        cu_seqlens_q=cu_t,
        slot_mapping=slot_mapping,
        kv_layers=pool.layers,
        plan=plan,
        host_cu_seqlens_q=cu_seqlens_q,
        host_seq_lens=seq_lens,
    )
