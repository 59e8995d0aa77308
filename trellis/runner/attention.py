"""The ``"trellis"`` attention function, registered with transformers.

transformers looks attention up by name; plugging in here keeps its Llama model unchanged. The
function writes the step's new K/V into the paged cache and attends over each sequence's blocks
with the kernels the step planned once. A forward that records gradients takes a differentiable
path instead (PyTorch's SDPA per sequence), since the paged kernels write into preallocated
buffers that autograd cannot see through.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from transformers.modeling_utils import AttentionInterface

from trellis import ops
from trellis.runner.batch import PagedBatch

ATTN_IMPLEMENTATION = "trellis"


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, Hq, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    paged_batch: PagedBatch | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if paged_batch is None:
        raise RuntimeError(
            "the 'trellis' attention needs the PagedBatch that PagedModelRunner builds; "
            "call the model through TrellisLlama, or load it with another attn_implementation"
        )
    q = query[0].transpose(0, 1).contiguous()  # [T, Hq, D]: the attention kernels read it packed
    k = key[0].transpose(0, 1)  # [T, Hkv, D] views: store_kv takes any strides (a copy less a layer)
    v = value[0].transpose(0, 1)
    k_cache, v_cache = paged_batch.kv_layers[module.layer_idx]  # each [N, S, Hkv, D]
    plan = paged_batch.plan
    ops.store_kv(k.detach(), v.detach(), k_cache, v_cache, paged_batch.slot_mapping, backend=plan.backend)
    # transformers passes a dropout rate in training only: the paged kernels apply none.
    if dropout > 0 or torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out = differentiable_attention(q, k, v, k_cache, v_cache, paged_batch, scaling, dropout)
    else:
        out = ops.run_attention(plan, q, k_cache, v_cache, scaling)
    return out.unsqueeze(0), None  # [1, T, Hq, D]


def differentiable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, batch: PagedBatch, scale: float, dropout: float) -> torch.Tensor:
    """Attention of each sequence's new queries over its keys, as autograd can follow: the new
    K/V ``[T, Hkv, D]`` as computed, the cached ones before them (read from the cache, constants)."""
    outputs = []
    cu, seq_lens = batch.host_cu_seqlens_q, batch.host_seq_lens
    block_size = k_cache.shape[1]
    for i, kv_len in enumerate(seq_lens):
        start, end = cu[i], cu[i + 1]
        past = kv_len - (end - start)
        keys, values = k[start:end], v[start:end]  # [q_len, Hkv, D]
        if past:
            _warn_cached_keys_are_constants()
            pos = torch.arange(past, device=k_cache.device)
            slots = batch.block_table[i, pos // block_size].long() * block_size + pos % block_size  # [past]
            keys = torch.cat([k_cache.flatten(0, 1)[slots], keys])  # [kv_len, Hkv, D]
            values = torch.cat([v_cache.flatten(0, 1)[slots], values])
        # Bottom-right causal: query j sees keys 0 .. past + j.
        mask = torch.ones(end - start, kv_len, dtype=torch.bool, device=q.device).tril(past)
        out = F.scaled_dot_product_attention(q[start:end].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                                             attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=True)
        outputs.append(out.transpose(0, 1))  # [q_len, Hq, D]
    return torch.cat(outputs)


_warned = False


def _warn_cached_keys_are_constants() -> None:
    global _warned
    if not _warned:
        warnings.warn("trellis: a forward that records gradients continues a cached session; gradients do not flow "
                      "into the K/V that earlier forwards cached (run the whole sequence in one forward to train)",
                      stacklevel=4)
        _warned = True


# No mask function is registered on purpose: masking is implicit in the paged batch (bottom-right
# causal per sequence, padding dropped before packing), and an attention implementation without
# one makes transformers skip mask preparation altogether (which else costs ~0.15 ms a forward).
AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
