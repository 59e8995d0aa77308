"""Paged KV ops: one schema, three backends (``reference``, ``cpp``, ``triton``), chosen by device.

    store_kv(k, v, k_cache, v_cache, slot_mapping)                       new K/V into the paged cache
    plan = plan_attention(block_table, seq_lens, cu_seqlens_q, ...)      once per forward
    out = run_attention(plan, q, k_cache, v_cache, scale)                in every layer
    out = paged_attention(q, k_cache, v_cache, block_table, ...)         plan and run, in one call
    y = quant_linear(x, weight, qtype, quantize_x=False)                 x @ W^T, W in GGUF blocks (x in 8 bits)
    ys = quant_linear_group(x, weights, qtype, quantize_x=False)         x @ W^T for each W, one call
    y = panel_linear(x, panels, bias, out_features)                      x @ W^T + bias, bf16/fp32 W in panels
    ys = panel_linear_group(x, panels, out_features)                     each bias-free W, one call
    y = add_rms_norm(x, residual, weight, eps)                           x += residual; RMSNorm(x)
    q = rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping) RoPE, then store_kv
    y = silu_mul(gate, up)                                               silu(gate) * up
    ops = decoder_ops(backend)                                           the last five, resolved once

The modules: ``api`` (these calls), ``schema`` (the ``torch.library`` ops, ``torch.ops.trellis.*``),
``checks``, ``backends`` (the registry), ``reference`` (the spec: shapes and semantics), ``quant``
(GGUF block formats and their spec), ``panels`` (bf16 and fp32 weights packed in panels), ``cpp``,
``triton``. Importing builds and loads nothing: a backend loads on first use.
"""

from trellis.ops.api import (
    AttentionPlan,
    DecoderOps,
    add_rms_norm,
    decoder_ops,
    paged_attention,
    panel_linear,
    panel_linear_group,
    plan_attention,
    quant_linear,
    quant_linear_group,
    rope_store_kv,
    run_attention,
    silu_mul,
    store_kv,
)
from trellis.ops.backends import (
    BACKENDS,
    check_backend,
    default_backend,
    fits_head_dim,
    forced_backend,
    load_backend,
    resolve_backend,
)

__all__ = [
    "BACKENDS",
    "AttentionPlan",
    "DecoderOps",
    "add_rms_norm",
    "check_backend",
    "decoder_ops",
    "default_backend",
    "fits_head_dim",
    "forced_backend",
    "load_backend",
    "paged_attention",
    "panel_linear",
    "panel_linear_group",
    "plan_attention",
    "quant_linear",
    "quant_linear_group",
    "resolve_backend",
    "rope_store_kv",
    "run_attention",
    "silu_mul",
    "store_kv",
]
