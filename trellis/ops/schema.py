"""The op schema, defined with ``torch.library`` (shapes and semantics: ``reference.py``)::

    store_kv(k, v, k_cache!, v_cache!, slot_mapping)                                   new K/V into the cache
    paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, out!, plan=None)
    plan_paged_attention(k_cache, block_table, seq_lens, cu_seqlens_q, num_q_heads, max_q_len, max_kv_len,
                         batch_invariant=False)
        -> plan: what every layer of one forward shares, precomputed by the backend (a CPU int64
           tensor, opaque; empty where the backend needs none); batch_invariant (C++ only): each
           query row's output the same, bit for bit, in any batch (a decode step, a prefill)
    quant_linear(x, weight, qtype, quantize_x=False) -> y
                                                       x @ W^T, W in GGUF blocks (quant.py); x rounded
                                                       to 8-bit blocks first with quantize_x
    quant_linear_group(x, weights, qtype, quantize_x=False) -> ys
                                                       x @ W^T for each W (q/k/v, gate/up) in one call
    panel_linear(x, panels, bias, out_features) -> y   x @ W^T + bias, bf16 / fp32 W in panels (panels.py)
    panel_linear_group(x, panels, out_features) -> ys  x @ W^T for each bias-free W, in one call

and the small ops of a decoder layer, fused (a decode step makes ~40 of them per layer otherwise)::

    add_rms_norm(x!, residual, weight, eps) -> y        x += residual (if given); y = RMSNorm(x)
    rope_store_kv(q, k, v, cos, sin, k_cache!, v_cache!, slot_mapping) -> q_rotated
                                                        RoPE on q and k; rotated k and v into the cache
    silu_mul(gate, up) -> y                             silu(gate) * up

and, in ``trellis_cpp::`` alone, the lean decoder's loop over its layers in C++ (its spec is the
Python loop in ``trellis/runner/decoder.py``, which every backend can run)::

    decoder_layers(hidden!, norms, eps, cos, sin, k_caches!, v_caches!, slot_mapping, block_table,
                   seq_lens, cu_seqlens_q, plan, scale, weights, kinds, out_features, head_dim)
        -> update                                       every layer; the last sublayer's output

One schema text, two namespaces: ``trellis::``, the public ops, and ``trellis_cpp::``, which the
C++ library implements for CPU as it loads (its own namespace, so that loading it never collides
with a kernel registered for ``trellis::``). Both have fake implementations, so ``torch.compile``
and ``torch.library.opcheck`` work. The reference serves ``trellis::`` on every device
(CompositeExplicitAutograd) unless a kernel is registered for the device's dispatch key:
``backends.py`` registers one for CPU (the C++ kernels), the Triton backend for CUDA (attention
only: the linear ops and the decoder-layer ops run their reference there).
"""

from __future__ import annotations

import torch

from trellis.ops import panels, quant, reference

SCHEMAS = {
    "store_kv": "(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
    "paged_attention": (
        "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, Tensor cu_seqlens_q, "
        "float scale, Tensor(a!) out, Tensor? plan=None) -> ()"
    ),
    "plan_paged_attention": (
        "(Tensor k_cache, Tensor block_table, Tensor seq_lens, Tensor cu_seqlens_q, int num_q_heads, "
        "int max_q_len, int max_kv_len, bool batch_invariant=False) -> Tensor"
    ),
    "quant_linear": "(Tensor x, Tensor weight, str qtype, bool quantize_x=False) -> Tensor",
    "quant_linear_group": "(Tensor x, Tensor[] weights, str qtype, bool quantize_x=False) -> Tensor[]",
    "panel_linear": "(Tensor x, Tensor panels, Tensor? bias, int out_features) -> Tensor",
    "panel_linear_group": "(Tensor x, Tensor[] panels, int[] out_features) -> Tensor[]",
    "add_rms_norm": "(Tensor(a!) x, Tensor? residual, Tensor weight, float eps) -> Tensor",
    "rope_store_kv": (
        "(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> Tensor"
    ),
    "silu_mul": "(Tensor gate, Tensor up) -> Tensor",
}

# The C++ library's fast path only, no ``trellis::`` op (kernels/decoder_layers_cpu.cpp).
CPP_SCHEMAS = {
    "decoder_layers": (
        "(Tensor(a!) hidden, Tensor[] norms, float[] eps, Tensor cos, Tensor sin, Tensor(b!)[] k_caches, "
        "Tensor(c!)[] v_caches, Tensor slot_mapping, Tensor block_table, Tensor seq_lens, Tensor cu_seqlens_q, "
        "Tensor? plan, float scale, Tensor[] weights, str[] kinds, int[] out_features, int head_dim) -> Tensor"
    ),
}


def _store_kv_fake(k, v, k_cache, v_cache, slot_mapping) -> None:
    return None


def _paged_attention_fake(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, out, plan=None) -> None:
    return None


def _plan_paged_attention_fake(k_cache, block_table, seq_lens, cu_seqlens_q, num_q_heads, max_q_len, max_kv_len,
                               batch_invariant=False):
    # Its length depends on the values of the sequence tensors.
    return torch.empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


def _quant_linear_fake(x, weight, qtype, quantize_x=False):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _quant_linear_group_fake(x, weights, qtype, quantize_x=False):
    return [_quant_linear_fake(x, weight, qtype) for weight in weights]


def _panel_linear_fake(x, panels, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _panel_linear_group_fake(x, panels, out_features):
    return [_panel_linear_fake(x, p, None, n) for p, n in zip(panels, out_features, strict=True)]


def _add_rms_norm_fake(x, residual, weight, eps):
    return x.new_empty(x.shape)


def _rope_store_kv_fake(q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
    return q.new_empty(q.shape)


def _silu_mul_fake(gate, up):
    return gate.new_empty(gate.shape)


def _decoder_layers_fake(hidden, norms, eps, cos, sin, k_caches, v_caches, slot_mapping, block_table, seq_lens,
                         cu_seqlens_q, plan, scale, weights, kinds, out_features, head_dim):
    return hidden.new_empty(hidden.shape)


_FAKES = {
    "store_kv": _store_kv_fake,
    "paged_attention": _paged_attention_fake,
    "plan_paged_attention": _plan_paged_attention_fake,
    "quant_linear": _quant_linear_fake,
    "quant_linear_group": _quant_linear_group_fake,
    "panel_linear": _panel_linear_fake,
    "panel_linear_group": _panel_linear_group_fake,
    "add_rms_norm": _add_rms_norm_fake,
    "rope_store_kv": _rope_store_kv_fake,
    "silu_mul": _silu_mul_fake,
    "decoder_layers": _decoder_layers_fake,
}
REFERENCES = {"store_kv": reference.store_kv, "paged_attention": reference.paged_attention,
               "plan_paged_attention": reference.plan_paged_attention, "quant_linear": quant.quant_linear,
               "quant_linear_group": quant.quant_linear_group, "panel_linear": panels.panel_linear,
               "panel_linear_group": panels.panel_linear_group,
               "add_rms_norm": reference.add_rms_norm, "rope_store_kv": reference.rope_store_kv,
               "silu_mul": reference.silu_mul}


def _meta_among_real_refused(name: str, fake):
    """``fake``, refusing a meta tensor among real ones: such a call dispatches to the fake kernel
    (Meta wins), where the real one would never run and the outputs would hold nothing."""

    def checked(*args, **kwargs):
        tensors = [item for argument in (*args, *kwargs.values())
                   for item in (argument if isinstance(argument, (list, tuple)) else (argument,))
                   if isinstance(item, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if "meta" in devices and len(devices) > 1:
            raise ValueError(f"{name}: a meta tensor among {sorted(devices - {'meta'})} ones: every tensor must be "
                             "on one device")
        return fake(*args, **kwargs)

    return checked


_SCHEMAS_OF = {"trellis": SCHEMAS, "trellis_cpp": {**SCHEMAS, **CPP_SCHEMAS}}  # each namespace's ops
_libraries = {namespace: torch.library.Library(namespace, "DEF") for namespace in _SCHEMAS_OF}
for _namespace, _library in _libraries.items():
    for _name, _schema in _SCHEMAS_OF[_namespace].items():
        _library.define(_name + _schema)
        torch.library.register_fake(f"{_namespace}::{_name}", _meta_among_real_refused(_name, _FAKES[_name]), lib=_library)
for _name in SCHEMAS:
    _libraries["trellis"].impl(_name, REFERENCES[_name], "CompositeExplicitAutograd")
