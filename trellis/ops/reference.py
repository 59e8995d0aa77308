"""The pure-PyTorch paged attention: the specification, the test oracle and the MPS path.

Shapes (T packed query tokens, B sequences, N blocks of S tokens):
  q, out            [T, Hq, D]
  k_cache, v_cache  [N, S, Hkv, D]
  block_table       [B, max_blocks] int32   block ids of each sequence, in order
  seq_lens          [B] int32               K/V length of each sequence after this step
  cu_seqlens_q      [B+1] int32             query tokens of sequence i are q[cu[i]:cu[i+1]]
  slot_mapping      [T] int64               where token t's K/V go: block * S + offset

Masking is bottom-right causal: query i of a sequence with q_len new tokens and kv_len keys
sees keys 0 .. kv_len - q_len + i. Scores, softmax and P @ V are computed in fp32 (in fp64 for fp64 inputs).

A plan (``plan_paged_attention``) only saves a backend work that every layer of a forward would
repeat; the reference needs none, and ignores one.
"""

from __future__ import annotations

import torch

from trellis.ops.checks import refuse_batch_invariant
from trellis.utils import cdiv


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_blocks, block_size = k_cache.shape[:2]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


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
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    cu = cu_seqlens_q.tolist()
    compute = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for a float64 model
    for i, kv_len in enumerate(seq_lens.tolist()):
        q_start, q_end = cu[i], cu[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        blocks = block_table[i, : cdiv(kv_len, block_size)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len].to(compute)  # [L, Hkv, D]
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:kv_len].to(compute)  # [L, Hkv, D]
        qi = q[q_start:q_end].to(compute).view(q_len, num_kv_heads, group, head_dim)  # [Q, Hkv, G, D]
        scores = torch.einsum("qhgd,khd->hgqk", qi, k) * scale  # [Hkv, G, Q, L]
        query_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
        key_pos = torch.arange(kv_len, device=q.device)
        scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
        probs = scores.softmax(dim=-1)
        o = torch.einsum("hgqk,khd->qhgd", probs, v)  # [Q, Hkv, G, D]
        out[q_start:q_end] = o.reshape(q_len, -1, head_dim).to(out.dtype)


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
    refuse_batch_invariant(batch_invariant)
    return torch.empty(0, dtype=torch.int64)  # no plan


# --- the small ops of a decoder layer, as transformers' Llama modules compute them -----------------
# (x, residual [T, H]; q [T, Hq, D]; k, v [T, Hkv, D]; cos, sin [T, D] as LlamaRotaryEmbedding makes them)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += residual`` in place (if given), then LlamaRMSNorm of ``x``, its dtype casts included."""
    if residual is not None:
        x.add_(residual)
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return weight * (hidden * torch.rsqrt(variance + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """RoPE (``apply_rotary_pos_emb``) on ``q`` and ``k``; the rotated ``k`` and ``v`` written into
    the caches at ``slot_mapping`` (``store_kv``). Returns the rotated ``q``, contiguous."""
    cos, sin = cos[:, None], sin[:, None]  # [T, 1, D]: one rotation per token, every head
    store_kv(k * cos + _rotate_half(k) * sin, v, k_cache, v_cache, slot_mapping)
    return (q * cos + _rotate_half(q) * sin).contiguous()


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, LlamaMLP's activation."""
    return torch.nn.functional.silu(gate) * up
