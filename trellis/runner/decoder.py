"""The decoder layers run directly over a packed batch: the lean path of ``run_decoder``.

transformers' Llama forward spends about 20 ms of a SmolLM2 decode step on CPU outside the
matmuls: per layer, its Python and some 40 small ATen ops (RMSNorm as six, rotate-half RoPE, the
attention function's transposes and copies, residual adds, SiLU and the product), each a
dispatcher call and often an OpenMP region. ``LeanDecoder`` walks ``model.model.layers`` itself
and runs, per layer, the seven linear layers as they are (``nn.Linear``, ``CPULinear``,
``QuantizedLinear``: weights, layouts and quantization unchanged; those that read one input in one
``quant_linear_group`` call where that kernel computes them all, ``_Projections``),
``run_attention`` with the step's plan, and three fused ops: ``add_rms_norm`` (twice),
``rope_store_kv`` and ``silu_mul``. Where every projection is one C++ group call (Trellis' panels
or quantized blocks), bias-free ``F.linear`` on the BLAS (which C++ calls as ``at::linear``) or
oneDNN's matmul (``mkldnn::_linear_pointwise``), the layer loop
itself runs in C++ (``trellis_cpp::decoder_layers``: the same calls, without the Python between
them; ``_cpp_loop_arguments``).
Each fused op rounds as transformers' modules do: in fp32 the results are transformers' bit for
bit, in bf16 and fp16 up to the order of the RMSNorm's sum of squares (docs/decode-step.md).

It runs only a model whose forward it reproduces exactly (``_check``: transformers' own Llama
classes, no hooks, no adapters, no overridden forward, SiLU, norms and embedding in one dtype, on the
CPU), and only for a step that asks for nothing else (no gradients, no hidden states or attention
weights) over inputs in the weights' dtype. Anything else runs transformers' forward, so hooks
and adapters keep working. The verdict is cached: a step reads a registration count, the
modules' ``ModelStructure`` (their hooks, classes, instance forwards, containers' members) and a
few settings (``_state``), and checks the model again when any of them changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain

import torch
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
from trellis.ops.backends import kernels
from trellis.ops.checks import FUSED_DTYPES
from trellis.runner import cpu_linear
from trellis.runner.attention import ATTN_IMPLEMENTATION
from trellis.runner.batch import PagedBatch
from trellis.runner.cpu_linear import CPULinear
from trellis.runner.quantized_linear import QuantizedLinear
from trellis.runner.weights_watcher import ModelStructure, registration_count, watch_registrations

_LINEARS = (torch.nn.Linear, CPULinear, QuantizedLinear)  # called as they are; any other kind (adapters) is not


class LeanDecoder:
    """The lean forward of one model's decoder (``model.model``), when the model is eligible."""

    def __init__(self, model: torch.nn.Module, weights_state: Callable[[], int]) -> None:
        self.model = model
        # The runner's weights watcher's state (``checked_weights_state``): it changes with any
        # weight the C++ loop's lists hold.
        self._weights_state = weights_state
        # The C++ loop's per-layer arguments that outlast a step, by kind of input (a decode step's
        # rows, a prefill's), and what they were listed on (``_cpp_loop_arguments``): listing them
        # checks ~200 layers' kernels, ~1 ms a SmolLM2 step.
        self._loop_stamp: tuple | None = None
        self._loop_layers: dict[tuple, _LoopLayers | None] = {}
        self._key: tuple | None = None  # what the verdict was reached on (``_state``)
        self._eligible = False
        self.checks = 0  # how often the model was checked (tests check it stays rare)
        self._lean_layers: list[_LeanLayer] = []  # the decoder layers a forward runs, as it calls them
        self._structure = ModelStructure()  # every module a lean forward runs or skips
        self._first_norm: dict = {}  # the first norm's parameters: ``_state`` reads the weights' device there
        self._dtype_parameters: list[dict] = []  # the norms' and the embedding's: ``_state`` reads their dtypes
        self._stock = False  # the decoder is transformers' as built (``stock``)

    def run(self, batch: PagedBatch, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """The decoder's final hidden states ``[T, H]`` over ``batch`` (its tokens, or
        ``inputs_embeds`` ``[T, H]``), or None where the lean path does not apply."""
        if torch.is_grad_enabled() or not self.eligible():
            return None
        if inputs_embeds is not None and inputs_embeds.dtype != self._first_norm["weight"].dtype:
            return None  # transformers' modules promote as they go (RMSNorm rounds to its input's dtype)
        decoder = self.model.model
        if inputs_embeds is None:
            if decoder.embed_tokens is None:
                return None
            hidden = decoder.embed_tokens(batch.input_ids)  # [T, H], a new tensor: the residual stream
        else:
            hidden = inputs_embeds.clone()  # the stream is updated in place; the caller's stays as it was
        cos, sin = decoder.rotary_emb(hidden[None], position_ids=batch.positions[None])  # each [1, T, D]
        cos, sin = cos[0], sin[0]
        run = ops.decoder_ops(batch.plan.backend)  # the layer's ops on the kernels attention runs on
        arguments = self._cpp_loop_arguments(hidden, cos, sin, batch) if run.backend == "cpp" else None
        if arguments is not None:  # the loop below, in C++
            update = kernels("cpp").decoder_layers(*arguments)
        else:
            update = None  # what the last sublayer adds to the stream
            for layer in self._lean_layers:
                x = _norm(layer.input_norm, hidden, update, run)  # [T, H]
                q, k, v = layer.qkv(x, run)
                update, = layer.o(_attention(layer.attn, q, k, v, cos, sin, batch, run), run)
                x = _norm(layer.post_norm, hidden, update, run)
                gate, up = layer.gate_up(x, run)
                update, = layer.down(run.silu_mul(gate, up), run)
        if isinstance(decoder.norm, torch.nn.Identity):  # a grid stage before the last
            return hidden if update is None else hidden.add_(update)
        return _norm(decoder.norm, hidden, update, run)

    def _cpp_loop_arguments(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            batch: PagedBatch) -> tuple | None:
        """The arguments of ``trellis_cpp::decoder_layers``, which runs the layer loop of ``run`` in
        C++, where every projection of every layer is one C++ group call in its layers' order and the
        layers share a head_dim and attention scale; else None (the loop runs in Python).

        The layers' part is listed once per kind of input (``cpu_linear.kernel_choice`` and the
        dtype: a decode step's rows and a prefill's alternate in serving), and again after
        anything it was listed on may have changed: the weights, settings and modules (the
        weights watcher's state, as the step's cache check read it), the kinds of the linear
        layers and their packed copies (``cpu_linear.choices_changed``), the model's eligibility."""
        rows, dtype = hidden.shape[0], hidden.dtype
        stamp = (self._weights_state(), cpu_linear.choices_changed(), self.checks)
        if stamp != self._loop_stamp:
            self._loop_layers.clear()  # (its lists hold the old weights and packed copies alive)
            self._loop_stamp = stamp
        kind = (cpu_linear.kernel_choice(rows, dtype), dtype)
        if kind not in self._loop_layers:
            self._loop_layers[kind] = self._list_loop_layers(rows, dtype)
        layers = self._loop_layers[kind]
        if layers is None:
            return None
        kv = batch.kv_layers
        k_caches = [kv[i][0] for i in layers.kv_ids]
        v_caches = [kv[i][1] for i in layers.kv_ids]
        plan = batch.plan
        return (hidden, layers.norms, layers.eps, cos, sin, k_caches, v_caches, batch.slot_mapping, plan.block_table,
                plan.seq_lens, plan.cu_seqlens_q, plan.backend_plan, layers.scale, layers.weights, layers.kinds,
                layers.widths, layers.head_dim)

    def _list_loop_layers(self, rows: int, dtype: torch.dtype) -> _LoopLayers | None:
        """The layers' arguments of the C++ loop for an input of ``rows`` rows in ``dtype``; None
        where a projection is not one group call or the layers differ in head_dim or scale."""
        attns = [layer.attn for layer in self._lean_layers]
        head_dim, scale = attns[0].head_dim, attns[0].scaling
        listed = _LoopLayers(head_dim=head_dim, scale=scale)
        for layer, attn in zip(self._lean_layers, attns, strict=True):
            if attn.head_dim != head_dim or attn.scaling != scale:
                return None
            for norm in (layer.input_norm, layer.post_norm):
                listed.norms.append(norm._parameters["weight"])
                listed.eps.append(norm.variance_epsilon)
            listed.kv_ids.append(attn.layer_idx)
            for projections in (layer.qkv, layer.o, layer.gate_up, layer.down):
                group = projections.one_group(rows, dtype)
                if group is None:
                    return None
                listed.kinds.append(group[0])
                listed.weights += group[1]
                listed.widths += projections.out_features
        return listed

    # --- eligibility --------------------------------------------------------------------------

    def eligible(self) -> bool:
        """Whether the lean forward reproduces transformers' for this model now (cached)."""
        if self._key != self._state():
            self._eligible = self._check()
            self._key = self._state()
            self.checks += 1
        return self._eligible

    def stock(self) -> bool:
        """Whether the decoder is transformers' Llama as built, on any device and dtype: its own
        classes, with linear layers called as they are, no hooks, no forwards set on instances
        (so a step runs its modules' ops and nothing beside them: what a CUDA graph replays)."""
        self.eligible()  # the verdict, checked again where anything it was reached on changed
        return self._stock

    def modules_state(self) -> tuple:
        """The modules as the last verdict saw them (``stock`` checks it is current): the
        registration count and their structure. A CUDA graph recorded over a stock decoder stays
        valid while these hold, whatever ``num_hidden_layers`` says (an early-exit drafter lowers it
        for its drafts, then restores it)."""
        return self._key[:2]

    def _state(self) -> tuple:
        """What the verdict was reached on, in tens of µs on SmolLM2: the registration count (modules
        and parameters replaced, adapters injected), the modules' structure (hooks, classes,
        forwards set on instances, containers' members) (these two first: ``modules_state``), the
        settings a step reads, and the device of the weights and the dtypes of the norms and the
        embedding (``.to()``, of the whole model or of some modules)."""
        config = vars(self.model.config)
        weight = self._first_norm.get("weight")
        return (registration_count(), self._structure.state(),
                config.get("output_hidden_states"), config.get("output_attentions"),
                config.get("_attn_implementation_internal"), config.get("num_hidden_layers"),
                None if weight is None else weight.device, tuple(p["weight"].dtype for p in self._dtype_parameters))

    def _check(self) -> bool:
        """List the modules a lean forward runs and check each is what it reproduces."""
        model, config = self.model, self.model.config
        decoder = getattr(model, "model", None)
        self._lean_layers, self._first_norm, self._dtype_parameters, self._stock = [], {}, [], False
        self._structure.watch([])
        if type(decoder) is not LlamaModel:
            return False
        layers = list(decoder.layers)[: config.num_hidden_layers]  # as transformers slices them
        # Every layer's modules watched, those a forward skips too: a forward over fewer layers (an
        # early-exit draft) then sees the modules as a whole forward does (``modules_state``).
        modules = [m for layer in decoder.layers for m in layer.modules()] + [decoder, decoder.layers,
                                                                              decoder.rotary_emb, decoder.norm]
        if decoder.embed_tokens is not None:
            modules.append(decoder.embed_tokens)
        watch_registrations(modules)
        self._structure.watch(modules)
        if not layers or not all(map(_stock_layer, layers)) or type(decoder.norm) not in (LlamaRMSNorm,
                                                                                           torch.nn.Identity):
            return False
        self._first_norm = layers[0].input_layernorm._parameters
        weight = self._first_norm["weight"]
        norms = [*chain.from_iterable((la.input_layernorm, la.post_attention_layernorm) for la in layers),
                 *([] if isinstance(decoder.norm, torch.nn.Identity) else [decoder.norm])]
        # The residual stream's dtype is the embedding's; transformers' norms promote it to theirs.
        # (An embedding of another kind, PEFT's or a parametrized one, has no "weight" there: not stock.)
        self._dtype_parameters = [n._parameters for n in norms] + (
            [decoder.embed_tokens._parameters] if type(decoder.embed_tokens) is torch.nn.Embedding else [])
        self._stock = (
            config._attn_implementation == ATTN_IMPLEMENTATION
            and (getattr(config, "pretraining_tp", 1) or 1) <= 1
            and type(decoder.rotary_emb) is LlamaRotaryEmbedding
            and type(decoder.embed_tokens) in (torch.nn.Embedding, type(None))
            and not self._structure.hooks()
            and not any(self._structure.instance_forwards())
        )
        eligible = (
            self._stock
            and weight.device.type == "cpu"
            and weight.dtype in FUSED_DTYPES  # (fp64 runs transformers' forward)
            and all(p["weight"].dtype == weight.dtype for p in self._dtype_parameters)  # the fused ops take one dtype
        )
        self._lean_layers = [_LeanLayer(layer) for layer in layers] if eligible else []
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


class _LeanLayer:
    """A decoder layer's modules as the lean path calls them, looked up once per verdict (a module
    replaced is a registration, which makes ``eligible`` check the model again)."""

    def __init__(self, layer: LlamaDecoderLayer) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm, self.attn = layer.input_layernorm, layer.post_attention_layernorm, attn
        self.qkv = _Projections(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = _Projections(attn.o_proj)
        self.gate_up = _Projections(mlp.gate_proj, mlp.up_proj)
        self.down = _Projections(mlp.down_proj)


def _norm(norm: LlamaRMSNorm, hidden: torch.Tensor, update: torch.Tensor | None, run: ops.DecoderOps) -> torch.Tensor:
    """``hidden += update`` (the residual add), then ``norm(hidden)``."""
    return run.add_rms_norm(hidden, update, norm.weight, norm.variance_epsilon)


def _attention(attn: LlamaAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, batch: PagedBatch, run: ops.DecoderOps) -> torch.Tensor:
    """``LlamaAttention`` over the paged cache between its projections: ``q``, ``k``, ``v`` ``[T, heads
    * D]`` in, the input of ``o_proj`` ``[T, Hq * D]`` out."""
    tokens, head_dim = q.shape[0], attn.head_dim
    q, k, v = q.view(tokens, -1, head_dim), k.view(tokens, -1, head_dim), v.view(tokens, -1, head_dim)
    k_cache, v_cache = batch.kv_layers[attn.layer_idx]  # each [N, S, Hkv, D]
    q = run.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, batch.slot_mapping)  # [T, Hq, D]
    return ops.run_attention(batch.plan, q, k_cache, v_cache, attn.scaling).view(tokens, -1)


@dataclass
class _LoopLayers:
    """The arguments of ``trellis_cpp::decoder_layers`` that depend on the layers, not the step:
    per layer its two norms' weights and eps, where its K/V live in the pool (``layer_idx``),
    and its four group calls (kind, weights, output widths)."""

    head_dim: int
    scale: float
    norms: list[torch.Tensor] = field(default_factory=list)
    eps: list[float] = field(default_factory=list)
    kv_ids: list[int] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)


PANELS = "panels"  # a group's kind where ``panel_linear_group`` computes it (else a ``quant_linear`` qtype)
LINEAR = "linear"  # where each layer's own forward is bias-free ``F.linear``: the C++ loop calls ``at::linear``
ONEDNN = "onednn"  # where it is oneDNN's matmul without a bias: the C++ loop calls ``mkldnn::_linear_pointwise``
# Follows the qtype of a quantized group whose layers round x to 8-bit blocks (``q8_activations``);
# kernels/decoder_layers_cpu.cpp reads it so.
Q8_X = "@q8"


class _Projections:
    """Linear layers of a decoder layer that read one input (q/k/v; gate/up; o; down), as the lean
    path runs them: with the C++ backend, those that ``quant_linear`` computes (bias-free quantized
    layers; bf16 and fp32 layers streaming a decode step's rows) as one ``quant_linear_group`` call
    per qtype, which streams their weights in one parallel region (a GGUF may mix qtypes within a
    layer), bias-free bf16 and fp32 layers on panels as one ``panel_linear_group`` call; the others
    by their own forward, which for bias-free layers on the BLAS (``LINEAR``: ``F.linear``) or oneDNN
    (``ONEDNN``: its matmul) the C++ layer loop makes as ``at::linear`` or
    ``mkldnn::_linear_pointwise``. Without ``nn.Module.__call__``: the lean path runs only where no
    hooks are set."""

    def __init__(self, *linears: torch.nn.Module) -> None:
        self.linears = linears
        self.out_features = [linear.out_features for linear in linears]
        # Bias-free quantized layers always stream (a bias or the blocks replaced is a registration,
        # and makes the lean path list its layers again), grouped by qtype and by whether they
        # round x (``q8_activations``, read at each call: a setting, not a registration).
        self.quantized = [i for i, linear in enumerate(linears) if type(linear) is QuantizedLinear and linear.bias is None]
        # bf16 and fp32 layers stream a decode step's rows only, which each call checks.
        self.plain = [i for i, linear in enumerate(linears) if type(linear) is CPULinear]
        self.all = list(range(len(linears)))

    def groups(self, rows: int, dtype: torch.dtype) -> list[tuple[str, list[int], list[torch.Tensor]]]:
        """The C++ group calls that compute these layers for an inference input of ``rows`` rows in
        ``dtype``: each its kind (``PANELS``, ``LINEAR``, ``ONEDNN`` or a qtype, ``Q8_X`` after it where
        the layers round x), its members (indices into
        ``linears``) and their weights as the call takes them. A layer in none runs its own forward."""
        linears = self.linears
        groups: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        for i in self.quantized:
            linear = linears[i]
            members, weights = groups.setdefault(linear.qtype + Q8_X if linear.q8_activations else linear.qtype, ([], []))
            members.append(i)
            weights.append(linear._buffers["weight_blocks"])
        for i in self.plain:
            found = linears[i].streamed_weight(rows, dtype, "cpp")
            kind, weight = (found[1], found[0]) if found is not None else (PANELS, linears[i].grouped_panels(dtype))
            if weight is None:
                kind, weight = LINEAR, linears[i].linear_weight(dtype)
            if weight is None:
                kind, weight = ONEDNN, linears[i].onednn_weight(dtype)
            if weight is not None:
                members, weights = groups.setdefault(kind, ([], []))
                members.append(i)
                weights.append(weight)
        return [(kind, members, weights) for kind, (members, weights) in groups.items()]

    def one_group(self, rows: int, dtype: torch.dtype) -> tuple[str, list[torch.Tensor]] | None:
        """(kind, weights) where one group call computes all these layers, in their order; else None."""
        groups = self.groups(rows, dtype)
        if len(groups) != 1 or groups[0][1] != self.all:
            return None
        return groups[0][0], groups[0][2]

    def __call__(self, x: torch.Tensor, run: ops.DecoderOps) -> list[torch.Tensor]:
        linears = self.linears
        if run.backend != "cpp":
            return [linear.forward(x) for linear in linears]
        outputs: list[torch.Tensor | None] = [None] * len(linears)
        for kind, members, weights in self.groups(x.numel() // x.shape[-1], x.dtype):
            if kind in (LINEAR, ONEDNN):
                continue  # each layer's own forward, below
            if kind == PANELS:
                ys = run.panel_linear_group(x, weights, [self.out_features[i] for i in members])
            else:
                ys = run.quant_linear_group(x, weights, kind.removesuffix(Q8_X), kind.endswith(Q8_X))
            for i, y in zip(members, ys, strict=True):
                outputs[i] = y
        return [linear.forward(x) if y is None else y for linear, y in zip(linears, outputs, strict=True)]
