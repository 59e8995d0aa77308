"""One forward's packed batch over the paged KV cache, built on the host once per step."""

from __future__ import annotations

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
    caches of that layer) and reads each sequence through its block table.
    """

    input_ids: torch.Tensor  # [T] int64, the new tokens of every sequence, packed
    positions: torch.Tensor  # [T] int64, each token's position in its sequence
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32, K/V length of each sequence after this forward
    cu_seqlens_q: torch.Tensor  # [B+1] int32, sequence i's tokens are [cu[i], cu[i+1])
    slot_mapping: torch.Tensor  # [T] int64, where each new token's K/V go
    kv_layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K and V caches [N, S, Hkv, D]
    backend: str  # the kernels, resolved and checked once per batch
    max_q_len: int  # host facts every layer's attention needs, known here without a device read
    max_kv_len: int

    @property
    def last_token_index(self) -> torch.Tensor:
        """[B] index of each sequence's last new token in the packed dimension."""
        return self.cu_seqlens_q[1:].long() - 1


def build_batch(seqs: Sequence[PagedSequence], pool: BlockPool, backend: str | None = None) -> PagedBatch:
    """Pack the uncomputed tokens of ``seqs`` (each must have blocks reserved for them in ``pool``);
    ``backend`` None means the fastest for the pool's device."""
    block_size = pool.block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu = [0]
    for seq in seqs:
        start, end = seq.num_cached, len(seq.token_ids)
        ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(seq.block_ids[p // block_size] * block_size + p % block_size for p in range(start, end))
        cu.append(len(ids))
    max_blocks = max(len(seq.block_ids) for seq in seqs)
    table = [seq.block_ids + [0] * (max_blocks - len(seq.block_ids)) for seq in seqs]
    seq_lens = [len(seq.token_ids) for seq in seqs]
    device = pool.kv.device
    return PagedBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        block_table=torch.tensor(table, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        kv_layers=pool.layers,
        backend=ops.resolve_backend(backend, device),
        max_q_len=max(end - start for start, end in pairwise(cu)),
        max_kv_len=max(seq_lens),
    )
