"""The decoder layers run directly over a packed batch: the lean path of ``run_decoder``.

transformers' Llama forward spends about 20 ms of a SmolLM2 decode step on CPU outside the
matmuls: per layer, its Python and some 40 small ATen ops (RMSNorm as six, rotate-half RoPE, the
attention function's transposes and copies, residual adds, SiLU and the product), each a
dispatcher call and often an OpenMP region. ``LeanDecoder`` walks ``model.model.layers`` itself
and runs, per layer, the seven linear layers as they are (``nn.Linear``, ``CPULinear``,
``QuantizedLinear``: weights, layouts and quantization unchanged; those that read one input in one
``quant_linear_group`` call where that kernel computes them all, ``_Projections``),
``run_attention`` with the step's plan, and three fused ops: ``add_rms_norm`` (twice),
``rope_store_kv`` and ``silu_mul``.
Each fused op rounds as transformers' modules do: in fp32 the results are transformers' bit for
bit, in bf16 and fp16 up to the order of the RMSNorm's sum of squares (docs/decode-step.md).

It runs only a model whose forward it reproduces exactly (``_check``: transformers' own Llama
classes, no hooks, no adapters, no overridden forward, SiLU, norms in the model's dtype, on the
CPU), and only for a step that asks for nothing else (no gradients, no hidden states or attention
weights). Anything else runs transformers' forward, so hooks and adapters keep working. The
verdict is cached: a step reads a registration count, a hook counter, the modules' hook counts,
classes and instance forwards, and a few settings (``_state``), and checks the model again when
any of them changed.
"""

from __future__ import annotations

from itertools import chain, repeat

import torch
from torch.utils.hooks import RemovableHandle
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from trellis import ops
from trellis.ops.checks import FUSED_DTYPES
from trellis.runner.attention import ATTN_IMPLEMENTATION
from trellis.runner.batch import PagedBatch
from trellis.runner.cpu_linear import CPULinear
from trellis.runner.quantized_linear import QuantizedLinear
from trellis.runner.weights_watcher import registration_count, watch_registrations

_LINEARS = (torch.nn.Linear, CPULinear, QuantizedLinear)  # called as they are; any other kind (adapters) is not
_NN = torch.nn.modules.module
_GLOBAL_HOOKS = (_NN._global_forward_hooks, _NN._global_forward_pre_hooks)


def _capture_hook(hook: object) -> bool:
    """transformers' output-capturing hook (installed for good once hidden states were asked for):
    it records only while a forward asks for outputs, and those forwards are not lean."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


class LeanDecoder:
    """The lean forward of one model's decoder (``model.model``), when the model is eligible."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._key: tuple | None = None  # what the verdict was reached on (``_state``)
        self._eligible = False
        self.checks = 0  # how often the model was checked (tests check it stays rare)
        self._layers: list[torch.nn.Module] = []  # the decoder layers a forward runs
        self._projections: list[tuple[_Projections, ...]] = []  # per layer: q/k/v, o, gate/up, down
        self._modules: list[torch.nn.Module] = []  # every module a lean forward runs or skips
        self._first_norm: dict = {}  # the first norm's parameters: ``_state`` reads the weights' dtype there
        self._module_dicts: list[dict] = []  # their __dict__s: a forward set on an instance lands there
        self._hook_tables: list[dict] = []  # their forward (pre-)hooks, and the global ones

    def run(self, batch: PagedBatch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """The decoder's final hidden states ``[T, H]`` over ``batch`` (its tokens, or
        ``inputs_embeds`` ``[T, H]``), or None where the lean path does not apply."""
        if torch.is_grad_enabled() or not self.eligible():
            return None
        decoder = self.model.model
        if inputs_embeds is None:
            if decoder.embed_tokens is None:
                return None
            hidden = decoder.embed_tokens(batch.input_ids)  # [T, H], a new tensor: the residual stream
        else:
            hidden = inputs_embeds.clone()  # the stream is updated in place; the caller's stays as it was
        cos, sin = decoder.rotary_emb(hidden[None], position_ids=batch.positions[None])  # each [1, T, D]
        cos, sin = cos[0], sin[0]
        backend = batch.plan.backend  # every op on the kernels attention runs on
        update = None  # what the last sublayer adds to the stream
        for layer, (qkv, o, gate_up, down) in zip(self._layers, self._projections):
            x = _norm(layer.input_layernorm, hidden, update, backend)  # [T, H]
            q, k, v = qkv(x, backend)
            update, = o(_attention(layer.self_attn, q, k, v, cos, sin, batch), backend)
            x = _norm(layer.post_attention_layernorm, hidden, update, backend)
            gate, up = gate_up(x, backend)
            update, = down(ops.silu_mul(gate, up, backend=backend), backend)
        if isinstance(decoder.norm, torch.nn.Identity):  # a grid stage before the last
            return hidden if update is None else hidden.add_(update)
        return _norm(decoder.norm, hidden, update, backend)

    # --- eligibility --------------------------------------------------------------------------

    def eligible(self) -> bool:
        """Whether the lean forward reproduces transformers' for this model now (cached)."""
        if self._key != self._state():
            self._eligible = self._check()
            self._key = self._state()
            self.checks += 1
        return self._eligible

    def _state(self) -> tuple:
        """What the verdict was reached on, in tens of µs on SmolLM2: the registration count (modules
        and parameters replaced, adapters injected), the hook handle counter and the number of
        hooks (a hook added anywhere, or removed here), the modules' classes, forwards set on
        instances, the settings a step reads, and the dtype and device of the weights (``.to()``)."""
        config = vars(self.model.config)
        weight = self._first_norm.get("weight")
        return (registration_count(), RemovableHandle.next_id, sum(map(len, self._hook_tables)),
                tuple(map(type, self._modules)), any(map(dict.__contains__, self._module_dicts, repeat("forward"))),
                config.get("output_hidden_states"), config.get("output_attentions"),
                config.get("_attn_implementation_internal"), config.get("num_hidden_layers"),
                None if weight is None else (weight.dtype, weight.device))

    def _check(self) -> bool:
        """List the modules a lean forward runs and check each is what it reproduces."""
        model, config = self.model, self.model.config
        decoder = getattr(model, "model", None)
        self._layers, self._modules, self._module_dicts, self._hook_tables, self._first_norm = [], [], [], [], {}
        self._projections = []
        if type(decoder) is not LlamaModel:
            return False
        layers = list(decoder.layers)[: config.num_hidden_layers]  # as transformers slices them
        modules = [m for layer in layers for m in layer.modules()] + [decoder, decoder.layers, decoder.rotary_emb,
                                                                      decoder.norm]
        if decoder.embed_tokens is not None:
            modules.append(decoder.embed_tokens)
        watch_registrations(modules)
        self._layers, self._modules, self._module_dicts = layers, modules, [vars(m) for m in modules]
        self._hook_tables = [*_GLOBAL_HOOKS, *chain.from_iterable((m._forward_hooks, m._forward_pre_hooks)
                                                                  for m in modules)]
        if not layers or not all(map(_stock_layer, layers)) or type(decoder.norm) not in (LlamaRMSNorm,
                                                                                           torch.nn.Identity):
            return False
        self._first_norm = layers[0].input_layernorm._parameters
        weight = self._first_norm["weight"]
        norms = [*chain.from_iterable((la.input_layernorm, la.post_attention_layernorm) for la in layers),
                 *([] if isinstance(decoder.norm, torch.nn.Identity) else [decoder.norm])]
        hooks = chain.from_iterable(table.values() for table in self._hook_tables)
        eligible = (
            config._attn_implementation == ATTN_IMPLEMENTATION
            and (getattr(config, "pretraining_tp", 1) or 1) <= 1
            and weight.device.type == "cpu"
            and weight.dtype in FUSED_DTYPES  # (fp64 runs transformers' forward)
            and all(n.weight.dtype == weight.dtype for n in norms)  # the fused ops take one dtype
            and type(decoder.rotary_emb) is LlamaRotaryEmbedding
            and type(decoder.embed_tokens) in (torch.nn.Embedding, type(None))
            and all(map(_capture_hook, hooks))
            and not any("forward" in d for d in self._module_dicts)
        )
        self._projections = [_projections_of(layer) for layer in layers] if eligible else []
        return eligible


def _stock_layer(layer: torch.nn.Module) -> bool:
    """A transformers Llama decoder layer as built, with linear layers of the kinds called as they are."""
    if type(layer) is not LlamaDecoderLayer or type(layer.self_attn) is not LlamaAttention \
            or type(layer.mlp) is not LlamaMLP or type(layer.mlp.act_fn) is not SiLUActivation:
        return False
    if type(layer.input_layernorm) is not LlamaRMSNorm or type(layer.post_attention_layernorm) is not LlamaRMSNorm:
        return False
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return all(type(linear) in _LINEARS for linear in linears)


def _projections_of(layer: torch.nn.Module) -> tuple[_Projections, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return (_Projections(attn.q_proj, attn.k_proj, attn.v_proj), _Projections(attn.o_proj),
            _Projections(mlp.gate_proj, mlp.up_proj), _Projections(mlp.down_proj))


def _norm(norm: LlamaRMSNorm, hidden: torch.Tensor, update: torch.Tensor | None, backend: str) -> torch.Tensor:
    """``hidden += update`` (the residual add), then ``norm(hidden)``."""
    return ops.add_rms_norm(hidden, update, norm.weight, norm.variance_epsilon, backend=backend)


def _attention(attn: LlamaAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """``LlamaAttention`` over the paged cache between its projections: ``q``, ``k``, ``v`` ``[T, heads
    * D]`` in, the input of ``o_proj`` ``[T, Hq * D]`` out."""
    tokens, head_dim = q.shape[0], attn.head_dim
    q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))  # [T, Hq, D], [T, Hkv, D], [T, Hkv, D]
    k_cache, v_cache = batch.kv_layers[attn.layer_idx]  # each [N, S, Hkv, D]
    plan = batch.plan
    q = ops.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, batch.slot_mapping, backend=plan.backend)
    out = ops.run_attention(plan, q, k_cache, v_cache, attn.scaling)  # [T, Hq, D]
    return out.view(tokens, -1)


def _blocks(linear: torch.nn.Module, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, str] | None:
    """The weight of ``linear`` as the blocks ``ops.quant_linear`` computes it from for ``x``, and
    their qtype; None where another kernel runs it (MKL, oneDNN, a bias)."""
    if type(linear) is QuantizedLinear:
        return (linear.weight_blocks, linear.qtype) if linear.bias is None else None
    if type(linear) is CPULinear:
        return linear.streamed_blocks(x, backend)
    return None


class _Projections:
    """Linear layers of a decoder layer that read one input (q/k/v; gate/up; o; down), as the lean
    path runs them: with the C++ backend, those that ``quant_linear`` computes (quantized layers;
    bf16 and fp32 layers streaming a decode step's rows) as one ``quant_linear_group`` call per qtype, which
    streams their weights in one parallel region (a GGUF may mix qtypes within a layer); the others
    by their own forward. Without ``nn.Module.__call__``: the lean path runs only where no hooks
    are set."""

    def __init__(self, *linears: torch.nn.Module) -> None:
        self.linears = linears

    def __call__(self, x: torch.Tensor, backend: str) -> list[torch.Tensor]:
        outputs: list[torch.Tensor | None] = [None] * len(self.linears)
        if backend == "cpp":
            by_qtype: dict[str, list[tuple[int, torch.Tensor]]] = {}
            for i, linear in enumerate(self.linears):
                found = _blocks(linear, x, backend)
                if found is not None:
                    by_qtype.setdefault(found[1], []).append((i, found[0]))
            for qtype, members in by_qtype.items():
                ys = ops.quant_linear_group(x, [blocks for _, blocks in members], qtype, backend=backend)
                for (i, _), y in zip(members, ys, strict=True):
                    outputs[i] = y
        return [linear.forward(x) if y is None else y for linear, y in zip(self.linears, outputs, strict=True)]
