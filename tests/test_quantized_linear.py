"""GGUF-quantized linear layers: the PyTorch dequantization against gguf's (bit for bit), the C++
kernel against a float64 matmul of those weights (each format, decode and prefill row counts,
bf16), what the op refuses, ``QuantizedLinear``, and models loaded with ``keep_quantized=True``
against transformers' own dequantized load of the same GGUF: a tiny random Llama written here
(Q8_0 and Q4_0, grouped-query heads) and the embedded SmolLM2 (Q4_1, Q8_0 LM head)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.kernel_builds import kernels_for, rerun_at_simd_level
from trellis import PrefixCacheFileError, TrellisLlama, ops
from trellis.models import gguf_quantized
from trellis.models.embedded import embedded_model_dir
from trellis.models.gguf_reading import gguf_parsed_once
from trellis.ops import quant
from trellis.runner.quantized_linear import QuantizedLinear

gguf = pytest.importorskip("gguf")

QTYPES = quant.QTYPES


@pytest.fixture(scope="module", autouse=True)
def cpp_kernels():
    with kernels_for(("quant_linear_cpu.cpp",)):
        yield


def quantized(out_features: int, in_features: int, qtype: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, gguf's own dequantization of them) for a random weight."""
    weight = np.random.default_rng(seed).standard_normal((out_features, in_features)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    blocks = gguf.quants.quantize(weight, kind)  # F32: the weight itself, as floats
    return torch.from_numpy(blocks.view(np.uint8).copy()), torch.from_numpy(gguf.quants.dequantize(blocks, kind).copy())


@pytest.mark.parametrize("qtype", QTYPES)
def test_dequantize_matches_gguf_bit_for_bit(qtype):
    blocks, expected = quantized(37, 320, qtype)
    assert torch.equal(quant.dequantize(blocks, qtype), expected)


def check_close(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Within fp32 summation error of the exact product: ~K ulps of the sum of |terms|."""
    exact = x.double() @ weight.double().T
    magnitude = x.double().abs() @ weight.double().abs().T
    assert ((y.double() - exact).abs() <= 1e-6 * x.shape[-1] * magnitude + 1e-30).all()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 33, 512])
@pytest.mark.parametrize(("out_features", "in_features"), [(1, 32), (77, 96), (130, 576)])
def test_kernel_matches_the_dequantized_matmul(qtype, rows, out_features, in_features):
    if rows == 512 and out_features * in_features > 20000:
        pytest.skip("covered by the smaller shapes; keeps the file fast")
    blocks, weight = quantized(out_features, in_features, qtype, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    y = ops.quant_linear(x, blocks, qtype)
    assert y.shape == (rows, out_features) and y.dtype == torch.float32
    check_close(y, x, weight)
    check_close(ops.quant_linear(x, blocks, qtype, backend="reference"), x, weight)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [2, 40])  # the decode path and the blocked path; K spans chunks
def test_kernel_over_long_rows(qtype, rows):
    blocks, weight = quantized(50, 1056, qtype)
    x = torch.randn(rows, 1056)
    check_close(ops.quant_linear(x, blocks, qtype), x, weight)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", range(1, 9))
def test_kernel_decode_path_at_every_row_count(qtype, rows):
    # Each row count has its own variant (weight rows per step: 4, 3 or 2, and one at a time for
    # the rest: 131 = 4 * 32 + 3); a thread's prefetch runs past the end of the weight.
    blocks, weight = quantized(131, 352, qtype, seed=rows)
    x = torch.randn(rows, 352, generator=torch.Generator().manual_seed(rows))
    check_close(ops.quant_linear(x, blocks, qtype), x, weight)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_kernel_group_is_each_weight_alone(qtype, rows):
    # Threads split the features of all three weights as one run: here 131 + 7 + 64, so that task
    # boundaries fall inside weights and across them. The blocked path (9 rows) runs them in turn.
    weights = [quantized(n, 352, qtype, seed=n)[0] for n in (131, 7, 64)]
    x = torch.randn(rows, 352, generator=torch.Generator().manual_seed(rows))
    for dtype in (torch.float32, torch.bfloat16):
        group = ops.quant_linear_group(x.to(dtype), weights, qtype)
        alone = [ops.quant_linear(x.to(dtype), w, qtype) for w in weights]
        assert [y.shape for y in group] == [(rows, 131), (rows, 7), (rows, 64)]
        assert all(torch.equal(g, a) for g, a in zip(group, alone))
    # bf16 x: widened exactly, each result rounded once (as `to` rounds)
    narrowed = [y.to(torch.bfloat16) for y in ops.quant_linear_group(x.bfloat16().float(), weights, qtype)]
    assert all(torch.equal(g, n) for g, n in zip(ops.quant_linear_group(x.bfloat16(), weights, qtype), narrowed))
    reference = ops.quant_linear_group(x, weights, qtype, backend="reference")
    for y, want in zip(ops.quant_linear_group(x, weights, qtype), reference):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    assert ops.quant_linear_group(x, [], qtype) == []


@pytest.mark.parametrize("qtype", ["BF16", "F32"])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_a_plain_weight_is_its_own_blocks(qtype, rows):
    # BF16 and F32 blocks are the plain weight's bytes: the weight itself is taken as they are.
    dtype = quant.PLAIN_DTYPES[qtype]
    weights = [torch.randn(n, 96, generator=torch.Generator().manual_seed(n)).to(dtype) for n in (40, 7)]
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)).to(dtype)
    for backend in ("cpp", "reference"):
        plain = ops.quant_linear_group(x, weights, qtype, backend=backend)
        as_bytes = ops.quant_linear_group(x, [w.view(torch.uint8) for w in weights], qtype, backend=backend)
        assert all(torch.equal(p, b) for p, b in zip(plain, as_bytes, strict=True))
        assert torch.equal(ops.quant_linear(x, weights[0], qtype, backend=backend), plain[0])


def test_group_refuses_weights_of_another_width():
    blocks, _ = quantized(8, 64, "Q4_0")
    with pytest.raises(ValueError, match="do not hold 96 Q4_0 weights"):
        ops.quant_linear_group(torch.randn(1, 96), [quantized(8, 96, "Q4_0")[0], blocks], "Q4_0")
    with pytest.raises(ValueError, match="do not hold 96 Q4_0 weights"):
        ops.quant_linear_group(torch.randn(1, 96), [quantized(8, 96, "Q4_0")[0], blocks], "Q4_0",
                               backend="reference")


# --- x rounded to 8-bit blocks (quantize_x) -------------------------------------------------------

QUANTIZED = quant.QUANTIZED_QTYPES


def test_round_to_q8_is_integers_times_a_block_scale():
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 1e-3, 50.0]).repeat_interleave(32)
    x[1, 32:64] = 0  # a block of zeros stays zero
    rounded = quant.round_to_q8(x).reshape(3, 3, 32)
    scale = x.reshape(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, rounded / scale, 0)  # (the division rounds)
    assert (q - q.round()).abs().max() < 1e-4 and q.round().abs().max() == 127
    assert torch.equal(rounded[1, 1], torch.zeros(32))
    assert ((rounded - x.reshape(3, 3, 32)).abs() <= scale / 2 * (1 + 1e-6)).all()
    # halves round to even: a block whose max is 127 has the scale 1
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 126.5] + [0.0] * 24)
    assert quant.round_to_q8(ties)[:8].tolist() == [127, 0, 2, 2, 0, -2, 4, 126]
    assert quant.round_to_q8(x.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("rows", [1, 3, 9, 40])  # the integer decode path and the blocked path
def test_kernel_quantize_x_rounds_as_the_reference(rows):
    """An identity weight (Q8_0, scale 1) gives back x as the kernel rounded it, exactly: the
    integers and scales of ``round_to_q8``, ties and all; a block with an inf or NaN gives NaN."""
    blocks = torch.zeros(64, 2, 34, dtype=torch.uint8)  # [rows, blocks, d and 32 q]
    blocks[..., :2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    for j in range(64):
        blocks[j, j // 32, 2 + j % 32] = 1
    blocks = blocks.reshape(64, 68)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)) * 3
    x[0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, 126.5])
    x[0, 8:32] = 0
    for backend in ("cpp", "reference"):
        assert torch.equal(ops.quant_linear(x, blocks, "Q8_0", True, backend=backend), quant.round_to_q8(x))
    x[-1, 40], x[0, 33] = float("nan"), float("inf")
    y = ops.quant_linear(x, blocks, "Q8_0", True)
    assert y[-1].isnan().all() and y[0].isnan().all() and not y[1:-1].isnan().any()


def check_close_rounded(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Within fp32 error of the exact product of x rounded to 8-bit blocks."""
    check_close(y, quant.round_to_q8(x), weight)


@pytest.mark.parametrize("qtype", QUANTIZED)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 33])
def test_kernel_quantize_x_matches_the_rounded_matmul(qtype, rows):
    # 131 = 4 * 32 + 3 features: every variant of weight rows per step, and single rows after.
    blocks, weight = quantized(131, 352, qtype, seed=rows)
    x = torch.randn(rows, 352, generator=torch.Generator().manual_seed(rows))
    for backend in ("cpp", "reference"):
        check_close_rounded(ops.quant_linear(x, blocks, qtype, True, backend=backend), x, weight)
    y = ops.quant_linear(x.bfloat16(), blocks, qtype, True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ops.quant_linear(x.bfloat16().float(), blocks, qtype, True).bfloat16())


@pytest.mark.parametrize("qtype", QUANTIZED)
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_kernel_quantize_x_group_is_each_weight_alone(qtype, rows):
    weights = [quantized(n, 352, qtype, seed=n)[0] for n in (131, 7, 64)]
    x = torch.randn(rows, 352, generator=torch.Generator().manual_seed(rows))
    group = ops.quant_linear_group(x, weights, qtype, True)
    assert all(torch.equal(g, ops.quant_linear(x, w, qtype, True)) for g, w in zip(group, weights, strict=True))
    for y, want in zip(group, ops.quant_linear_group(x, weights, qtype, True, backend="reference"), strict=True):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("qtype", ["BF16", "F32"])
def test_kernel_quantize_x_is_refused_for_plain_weights(backend, qtype):
    weight = torch.randn(8, 64).to(quant.PLAIN_DTYPES[qtype])
    with pytest.raises(ValueError, match=f"quantize_x rounds x for block-quantized weights .*, not {qtype}"):
        ops.quant_linear(torch.randn(2, 64), weight, qtype, True, backend=backend)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_kernels_at_lower_simd_levels(capability):
    """The kernel tests of this file again, over the kernels built for AVX2 and for no SIMD
    extension (ATEN_CPU_CAPABILITY), in a child process: a run uses its machine's best level."""
    rerun_at_simd_level(capability, __file__, "kernel and not simd_levels")


@pytest.mark.parametrize("qtype", QTYPES)
def test_bf16_activations_and_leading_dims(qtype):
    blocks, weight = quantized(48, 128, qtype)
    x = torch.randn(2, 5, 128).to(torch.bfloat16)
    y = ops.quant_linear(x, blocks, qtype)
    assert y.shape == (2, 5, 48) and y.dtype == torch.bfloat16
    exact = (x.double() @ weight.double().T).float()
    torch.testing.assert_close(y.float(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())
    empty = ops.quant_linear(torch.empty(0, 128), blocks, qtype)
    assert empty.shape == (0, 48)
    for backend in ("reference", "cpp"):  # no output features: an empty result, as F.linear gives
        assert ops.quant_linear(x, blocks[:0], qtype, backend=backend).shape == (2, 5, 0)


def test_op_schema_and_fake_kernel():
    blocks, _ = quantized(40, 64, "Q4_0")
    torch.library.opcheck(torch.ops.trellis.quant_linear.default, (torch.randn(3, 64), blocks, "Q4_0"))
    compiled = torch.compile(lambda x: torch.ops.trellis.quant_linear(x, blocks, "Q4_0") * 2, backend="eager",
                             fullgraph=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), 2 * ops.quant_linear(x, blocks, "Q4_0"))
    torch.library.opcheck(torch.ops.trellis.quant_linear_group.default, (torch.randn(3, 64), [blocks, blocks], "Q4_0"))
    torch.library.opcheck(torch.ops.trellis.quant_linear_group.default, (torch.randn(3, 64), [blocks], "Q4_0", True))
    plain, x16 = torch.randn(40, 64, dtype=torch.bfloat16), torch.randn(3, 64, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.trellis.quant_linear.default, (x16, plain, "BF16"))  # a plain weight as its blocks


BAD_INPUTS = [  # (x, weight, qtype, error, message)
    (torch.randn(2, 64, dtype=torch.float16), "Q4_0", "Q4_0", TypeError, "x must be float32 or bfloat16"),
    (torch.randn(2, 64), torch.zeros(4, 36), "Q4_0", TypeError, "weight must be uint8"),
    (torch.randn(2, 64), torch.zeros(4, 64), "BF16", TypeError, "weight must be uint8 blocks or the plain weight (BF16)"),
    (torch.randn(2, 64), torch.zeros(4, 64, dtype=torch.bfloat16), "Q8_0", TypeError, "weight must be uint8 blocks (Q8_0)"),
    (torch.randn(2, 64), torch.zeros(4, 32), "F32", ValueError, "do not hold 64 F32 weights"),
    (torch.randn(2, 64), "Q4_0", "Q5_0", ValueError, "unsupported qtype 'Q5_0'"),
    (torch.randn(2, 64), "Q4_0", "Q8_0", ValueError, "do not hold 64 Q8_0 weights"),
    (torch.randn(2, 48), torch.zeros(4, 27, dtype=torch.uint8), "Q4_0", ValueError, "must be a multiple of 32"),
    (torch.randn(2, 64), torch.zeros(4, 2, 18, dtype=torch.uint8), "Q4_0", ValueError, "weight must be [out_features"),
]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize(("x", "weight", "qtype", "error", "message"), BAD_INPUTS)
def test_bad_input_is_refused_by_name(backend, x, weight, qtype, error, message):
    if isinstance(weight, str):
        weight, _ = quantized(4, 64, weight)
    with pytest.raises(error, match=re.escape(message)):
        ops.quant_linear(x, weight, qtype, backend=backend)


def test_quantized_linear_module():
    blocks, weight = quantized(24, 64, "Q8_0")
    bias = torch.randn(24)
    layer = QuantizedLinear(64, 24, "Q8_0", blocks, bias)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ weight.T + bias)
    assert torch.equal(layer.dequantized_weight(), weight)
    x.requires_grad_(True)
    layer(x).sum().backward()  # gradients reach the input through the dequantized weight
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 64))
    layer.to(torch.bfloat16)
    assert layer.weight_blocks.dtype == torch.uint8 and "weight_blocks" in layer.state_dict()
    with pytest.raises(ValueError, match="expected input with 64 features"):
        layer(torch.randn(3, 32))
    with pytest.raises(ValueError, match="holds 24 rows, not out_features=25"):
        QuantizedLinear(64, 25, "Q8_0", blocks)


def test_quantized_linear_module_rounding_its_input():
    blocks, weight = quantized(24, 64, "Q4_1")
    layer = QuantizedLinear(64, 24, "Q4_1", blocks, q8_activations=True)
    assert "q8_activations=True" in repr(layer)
    x = torch.randn(3, 64)
    check_close_rounded(layer(x), x, weight)
    x.requires_grad_(True)
    y = layer(x)  # the rounded values; the gradient of the layer without the rounding
    torch.testing.assert_close(y, quant.round_to_q8(x) @ weight.T)
    y.sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 64))
    with pytest.raises(TypeError, match="q8_activations must be True or False, got 'yes'"):
        QuantizedLinear(64, 24, "Q4_1", blocks, q8_activations="yes")


# --- models ---------------------------------------------------------------------------------------

TINY = {"hidden": 64, "intermediate": 160, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 96}


def write_tiny_gguf(path, seed: int = 0, kv_heads: int = TINY["kv_heads"], state_kv_heads: bool = True) -> None:
    """A random Llama with Q8_0 attention, Q4_0 MLP, an F32 untied LM head, permuted q/k rows as
    llama.cpp's converter writes them (which leaves out ``head_count_kv`` where the checkpoint's
    config has no ``num_key_value_heads``: ``state_kv_heads=False``)."""
    rng = np.random.default_rng(seed)
    hidden, heads = TINY["hidden"], TINY["heads"]
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(TINY["intermediate"])
    writer.add_head_count(heads)
    if state_kv_heads:
        writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(TINY["vocab"])

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's convert_hf_to_gguf permutation
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def add(name: str, shape: tuple[int, ...], qtype: str | None, n_head: int | None = None) -> None:
        w = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if n_head is not None:
            w = permute(w, n_head)
        if qtype is None:
            writer.add_tensor(name, w)
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)

    add("token_embd.weight", (TINY["vocab"], hidden), None)
    add("output.weight", (TINY["vocab"], hidden), None)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(TINY["layers"]):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        add(f"blk.{i}.attn_q.weight", (hidden, hidden), "Q8_0", heads)
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), "Q8_0", kv_heads)
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), "Q4_1")
        add(f"blk.{i}.attn_output.weight", (hidden, hidden), "Q8_0")
        add(f"blk.{i}.ffn_gate.weight", (TINY["intermediate"], hidden), "Q4_0")
        add(f"blk.{i}.ffn_up.weight", (TINY["intermediate"], hidden), "Q4_0")
        add(f"blk.{i}.ffn_down.weight", (hidden, TINY["intermediate"]), "Q4_0")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantized_layers(model: torch.nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module, expected_layers: int) -> None:
    layers = quantized_layers(model)
    assert len(layers) == expected_layers
    modules = dict(reference.named_modules())
    for name, layer in layers.items():  # the blocks hold exactly the weights transformers dequantized
        assert torch.equal(layer.dequantized_weight(), modules[name].weight), name


def test_tiny_gguf_kept_quantized_matches_transformers(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    model = TrellisLlama.from_pretrained(tmp_path, gguf_file="tiny.gguf", keep_quantized=True, device="cpu")
    reference = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    assert_same_weights(model, reference, 7 * TINY["layers"])  # the F32 LM head stays as loaded
    assert {m.qtype for m in quantized_layers(model).values()} == {"Q8_0", "Q4_0", "Q4_1"}
    ids = torch.randint(0, TINY["vocab"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def round_inputs_to_q8(reference: torch.nn.Module, names) -> list:
    """transformers' model computing what layers kept with ``q8_activations`` compute: the inputs
    of the layers ``names`` rounded to 8-bit blocks. Returns the hooks' handles."""
    modules = dict(reference.named_modules())
    return [modules[name].register_forward_pre_hook(lambda module, args: (quant.round_to_q8(args[0]),))
            for name in names]


def test_tiny_gguf_with_q8_activations_matches_transformers_rounding_the_same_inputs(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    model = TrellisLlama.from_pretrained(tmp_path, gguf_file="tiny.gguf", keep_quantized=True, q8_activations=True,
                                         device="cpu")
    plain = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    rounding = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    kept = quantized_layers(model)
    assert len(kept) == 7 * TINY["layers"] and all(layer.q8_activations for layer in kept.values())
    round_inputs_to_q8(rounding, kept)
    ids = torch.randint(0, TINY["vocab"], (2, 40), generator=torch.Generator().manual_seed(0))
    settings = {"max_new_tokens": 10, "do_sample": False}
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, rounding(ids).logits, rtol=1e-4, atol=1e-4)
        assert (logits - plain(ids).logits).abs().max() > 1e-3  # (the rounding shows)
        out = model.generate(ids[:1], **settings)  # decode steps: the integer kernels
        assert torch.equal(out, rounding.generate(ids[:1], **settings))
        assert_cache_hits_change_nothing(model, torch.cat([out, ids[1:, :7]], dim=1))
        # A setting the prefix cache watches: turned off, the layers answer as transformers' own.
        state = model.runner.weights_watcher.state()
        for layer in kept.values():
            layer.q8_activations = False
        assert model.runner.weights_watcher.state() != state
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)


def assert_cache_hits_change_nothing(model: TrellisLlama, prompt: torch.Tensor) -> None:
    """``prompt`` continued from the cache as it is (its prefix computed in earlier calls, decoded
    tokens among them) and from an empty one: the same logits, bit for bit. With inputs rounded
    to 8 bits, a last-bit difference (a token's attention or projections summed in another order
    in a decode step than in a prefill) could tip a rounding and change the answer."""
    settings = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    hits = model.prefix_cache.stats()["hit_tokens"]
    warm = model.generate(prompt, **settings)
    assert model.prefix_cache.stats()["hit_tokens"] - hits >= 32
    model.prefix_cache.reset()
    cold = model.generate(prompt, **settings)
    assert torch.equal(warm.sequences, cold.sequences)
    assert all(torch.equal(w, c) for w, c in zip(warm.logits, cold.logits, strict=True))


def test_a_prefix_cache_saved_with_q8_activations_is_refused_without(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    model = TrellisLlama.from_pretrained(tmp_path, gguf_file="tiny.gguf", keep_quantized=True, q8_activations=True,
                                         device="cpu")
    with torch.no_grad():
        model(torch.arange(40)[None] % TINY["vocab"])
    model.save_prefix_cache(tmp_path / "cache.safetensors")
    plain = TrellisLlama.from_pretrained(tmp_path, gguf_file="tiny.gguf", keep_quantized=True, device="cpu")
    with pytest.raises(PrefixCacheFileError, match="other modules"):
        plain.load_prefix_cache(tmp_path / "cache.safetensors")
    model.load_prefix_cache(tmp_path / "cache.safetensors")  # (its own file is taken)


def test_a_gguf_load_parses_the_file_once(tmp_path, monkeypatch):
    """transformers parses a GGUF for the config and for the weights, and keep_quantized reads its
    blocks: one parse in all, and gguf's own reader back afterwards (a rewritten file is parsed anew)."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    parsed, parse, reader_class = [], gguf.GGUFReader.__init__, gguf.GGUFReader
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, path, *args: parsed.append(path) or
                        parse(self, path, *args))
    TrellisLlama.from_pretrained(tmp_path, gguf_file="tiny.gguf", keep_quantized=True, device="cpu")
    assert len(parsed) == 1 and gguf.GGUFReader is reader_class
    with gguf_parsed_once():
        first = gguf.GGUFReader(tmp_path / "tiny.gguf")
        assert gguf.GGUFReader(str(tmp_path / "tiny.gguf")) is first
        write_tiny_gguf(tmp_path / "tiny.gguf", seed=1)
        assert gguf.GGUFReader(tmp_path / "tiny.gguf") is not first
    assert len(parsed) == 3


def test_a_gguf_without_its_kv_head_count_keeps_q_and_k_as_transformers_loads_them(tmp_path):
    # transformers un-permutes attn_q / attn_k only where the file states both head counts.
    write_tiny_gguf(tmp_path / "mha.gguf", kv_heads=TINY["heads"], state_kv_heads=False)
    model = TrellisLlama.from_pretrained(tmp_path, gguf_file="mha.gguf", keep_quantized=True, device="cpu")
    reference = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="mha.gguf", dtype=torch.float32).eval()
    assert_same_weights(model, reference, 7 * TINY["layers"])
    ids = torch.randint(0, TINY["vocab"], (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_gguf_whose_tensors_do_not_fit_its_metadata_is_a_value_error(tmp_path):
    write_tiny_gguf(tmp_path / "gqa.gguf", state_kv_heads=False)  # 2 K/V heads' tensors, read as 4 (the default)
    with pytest.raises(ValueError, match=r"cannot load the GGUF file gqa.gguf of .* \(its tensors do not fit the model "
                                         r"its metadata describes\)"):
        TrellisLlama.from_pretrained(tmp_path, gguf_file="gqa.gguf", device="cpu")


def test_a_kept_layer_that_would_differ_from_transformers_weight_is_refused(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr(gguf_quantized, "unpermute_rows", lambda blocks, num_heads: blocks)  # a misread file
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight \(Q8_0\) does not hold the weight transformers "
                                         r"loaded for it, so it cannot be kept quantized"):
        TrellisLlama.from_pretrained(tmp_path, gguf_file="tiny.gguf", keep_quantized=True, device="cpu")


def test_keep_quantized_needs_a_gguf_and_fp32_or_bf16(tmp_path):
    with pytest.raises(ValueError, match="keep_quantized=True keeps the quantized weights of a GGUF"):
        TrellisLlama.from_pretrained(embedded_model_dir(), keep_quantized=True)
    with pytest.raises(ValueError, match="q8_activations=True rounds the inputs of layers kept quantized: pass "
                                         "keep_quantized=True"):
        TrellisLlama.from_pretrained(tmp_path, q8_activations=True)
    with pytest.raises(TypeError, match="q8_activations must be True or False, got 1"):
        TrellisLlama.from_pretrained(tmp_path, keep_quantized=True, q8_activations=1)
    with pytest.raises(ValueError, match="round their inputs to 8 bits \\(q8_activations\\) run on the C\\+\\+ CPU "
                                         "kernels only; this model runs attention on 'reference'"):
        TrellisLlama.from_pretrained(keep_quantized=True, q8_activations=True, backend="reference", device="cpu")
    with pytest.raises(ValueError, match="float32 or bfloat16 activations, not float16"):
        TrellisLlama.from_pretrained(keep_quantized=True, dtype=torch.float16, device="cpu")


def test_a_conversion_the_kept_layers_cannot_run_is_refused_before_anything_changes(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    model = TrellisLlama.from_pretrained(tmp_path, gguf_file="tiny.gguf", keep_quantized=True, device="cpu")
    ids = torch.randint(0, TINY["vocab"], (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        for convert in (lambda m: m.to(torch.float16), lambda m: m.to(dtype=torch.float64)):  # (.half(): transformers)
            with pytest.raises(ValueError, match="float32 or bfloat16 activations, not float(16|64)"):
                convert(model)
            assert model.dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
        model.to(torch.bfloat16)  # a dtype the kernels take
        assert model(ids).logits.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def smollm2():
    """The embedded SmolLM2 with its GGUF's Q4_1 layers and Q8_0 LM head kept; and transformers'
    dequantized load of the same GGUF (the one-time conversion of the embedded model)."""
    model = TrellisLlama.from_pretrained(keep_quantized=True, device="cpu")
    reference = LlamaForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32).eval()
    return model, reference


def test_resizing_a_head_kept_quantized_is_refused_before_anything_changes(smollm2):
    model, _ = smollm2
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ValueError, match="cannot resize an LM head kept quantized"):
        model.resize_token_embeddings(rows + 8)
    assert model.get_input_embeddings().weight.shape[0] == rows == model.config.vocab_size


def test_a_saved_quantized_model_is_refused_on_load_not_served_random(smollm2, tmp_path):
    """save_pretrained writes blocks transformers cannot read: loading that directory would leave
    every linear layer random."""
    smollm2[0].save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lacks 210 weights .* load the GGUF with keep_quantized=True instead"):
        TrellisLlama.from_pretrained(tmp_path, device="cpu")


def test_embedded_model_kept_quantized_matches_transformers(smollm2):
    model, reference = smollm2
    assert_same_weights(model, reference, 7 * model.config.num_hidden_layers + 1)
    assert model.lm_head.qtype == "Q8_0" and model.model.layers[0].mlp.up_proj.qtype == "Q4_1"
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3458, 282, 4649]])
    with torch.no_grad():
        logits, expected = model(prompt).logits, reference(prompt).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-3 * expected.abs().max().item())
    settings = {"max_new_tokens": 12, "do_sample": False}
    assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))


def test_embedded_model_with_q8_activations_answers_alike_from_the_cache(smollm2):
    """SmolLM2 rounding its layers' inputs: the greedy answer of transformers rounding the same
    inputs, and, whatever the cache held (prompts, decoded tokens), the same logits bit for bit.
    (Not the same logits as transformers': 30 layers of rounding tip a few values apart where the
    sums round differently, so logits differ by up to ~1 where the prompt's do not decide.)"""
    _, reference = smollm2
    model = TrellisLlama.from_pretrained(keep_quantized=True, q8_activations=True, device="cpu")
    hooks = round_inputs_to_q8(reference, quantized_layers(model))
    try:
        prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 3458, 282, 4649]])
        settings = {"max_new_tokens": 12, "do_sample": False}
        assert torch.equal(model.generate(prompt, **settings), reference.generate(prompt, **settings))
    finally:
        for hook in hooks:
            hook.remove()
    ids = torch.randint(100, 40000, (1, 70), generator=torch.Generator().manual_seed(1))
    for new_tokens in (8, 11):
        model.prefix_cache.reset()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)  # decoded K/V, cached
        assert_cache_hits_change_nothing(model, torch.cat([out, ids[:, :30]], dim=1))


def test_embedded_model_prefix_hit_gives_the_same_answer(smollm2):
    model, _ = smollm2
    model.prefix_cache.reset()
    prompt = torch.randint(100, 40000, (1, 70), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": 8, "do_sample": False}
    cold = model.generate(prompt, **settings)
    warm = model.generate(prompt, **settings)
    assert model.prefix_cache.stats()["hit_tokens"] >= 64
    assert torch.equal(cold, warm)
    state = model.runner.weights_watcher.state()
    model.model.layers[0].mlp.up_proj.weight_blocks[0, 4] ^= 1  # one nibble of one block, in place
    assert model.runner.weights_watcher.state() != state  # the cache would be rebuilt, not reused
    model.model.layers[0].mlp.up_proj.weight_blocks[0, 4] ^= 1
