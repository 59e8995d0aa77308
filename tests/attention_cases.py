"""Random paged-attention problems and a float64 oracle, shared by every backend's tests."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from trellis import ops
from trellis.utils import cdiv

SHAPES = {  # (q_lens, kv_lens): the batches every backend is tested on
    "cold_prefill": ([7, 5], [7, 5]),
    "extend_over_prefix": ([3, 9], [11, 20]),
    "decode": ([1, 1, 1], [1, 17, 33]),
    "mixed": ([1, 6, 1, 4], [9, 6, 40, 13]),
}


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [N, S, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    scale: float

    def to(self, device: str | torch.device) -> PagedCase:
        tensors = (self.q, self.k_cache, self.v_cache, self.block_table, self.seq_lens, self.cu_seqlens_q)
        return PagedCase(*(t.to(device) for t in tensors), self.scale)

    def next_layer(self, seed: int) -> PagedCase:
        """Another layer of the same forward: the same sequences, new random q and caches."""
        g = torch.Generator().manual_seed(seed)
        fresh = [torch.randn(t.shape, generator=g).to(t.dtype).to(t.device) for t in (self.q, self.k_cache, self.v_cache)]
        return PagedCase(*fresh, self.block_table, self.seq_lens, self.cu_seqlens_q, self.scale)

    def plan(self, backend: str | None = None, batch_invariant: bool = False) -> ops.AttentionPlan:
        """``ops.plan_attention`` for this batch, with the host numbers a model knows."""
        q_lens = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).tolist()
        return ops.plan_attention(
            self.block_table,
            self.seq_lens,
            self.cu_seqlens_q,
            num_tokens=self.q.shape[0],
            num_q_heads=self.q.shape[1],
            k_cache=self.k_cache,
            max_q_len=max(q_lens, default=0),
            max_kv_len=max(self.seq_lens.tolist(), default=0),
            batch_invariant=batch_invariant,
            backend=backend,
        )


def make_case(
    q_lens: list[int],
    kv_lens: list[int],
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    block_size: int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedCase:
    """Sequences with ``kv_lens`` keys each, the last ``q_lens`` of them queried; blocks scattered."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [cdiv(n, block_size) for n in kv_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered, non-monotone block ids
    table = torch.zeros(len(kv_lens), max(blocks_per_seq), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = torch.tensor(perm[used : used + n])
        used += n
    # Fill the whole cache, unused slots included, with noise: kernels must never read it.
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedCase(q, k_cache, v_cache, table, torch.tensor(kv_lens, dtype=torch.int32), cu, head_dim**-0.5)


def oracle_rows(case: PagedCase):
    """Every query row of every head, for the float64 oracles: (token, query head, its scores over
    the keys it sees, those keys' V [visible, D]), K/V gathered token by token."""
    block_size, num_kv_heads, _ = case.k_cache.shape[1:]
    group = case.q.shape[1] // num_kv_heads
    cu = case.cu_seqlens_q.tolist()
    for i, kv_len in enumerate(case.seq_lens.tolist()):
        q_len = cu[i + 1] - cu[i]
        slots = [(int(case.block_table[i, p // block_size]), p % block_size) for p in range(kv_len)]
        k = torch.stack([case.k_cache[b, o] for b, o in slots]).double()  # [L, Hkv, D]
        v = torch.stack([case.v_cache[b, o] for b, o in slots]).double()
        for t in range(q_len):
            visible = kv_len - q_len + t + 1
            for h in range(case.q.shape[1]):
                kh = h // group
                yield cu[i] + t, h, (k[:visible, kh] @ case.q[cu[i] + t, h].double()) * case.scale, v[:visible, kh]


def naive_attention(case: PagedCase) -> torch.Tensor:
    """float64 attention over K/V gathered token by token: the oracle."""
    out = torch.zeros(case.q.shape, dtype=torch.float64)
    for token, head, scores, v in oracle_rows(case):
        out[token, head] = scores.softmax(0) @ v
    return out


def bf16_tile_runs(rows: int, head_dim: int, amx: bool) -> int | None:
    """Runs of 32 keys per key tile in which the C++ kernel rounds the probabilities of a bf16 item
    of ``rows`` query rows before P @ V (item_scores, ItemLayout), or None where they stay
    fp32: where the CPU's bf16 units take P @ V, every item; on AMX tiles (head_dim a multiple of
    32) chaining four runs for more than 16 rows, on AVX512_BF16's dot products (head_dim a
    multiple of 16) one run a tile."""
    if amx and head_dim % 32 == 0:
        return 4 if rows > 16 else 1
    return 1 if head_dim % 16 == 0 else None


def key_tiles(keys: int, block_size: int, runs_per_tile: int) -> list[tuple[int, int]]:
    """The key tiles [start, end) over the first ``keys`` keys of an unsplit item: runs of up to
    32 keys that never cross a block, up to ``runs_per_tile`` chained while each before is whole."""
    tiles, key = [], 0
    while key < keys:
        start, runs, run = key, 0, 32
        while key < keys and runs < runs_per_tile and run == 32:
            run = min(32, keys - key, block_size - key % block_size)
            key, runs = key + run, runs + 1
        tiles.append((start, key))
    return tiles


def item_rows(case: PagedCase, max_rows: int = 64) -> dict[int, int]:
    """Each query token's work item's rows (tokens x GQA group) as the C++ plan cuts a
    sequence's queries: into the fewest items of at most ``max_rows`` rows, evenly (sessions
    decoded apart)."""
    group = case.q.shape[1] // case.k_cache.shape[2]
    tokens_per_item = max(1, max_rows // group)
    cu = case.cu_seqlens_q.tolist()
    rows = {}
    for begin, end in itertools.pairwise(cu):
        tiles = -(-(end - begin) // tokens_per_item)
        for t in range(tiles):
            first, last = begin + (end - begin) * t // tiles, begin + (end - begin) * (t + 1) // tiles
            rows.update(dict.fromkeys(range(first, last), (last - first) * group))
    return rows


def tiled_bf16_attention(case: PagedCase, amx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle as the C++ kernel computes bf16 attention with P @ V on the CPU's bf16
    units, AMX tiles (``amx``) or AVX512_BF16 dot products (one work item a query tile, unsplit):
    where bf16_tile_runs says so, an online softmax over the key tiles, each tile's probabilities
    (against the running max) rounded to bf16 before P @ V, the running sum over the unrounded
    ones; elsewhere the plain oracle. With it, the slack (same shape) that exp's approximation
    may add: where a probability lies within 2e-4 of a bf16 unit of the midpoint between two bf16
    values, the kernel's fp32 exp may round it the other way, moving the output by that unit
    times |v| over the sum."""
    block_size, _, head_dim = case.k_cache.shape[1:]
    rows = item_rows(case)
    out = torch.zeros(case.q.shape, dtype=torch.float64)
    slack = torch.zeros(case.q.shape, dtype=torch.float64)
    for token, head, scores, v in oracle_rows(case):
        runs = bf16_tile_runs(rows[token], head_dim, amx)
        if runs is None:
            out[token, head] = scores.softmax(0) @ v
            continue
        m, total = -math.inf, 0.0
        acc, near_ties = (torch.zeros(v.shape[1], dtype=torch.float64) for _ in range(2))
        for start, end in key_tiles(len(scores), block_size, runs):
            new_max = max(m, scores[start:end].max().item())
            p = (scores[start:end] - new_max).exp()
            alpha = math.exp(m - new_max)
            total = total * alpha + p.sum().item()
            acc = acc * alpha + p.float().bfloat16().double() @ v[start:end]
            unit = torch.exp2(torch.floor(torch.log2(p)) - 7)  # of bf16 at p (8 significant bits)
            tie = (p > 0) & ((p / unit).frac() - 0.5).abs().lt(2e-4)
            near_ties = near_ties * alpha + torch.where(tie, unit, 0.0) @ v[start:end].abs()
            m = new_max
        out[token, head], slack[token, head] = acc / total, near_ties / total
    return out, slack


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


def opcheck_ops() -> None:
    """``torch.library.opcheck`` on the three ops, through the dispatcher (whatever kernel serves CPU)."""
    case = make_case([3, 1], [9, 14])
    args = (case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, case.scale)
    plan_args = (case.k_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, case.q.shape[1], 3, 14)
    out = torch.empty_like(case.q)
    torch.library.opcheck(torch.ops.trellis.paged_attention.default, (*args, out, None))
    # A plan records the addresses of the tensors it was made for, and opcheck runs ops on copies
    # (a C++ plan refuses them): only the checks that can hold.
    plan_checks = ("test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.trellis.plan_paged_attention.default, plan_args, test_utils=plan_checks)
    plan = torch.ops.trellis.plan_paged_attention(*plan_args)
    torch.library.opcheck(
        torch.ops.trellis.paged_attention.default, (*args, out, plan), test_utils=("test_autograd_registration",)
    )
    k = torch.randn(5, 2, 16)
    slots = torch.randperm(case.k_cache.shape[0] * case.k_cache.shape[1])[:5]
    torch.library.opcheck(
        torch.ops.trellis.store_kv.default, (k, k.clone(), case.k_cache.clone(), case.v_cache.clone(), slots)
    )
