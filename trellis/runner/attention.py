"""The ``"trellis"`` attention function, registered with transformers.

transformers looks attention up by name; plugging in here keeps its Llama model unchanged.
"""

from __future__ import annotations

import torch
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
    q = query[0].transpose(0, 1).contiguous()  # [T, Hq, D]
    k = key[0].transpose(0, 1).contiguous()  # [T, Hkv, D]
    v = value[0].transpose(0, 1).contiguous()  # [T, Hkv, D]
    k_cache, v_cache = paged_batch.kv_layers[module.layer_idx]  # each [N, S, Hkv, D]
    ops.store_kv(k, v, k_cache, v_cache, paged_batch.slot_mapping, backend=paged_batch.backend)
    out = ops.paged_attention(
        q,
        k_cache,
        v_cache,
        paged_batch.block_table,
        paged_batch.seq_lens,
        paged_batch.cu_seqlens_q,
        scaling,
        backend=paged_batch.backend,
    )
    return out.unsqueeze(0), None  # [1, T, Hq, D]


# No mask function is registered on purpose: masking is implicit in the paged batch (bottom-right
# causal per sequence, padding dropped before packing), and an attention implementation without
# one makes transformers skip mask preparation altogether (which else costs ~0.15 ms a forward).
AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
