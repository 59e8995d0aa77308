"""The calls Trellis makes: ``store_kv``; ``plan_attention`` once per forward and ``run_attention``
in every layer (FlashInfer's plan/run split); ``paged_attention``, both in one call;
``quant_linear``, a linear layer over GGUF-quantized weights (``quant.py``), and
``quant_linear_group``, several over one input; ``panel_linear``, a bf16 or fp32 linear layer over
weights packed in panels for the vector units (``panels.py``); and the fused small ops of a decoder layer,
``add_rms_norm``, ``rope_store_kv`` and ``silu_mul``, which ``decoder_ops`` also gives, with
``quant_linear_group``, resolved for one backend (the lean decoder's per-layer calls).

Each resolves the backend (``backends.py``), checks what the backend does not check itself (the
reference checks nothing: ``checks.py`` does it here), and calls the backend's op function.
Shapes and semantics: ``reference.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trellis.ops import panels as panel_spec
from trellis.ops import quant, reference
from trellis.ops.backends import kernels, resolve_backend
from trellis.ops.checks import (
    check_add_rms_norm,
    check_paged_attention,
    check_plan,
    check_rope_store_kv,
    check_silu_mul,
    check_store_kv,
    refuse_batch_invariant,
)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str | None = None,
) -> None:
    """Write new K/V ``[T, Hkv, D]`` into the paged caches at ``slot_mapping[T]`` (int64)."""
    name = resolve_backend(backend, k.device)
    if name == "reference":
        check_store_kv(k, v, k_cache, v_cache, slot_mapping)
    kernels(name).store_kv(k, v, k_cache, v_cache, slot_mapping)


@dataclass(frozen=True)
class AttentionPlan:
    """What every layer of one forward shares: the batch description, checked once, and the backend's
    own plan (the C++ work items; Triton's launch numbers).

    Valid for one forward: the C++ backend refuses it once ``block_table``, ``seq_lens`` or
    ``cu_seqlens_q`` changed in place, and it divides the work for ``torch.get_num_threads()``
    at planning time.
    """

    backend: str
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    num_tokens: int
    num_q_heads: int
    max_q_len: int
    max_kv_len: int
    backend_plan: torch.Tensor | None  # CPU int64, opaque; None for the reference


def plan_attention(
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    num_tokens: int,
    num_q_heads: int,
    k_cache: torch.Tensor,
    max_q_len: int,
    max_kv_len: int,
    batch_invariant: bool = False,
    backend: str | None = None,
) -> AttentionPlan:
    """Plan the attention of one forward over the sequences ``block_table [B, max_blocks]``,
    ``seq_lens [B]``, ``cu_seqlens_q [B+1]`` (int32).

    ``k_cache`` is one layer's K cache ``[N, S, Hkv, D]`` (every layer's has its geometry).
    ``num_tokens`` (``cu_seqlens_q[-1]``), ``max_q_len`` and ``max_kv_len`` (the longest query
    and context) are host numbers the caller knows: planning reads nothing back from the device.
    The C++ backend validates the sequences here (every block id the kernel will read), once;
    Triton's trusts them, and the two maxima within the bounds the shapes set (``triton``).
    ``batch_invariant`` (the C++ backend only) asks that each query row's output be the same,
    bit for bit, whatever else the forward computes (what layers that round their inputs to 8
    bits need: a cache hit must not tip a rounding).
    """
    if not (0 <= max_q_len <= num_tokens and (max_q_len > 0) == (num_tokens > 0)):
        raise ValueError(f"max_q_len = {max_q_len} does not fit {num_tokens} query tokens: the longest query "
                         "holds at least one of them and at most all")
    name = resolve_backend(backend, k_cache.device)
    backend_plan = None
    if name == "reference":
        check_plan(k_cache, block_table, seq_lens, cu_seqlens_q, num_q_heads)
        refuse_batch_invariant(batch_invariant)
    else:
        backend_plan = kernels(name).plan_paged_attention(
            k_cache, block_table, seq_lens, cu_seqlens_q, num_q_heads, max_q_len, max_kv_len, batch_invariant
        )
    return AttentionPlan(
        name, block_table, seq_lens, cu_seqlens_q, num_tokens, num_q_heads, max_q_len, max_kv_len, backend_plan
    )


def run_attention(
    plan: AttentionPlan,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's attention of ``q [T, Hq, D]`` over its caches, as ``plan`` describes; returns ``out``.

    Checks only what is cheap (shapes, dtypes; the C++ kernel that the tensors are the planned ones).
    """
    if q.dim() != 3 or q.shape[0] != plan.num_tokens or q.shape[1] != plan.num_q_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit the plan: [{plan.num_tokens}, {plan.num_q_heads}, D]")
    sequences = (plan.block_table, plan.seq_lens, plan.cu_seqlens_q)
    return _attend(plan.backend, q, k_cache, v_cache, scale, out, sequences, plan.backend_plan)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``q[T, Hq, D]`` over each sequence's paged K/V; returns ``out``.

    One call: the backend plans it too (Triton reads the longest query and context back from the
    device for that). A model plans once per forward instead: ``plan_attention``, ``run_attention``.
    """
    name = resolve_backend(backend, q.device)
    return _attend(name, q, k_cache, v_cache, scale, out, (block_table, seq_lens, cu_seqlens_q), None)


def _attend(
    backend: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    out: torch.Tensor | None,
    sequences: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # block_table, seq_lens, cu_seqlens_q
    backend_plan: torch.Tensor | None,
) -> torch.Tensor:
    if out is None:
        out = torch.empty_like(q)
    if backend == "reference":
        check_paged_attention(q, k_cache, v_cache, *sequences, out)
    kernels(backend).paged_attention(q, k_cache, v_cache, *sequences, scale, out, backend_plan)
    return out


def quant_linear(x: torch.Tensor, weight: torch.Tensor, qtype: str, quantize_x: bool = False,
                 backend: str | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T -> [..., N]`` for ``W`` held as GGUF blocks: ``weight`` uint8
    ``[N, K / 32 * block bytes]`` of ``qtype`` (``Q8_0``, ``Q4_0``, ``Q4_1``; see ``quant.py``), or
    for ``BF16`` and ``F32`` the plain ``[N, K]`` weight itself (or its bytes). ``x`` fp32 or bf16,
    accumulated in fp32, returned in ``x``'s dtype; with ``quantize_x`` (block formats only), ``x``
    rounded to 8-bit blocks first, as llama.cpp does (``quant.round_to_q8``). The C++ kernel on
    CPU; the reference (dequantize, then ``F.linear``) on other devices, and where the backend is
    ``reference``."""
    if resolve_backend(backend, x.device) == "cpp":
        return kernels("cpp").quant_linear(x, weight, qtype, quantize_x)
    quant.check_quant_linear(x, weight, qtype, quantize_x)
    return quant.quant_linear(x, weight, qtype, quantize_x)


def quant_linear_group(x: torch.Tensor, weights: Sequence[torch.Tensor], qtype: str, quantize_x: bool = False,
                       backend: str | None = None) -> list[torch.Tensor]:
    """``quant_linear(x, weight, qtype, quantize_x)`` for each of ``weights`` (one qtype, the same
    input width: a layer's q/k/v or gate/up projections), as one call: on CPU a decode step's few
    rows of ``x`` stream every weight in one parallel region, where separate calls would each wake
    the threads (and ``x`` is rounded once)."""
    if resolve_backend(backend, x.device) == "cpp":
        return kernels("cpp").quant_linear_group(x, list(weights), qtype, quantize_x)
    for weight in weights:
        quant.check_quant_linear(x, weight, qtype, quantize_x)
    return quant.quant_linear_group(x, list(weights), qtype, quantize_x)


def panel_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                 backend: str | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T + bias -> [..., out_features]`` for bf16 or fp32 ``x`` and a ``W`` of its
    dtype packed by ``panels.pack_panels`` (``panels``), computed in fp32 and rounded once. The C++
    kernel on CPU (AVX512_BF16 dot products, AVX-512 multiply-adds, where the CPU and build have
    them); the reference (unpack, then ``F.linear``) on other devices, and where the backend is
    ``reference``."""
    if resolve_backend(backend, x.device) == "cpp":
        return kernels("cpp").panel_linear(x, panels, bias, out_features)
    panel_spec.check_panel_linear(x, panels, bias, out_features)
    return panel_spec.panel_linear(x, panels, bias, out_features)


def panel_linear_group(x: torch.Tensor, panels: Sequence[torch.Tensor], out_features: Sequence[int],
                       backend: str | None = None) -> list[torch.Tensor]:
    """``panel_linear(x, p, None, n)`` for each of ``panels`` and ``out_features`` (bias-free layers
    reading one input: q/k/v, gate/up), as one call: on CPU one parallel region over all their panels."""
    panels, out_features = list(panels), list(out_features)
    if resolve_backend(backend, x.device) == "cpp":
        return kernels("cpp").panel_linear_group(x, panels, out_features)
    panel_spec.check_panel_linear_group(x, panels, out_features)
    return panel_spec.panel_linear_group(x, panels, out_features)


# --- the small ops of a decoder layer, fused (reference.py: each as transformers computes it) ------
# fp32, bf16 and fp16; the C++ kernels on CPU, the reference elsewhere. Rows are tokens.


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 backend: str | None = None) -> torch.Tensor:
    """``x += residual`` in place when ``residual`` is given (the residual stream, ``[T, H]``),
    then transformers' ``LlamaRMSNorm`` of ``x`` with ``weight [H]`` (``x``'s dtype): returns
    ``weight * (x_fp32 * rsqrt(mean(x_fp32**2) + eps)).to(x.dtype)``, a new ``[T, H]``."""
    if resolve_backend(backend, x.device) == "cpp":
        return kernels("cpp").add_rms_norm(x, residual, weight, eps)
    check_add_rms_norm(x, residual, weight)
    return reference.add_rms_norm(x, residual, weight, eps)


def rope_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                  backend: str | None = None) -> torch.Tensor:
    """Rotary embeddings on ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` with ``cos``, ``sin`` ``[T, D]``
    (as ``LlamaRotaryEmbedding`` returns them, so every rope scaling works), then ``store_kv`` of the
    rotated ``k`` and of ``v`` at ``slot_mapping [T]``. Returns the rotated ``q``, a new contiguous
    ``[T, Hq, D]``; ``q``, ``k`` and ``v`` are left as they were."""
    if resolve_backend(backend, q.device) == "cpp":
        return kernels("cpp").rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    check_rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    return reference.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate``, ``up`` ``[T, I]``, rounded as ``LlamaMLP`` rounds it; a new ``[T, I]``."""
    if resolve_backend(backend, gate.device) == "cpp":
        return kernels("cpp").silu_mul(gate, up)
    check_silu_mul(gate, up)
    return reference.silu_mul(gate, up)


@dataclass(frozen=True)
class DecoderOps:
    """The ops a decoder layer calls, on one backend, resolved once (``decoder_ops``): the lean
    decoder makes eight such calls a layer, and resolving and checking the backend in each cost
    ~2 µs, about half a millisecond of a SmolLM2 decode step. The C++ backend's are its op
    overloads (which check their arguments), the reference's these functions."""

    backend: str
    add_rms_norm: Callable[..., torch.Tensor]
    rope_store_kv: Callable[..., torch.Tensor]
    silu_mul: Callable[..., torch.Tensor]
    quant_linear_group: Callable[..., list[torch.Tensor]]
    panel_linear_group: Callable[..., list[torch.Tensor]]


@functools.cache
def decoder_ops(backend: str) -> DecoderOps:
    """``add_rms_norm``, ``rope_store_kv``, ``silu_mul``, ``quant_linear_group`` and
    ``panel_linear_group`` on ``backend``
    (a resolved, loaded backend: a plan's), taking the arguments above but ``backend``."""
    if backend == "cpp":
        cpp = kernels("cpp")
        return DecoderOps(backend, cpp.add_rms_norm.default, cpp.rope_store_kv.default, cpp.silu_mul.default,
                          cpp.quant_linear_group.default, cpp.panel_linear_group.default)
    return DecoderOps(backend, *(functools.partial(op, backend=backend) for op in
                                 (add_rms_norm, rope_store_kv, silu_mul, quant_linear_group, panel_linear_group)))
