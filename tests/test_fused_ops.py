"""The fused decoder-layer ops (``add_rms_norm``, ``rope_store_kv``, ``silu_mul``): the reference
against transformers' own Llama modules (bit for bit), the C++ kernels against the reference (fp32
bit for bit, bf16/fp16 within two units in the last place), odd shapes and strides, the parallel
path, and what each refuses."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from trellis import ops
from trellis.ops import cpp

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["reference", "cpp"]


@pytest.fixture(scope="module", autouse=True)
def cpp_kernels():
    try:
        cpp.load()
    except cpp.BuildToolsMissing as exc:
        pytest.skip(f"the C++ kernels cannot be built here: {exc}")


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32: bit for bit (ATen's sum of squares, no contracted multiply-adds); bf16/fp16: two units
    in the last place (the norm's own sum order can round an intermediate the other way, then one
    more rounding: the norm's weight product)."""
    if got.dtype == torch.float32:
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        ulp = 2 * torch.finfo(got.dtype).eps * want.float().abs() + 1e-6
        assert ((got.float() - want.float()).abs() <= ulp).all(), (got.float() - want.float()).abs().max()


# --- add_rms_norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_rms_norm_is_transformers(dtype):
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x, residual = torch.randn(3, 576).to(dtype), torch.randn(3, 576).to(dtype)
    stream = x.clone()
    got = ops.add_rms_norm(stream, residual, norm.weight.detach(), 1e-5, backend="reference")
    assert torch.equal(stream, x + residual)
    assert torch.equal(got, norm(x + residual).detach())


@pytest.mark.parametrize("shape", [(1, 576), (5, 64), (3, 7), (2, 1), (0, 16), (700, 96), (1, 2048), (33, 5632)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_reference(shape, dtype, with_residual):
    x = (3 * torch.randn(shape)).to(dtype)
    residual = torch.randn(shape).to(dtype) if with_residual else None
    weight = torch.randn(shape[1]).to(dtype)
    streams = {backend: x.clone() for backend in BACKENDS}
    outs = {backend: ops.add_rms_norm(streams[backend], residual, weight, 1e-6, backend=backend)
            for backend in BACKENDS}
    assert torch.equal(streams["cpp"], streams["reference"])  # the residual add is exact in either
    assert_close(outs["cpp"], outs["reference"])


def test_add_rms_norm_strided_rows():
    wide = torch.randn(4, 100)
    x, residual, weight = wide[:, :48], torch.randn(4, 48), torch.randn(48)  # rows 100 apart
    want_stream = x.clone()
    want = ops.add_rms_norm(want_stream, residual, weight, 1e-5, backend="reference")
    got = ops.add_rms_norm(x, residual, weight, 1e-5, backend="cpp")
    assert torch.equal(wide[:, :48], want_stream)
    assert_close(got, want)


# --- rope_store_kv ---------------------------------------------------------------------------------


def rope_case(tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, fused: bool = False):
    """q, k, v (column slices of one fused projection when ``fused``), cos/sin as LlamaRotaryEmbedding
    makes them, caches of 8 blocks of 4 and distinct slots."""
    if fused:
        qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim).to(dtype)
        q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
        q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
    else:
        q = torch.randn(tokens, q_heads, head_dim).to(dtype)
        k, v = torch.randn(tokens, kv_heads, head_dim).to(dtype), torch.randn(tokens, kv_heads, head_dim).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.randint(0, 2048, (tokens,)).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)  # [T, D]
    k_cache, v_cache = torch.randn(8, 4, kv_heads, head_dim).to(dtype), torch.randn(8, 4, kv_heads, head_dim).to(dtype)
    slots = torch.randperm(32)[:tokens]
    return q, k, v, cos, sin, k_cache, v_cache, slots


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_rope_is_transformers(dtype):
    q, k, v, cos, sin, k_cache, v_cache, slots = rope_case(5, 9, 3, 64, dtype)
    q_rot = ops.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots, backend="reference")
    # transformers' layout: [1, H, T, D] with cos/sin [1, T, D]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(q_rot, want_q[0].transpose(0, 1))
    assert torch.equal(k_cache.flatten(0, 1)[slots], want_k[0].transpose(0, 1))
    assert torch.equal(v_cache.flatten(0, 1)[slots], v)


@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (1, 1), (6, 2)])
@pytest.mark.parametrize("head_dim", [64, 2, 18, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_kv_matches_reference(heads, head_dim, dtype):
    for tokens, fused in ((1, False), (7, True), (32, False)):
        q, k, v, cos, sin, k_cache, v_cache, slots = rope_case(tokens, *heads, head_dim, dtype, fused)
        inputs = [t.clone() for t in (q, k, v)]
        caches = {backend: (k_cache.clone(), v_cache.clone()) for backend in BACKENDS}
        rotated = {backend: ops.rope_store_kv(q, k, v, cos, sin, *caches[backend], slots, backend=backend)
                   for backend in BACKENDS}
        assert all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v)))  # inputs untouched
        assert rotated["cpp"].is_contiguous() and rotated["cpp"].shape == q.shape
        assert_close(rotated["cpp"], rotated["reference"])
        assert_close(caches["cpp"][0], caches["reference"][0])
        assert torch.equal(caches["cpp"][1], caches["reference"][1])


# --- silu_mul --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1536), (3, 17), (5, 1), (0, 8), (300, 256)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_reference(shape, dtype):
    generator = torch.Generator().manual_seed(shape[-1])
    gate, up = (4 * torch.randn(shape, generator=generator)).to(dtype), torch.randn(shape, generator=generator).to(dtype)
    want = ops.silu_mul(gate, up, backend="reference")
    assert torch.equal(want, F.silu(gate) * up)  # LlamaMLP's act_fn(gate_proj(x)) * up_proj(x)
    got = ops.silu_mul(gate, up, backend="cpp")
    if dtype == torch.float32 and shape[0] > 1 and shape[-1] % 32:
        # F.silu runs a contiguous [T, n] as one flat run; where n is no multiple of two vectors its
        # split between vectorised and scalar exp falls elsewhere in a row than the kernel's (which
        # agrees for every Llama width), and the two exps can differ by a unit in the last place.
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=0)
    else:
        assert_close(got, want)


def test_silu_mul_halves_of_one_projection():
    gate_up = torch.randn(3, 2 * 40)
    gate, up = gate_up.chunk(2, dim=1)  # rows 80 apart
    assert_close(ops.silu_mul(gate, up, backend="cpp"), ops.silu_mul(gate, up, backend="reference"))


# --- the dispatcher, bad input -------------------------------------------------------------------


def test_opcheck():
    x, residual, weight = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    torch.library.opcheck(torch.ops.trellis.add_rms_norm.default, (x, residual, weight, 1e-5))
    torch.library.opcheck(torch.ops.trellis.add_rms_norm.default, (x, None, weight, 1e-5))
    q, k, v, cos, sin, k_cache, v_cache, slots = rope_case(3, 4, 2, 16, torch.float32)
    torch.library.opcheck(torch.ops.trellis.rope_store_kv.default, (q, k, v, cos, sin, k_cache, v_cache, slots))
    torch.library.opcheck(torch.ops.trellis.silu_mul.default, (x, residual))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_ops_are_the_ops_on_one_backend(backend):
    """What the lean decoder calls (the ops resolved once per forward) computes what ``ops.*`` on
    that backend computes, bit for bit, and refuses what they refuse."""
    run = ops.decoder_ops(backend)
    assert run.backend == backend and ops.decoder_ops(backend) is run
    x, residual, weight = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    x1, x2 = x.clone(), x.clone()
    assert torch.equal(run.add_rms_norm(x1, residual, weight, 1e-5),
                       ops.add_rms_norm(x2, residual, weight, 1e-5, backend=backend))
    assert torch.equal(x1, x2)  # the residual added in place by both
    q, k, v, cos, sin, k_cache, v_cache, slots = rope_case(3, 4, 2, 16, torch.float32)
    caches = k_cache.clone(), v_cache.clone()
    assert torch.equal(run.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots),
                       ops.rope_store_kv(q, k, v, cos, sin, *caches, slots, backend=backend))
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])
    assert torch.equal(run.silu_mul(x, residual), ops.silu_mul(x, residual, backend=backend))
    weights = [torch.randn(8, 32).view(torch.uint8), torch.randn(4, 32).view(torch.uint8)]
    for got, want in zip(run.quant_linear_group(x, weights, "F32"),
                         ops.quant_linear_group(x, weights, "F32", backend=backend), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="weight must be \\[32\\]"):
        run.add_rms_norm(x.clone(), None, torch.randn(7), 1e-5)


def bad_calls():
    x, weight = torch.randn(2, 8), torch.randn(8)
    rope = rope_case(2, 4, 2, 16, torch.float32)
    q, k, v, cos, sin, k_cache, v_cache, slots = rope
    return [
        (lambda b: ops.add_rms_norm(x.clone(), None, torch.randn(7), 1e-5, backend=b), "weight must be \\[8\\]"),
        (lambda b: ops.add_rms_norm(x.clone(), None, weight.double(), 1e-5, backend=b), "weight dtype"),
        (lambda b: ops.add_rms_norm(x.clone(), torch.randn(3, 8), weight, 1e-5, backend=b), "residual"),
        (lambda b: ops.add_rms_norm(x[0].clone(), None, weight, 1e-5, backend=b), "x must be \\[T, H\\]"),
        (lambda b: ops.add_rms_norm(x.long(), None, weight.long(), 1e-5, backend=b), "x must be float32"),
        (lambda b: ops.add_rms_norm(x[:1].expand(2, 8), x.clone(), weight, 1e-5, backend=b),
         "more than one element of it refers to a single memory location"),
        (lambda b: ops.rope_store_kv(q, k, v, cos[:, :8], sin[:, :8], k_cache, v_cache, slots, backend=b),
         "cos and sin must both be"),
        (lambda b: ops.rope_store_kv(q, k, v, cos.half(), sin, k_cache, v_cache, slots, backend=b),
         "must share a dtype"),
        (lambda b: ops.rope_store_kv(q, k[:1], v[:1], cos, sin, k_cache, v_cache, slots, backend=b), "does not fit q"),
        (lambda b: ops.rope_store_kv(q[..., :15], k[..., :15], v[..., :15], cos[:, :15], sin[:, :15],
                                     torch.zeros(8, 4, 2, 15), torch.zeros(8, 4, 2, 15), slots, backend=b),
         "must be even"),
        (lambda b: ops.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots.int(), backend=b),
         "slot_mapping must be int64"),
        (lambda b: ops.silu_mul(x, torch.randn(2, 9), backend=b), "gate .* != up"),
        (lambda b: ops.silu_mul(x, x.half(), backend=b), "dtype"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(bad_calls())))
def test_bad_input_is_refused_clearly(backend, case):
    call, message = bad_calls()[case]
    with pytest.raises((ValueError, TypeError), match=message):
        call(backend)


def test_a_residual_overlapping_x_in_part_is_refused():
    """x is updated in place: a residual that shares some of its rows would read rows already
    updated (the reference's in-place add refuses it too)."""
    rows, weight = torch.randn(5, 16), torch.randn(16)
    before = rows.clone()
    with pytest.raises(ValueError, match="residual and x overlap in part"):
        ops.add_rms_norm(rows[1:], rows[:-1], weight, 1e-6, backend="cpp")
    assert torch.equal(rows, before)
    x = torch.randn(4, 16)
    torch.testing.assert_close(ops.add_rms_norm(x.clone(), x.clone(), weight, 1e-6, backend="cpp"),
                               ops.add_rms_norm(x.clone(), x, weight, 1e-6, backend="cpp"))  # x itself: fine


def test_a_meta_tensor_among_cpu_ones_is_refused():
    """A meta tensor makes the dispatcher pick the fake kernel, which computes nothing."""
    x, residual, weight = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    q, k, v, cos, sin, k_cache, v_cache, slots = rope_case(2, 4, 2, 16, torch.float32)
    for call in (lambda: ops.add_rms_norm(x, residual, weight.to("meta"), 1e-6, backend="cpp"),
                 lambda: ops.silu_mul(x, residual.to("meta"), backend="cpp"),
                 lambda: ops.store_kv(k, v, k_cache, v_cache, slots.to("meta"), backend="cpp"),
                 lambda: ops.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots.to("meta"), backend="cpp")):
        with pytest.raises(ValueError, match="a meta tensor among \\['cpu'\\] ones"):
            call()
    meta = torch.ops.trellis_cpp.add_rms_norm(x.to("meta"), residual.to("meta"), weight.to("meta"), 1e-6)
    assert meta.device.type == "meta" and meta.shape == x.shape  # all on meta: shapes, as tracing asks


def test_slot_outside_the_cache_is_refused():
    q, k, v, cos, sin, k_cache, v_cache, _ = rope_case(2, 4, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="outside the cache"):
        ops.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([0, 32]), backend="cpp")
