"""panel_linear: bf16 and fp32 weights packed in panels of 16 output features (bf16 inputs in pairs;
trellis/ops/panels.py), multiplied by the C++ kernel (bf16 on AMX tiles or AVX512_BF16 dot products,
fp32 on AVX-512 fused multiply-adds, where the CPU has them) with the reference's results up to
fp32 summation order."""

import re

import pytest
import torch

from tests.kernel_builds import kernels_for, rerun_at_simd_level
from trellis import ops
from trellis.ops.panels import pack_panels, unpack_panels

DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def cpp_kernels():
    with kernels_for(("panel_linear_cpu.cpp",)):
        yield


def bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(torch.bfloat16)


def rand(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def test_the_layout():
    weight = bf16(21, 6)
    panels = pack_panels(weight)
    assert panels.shape == (2, 3, 16, 2) and panels.is_contiguous()
    for p, j, c, t in [(0, 0, 0, 0), (0, 2, 5, 1), (1, 1, 4, 0), (1, 2, 4, 1)]:
        assert panels[p, j, c, t] == weight[16 * p + c, 2 * j + t]
    assert not panels[1, :, 5:].any()  # features 21-31 do not exist: zero
    assert torch.equal(unpack_panels(panels, 21), weight)
    pairs = bf16(16, 2)  # whole panels of one pair: the layout is the weight's own, and still a copy
    panels = pack_panels(pairs)
    pairs.mul_(2)
    assert torch.equal(unpack_panels(panels, 16) * 2, pairs)


def test_the_fp32_layout():
    weight = torch.randn(21, 5)  # fp32: one input per lane, any in_features
    panels = pack_panels(weight)
    assert panels.shape == (2, 5, 16, 1) and panels.dtype == torch.float32 and panels.is_contiguous()
    for p, j, c in [(0, 0, 0), (0, 4, 5), (1, 1, 4), (1, 3, 4)]:
        assert panels[p, j, c, 0] == weight[16 * p + c, j]
    assert not panels[1, :, 5:].any()
    assert torch.equal(unpack_panels(panels, 21), weight)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 13, 16, 17, 32, 33, 64, 200])  # (bf16 2-6: two blocks; AMX: 16 rows, blocks of 32)
@pytest.mark.parametrize(("out_features", "in_features"), [(40, 64), (1, 2), (16, 576), (17, 30), (200, 1536)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_the_reference(rows, out_features, in_features, bias, dtype):
    torch.manual_seed(rows * 7 + out_features)
    weight, x = rand(dtype, out_features, in_features), rand(dtype, rows, in_features)
    b = rand(dtype, out_features) if bias else None
    panels = pack_panels(weight)
    got = ops.panel_linear(x, panels, b, out_features, backend="cpp")
    ref = ops.panel_linear(x, panels, b, out_features, backend="reference")
    assert got.shape == (rows, out_features) and got.dtype == dtype
    summed = torch.nn.functional.linear(x.double().abs(), weight.double().abs())  # sum of |products|
    exact = torch.nn.functional.linear(x.double(), weight.double(), None if b is None else b.double())
    if dtype == torch.float32:
        # fp32 sums in their own orders: each within fp32's summation error of the exact sum.
        for result in (got, ref):
            assert ((result.double() - exact).abs() <= summed * 2 ** -16 + 1e-30).all()
        return
    # Both sum exact products in fp32 (in their own orders) and round once: mostly equal, else a bf16
    # rounding step apart, or fp32's summation error where the sum cancels.
    for result in (got, ref):
        assert ((result.double() - exact).abs() <= exact.abs() * 2 ** -8 + summed * 2 ** -20 + 1e-30).all()
    assert ((got.double() - ref.double()).abs() <= ref.double().abs() * 2 ** -7 + summed * 2 ** -19).all()
    assert (got == ref).float().mean() > 0.95


def test_rows_a_call_does_not_have_never_reach_its_results():
    """On AMX tiles, which read x 16 rows at a time, a last partial group comes from a buffer the
    thread keeps across calls, whose other rows hold an earlier call's rows (here NaN): their
    products are never stored. A row's results are the same however many rows come with it."""
    weight = bf16(48, 64)
    panels = pack_panels(weight)
    ops.panel_linear(torch.full((31, 64), float("nan"), dtype=torch.bfloat16), panels, None, 48)
    x = bf16(16, 64)
    alone = ops.panel_linear(x[:3], panels, None, 48)
    assert alone.isfinite().all()
    assert torch.equal(alone, ops.panel_linear(x, panels, None, 48)[:3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_takes_leading_dims_strided_and_empty_inputs(dtype):
    weight = rand(dtype, 40, 64)
    panels = pack_panels(weight)
    x = rand(dtype, 2, 5, 64)
    y = ops.panel_linear(x, panels, None, 40)
    assert y.shape == (2, 5, 40)
    torch.testing.assert_close(y, ops.panel_linear(x.reshape(10, 64), panels, None, 40).view(2, 5, 40), rtol=0, atol=0)
    strided = rand(dtype, 64, 7).t()  # [7, 64], not contiguous
    torch.testing.assert_close(ops.panel_linear(strided, panels, None, 40),
                               ops.panel_linear(strided.contiguous(), panels, None, 40), rtol=0, atol=0)
    for backend in ("cpp", "reference"):
        assert ops.panel_linear(rand(dtype, 0, 64), panels, None, 40, backend=backend).shape == (0, 40)
        assert ops.panel_linear(rand(dtype, 3, 64), pack_panels(rand(dtype, 0, 64)), None, 0,
                                backend=backend).shape == (3, 0)
        none = ops.panel_linear(rand(dtype, 3, 0), pack_panels(rand(dtype, 20, 0)), torch.ones(20, dtype=dtype), 20,
                                backend=backend)
        assert torch.equal(none, torch.ones(3, 20, dtype=dtype))  # no inputs: the bias


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_kernel_at_lower_simd_levels(capability):
    """The kernel tests again over the kernels built for AVX2 and for no SIMD extension
    (ATEN_CPU_CAPABILITY), in a child process: there the op computes through ATen."""
    rerun_at_simd_level(capability, __file__, "kernel and not simd_levels")


@pytest.mark.parametrize("rows", [1, 4, 13, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_group_is_each_weight_alone(rows, dtype):
    x = rand(dtype, rows, 96)
    weights = [rand(dtype, n, 96) for n in (96, 32, 17, 200)]
    panels, widths = [pack_panels(w) for w in weights], [w.shape[0] for w in weights]
    for backend in ("cpp", "reference"):
        group = ops.panel_linear_group(x, panels, widths, backend=backend)
        alone = [ops.panel_linear(x, p, None, n, backend=backend) for p, n in zip(panels, widths)]
        assert all(torch.equal(g, a) for g, a in zip(group, alone, strict=True))
    assert [y.shape for y in ops.panel_linear_group(rand(dtype, 2, 3, 96), panels, widths)] == [(2, 3, n) for n in widths]
    assert ops.panel_linear_group(x, [], []) == []


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_group_refuses_what_one_call_would(backend):
    panels = pack_panels(bf16(40, 64))
    with pytest.raises(ValueError, match="2 panel tensors but 1 output widths"):
        ops.panel_linear_group(bf16(2, 64), [panels, panels], [40], backend=backend)
    with pytest.raises(ValueError, match="x has 64 input features but the panels hold 32"):
        ops.panel_linear_group(bf16(2, 64), [panels, pack_panels(bf16(40, 32))], [40, 40], backend=backend)
    with pytest.raises(TypeError, match="panels must be float32 as x is"):
        ops.panel_linear_group(torch.randn(2, 64), [panels], [40], backend=backend)
    with pytest.raises(TypeError, match="x must be bfloat16 or float32"):
        ops.panel_linear_group(torch.randn(2, 64, dtype=torch.float16), [panels], [40], backend=backend)


def test_op_schema_and_fake_kernel():
    panels, bias = pack_panels(bf16(40, 64)), bf16(40)
    x = bf16(3, 64)
    torch.library.opcheck(torch.ops.trellis.panel_linear.default, (x, panels, bias, 40))
    torch.library.opcheck(torch.ops.trellis.panel_linear.default, (x, panels, None, 40))
    torch.library.opcheck(torch.ops.trellis.panel_linear_group.default, (x, [panels, panels], [40, 33]))
    fp32_panels = pack_panels(torch.randn(40, 64))
    torch.library.opcheck(torch.ops.trellis.panel_linear.default, (torch.randn(3, 64), fp32_panels, torch.randn(40), 40))
    compiled = torch.compile(lambda x: torch.ops.trellis.panel_linear(x, panels, None, 40) * 2, backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), 2 * ops.panel_linear(x, panels, None, 40))


PANELS = pack_panels(torch.zeros(40, 64, dtype=torch.bfloat16))
BAD_INPUTS = [  # (x, panels, bias, out_features, error, message)
    (torch.zeros(2, 64, dtype=torch.float16), PANELS, None, 40, TypeError, "x must be bfloat16 or float32"),
    (torch.randn(2, 64), PANELS, None, 40, TypeError, "panels must be float32 as x is"),
    (bf16(2, 64), PANELS.float(), None, 40, TypeError, "panels must be bfloat16 as x is"),
    (bf16(2, 64), PANELS, torch.zeros(40), 40, TypeError, "bias must be bfloat16 as x is"),
    (torch.randn(2, 64), PANELS.float(), None, 40, ValueError,
     "float32 panels must be [panels, in_features / 1, 16, 1]"),
    (bf16(2, 64), PANELS[:, :, :8], None, 40, ValueError, "panels must be [panels, in_features / 2, 16, 2]"),
    (bf16(2, 64), PANELS.transpose(0, 1), None, 40, ValueError, "panels must be"),
    (bf16(2, 48), PANELS, None, 40, ValueError, "x has 48 input features but the panels hold 64"),
    (bf16(2, 64), PANELS, None, 32, ValueError, "3 panels do not hold 32 output features"),
    (bf16(2, 64), PANELS, None, 49, ValueError, "3 panels do not hold 49 output features"),
    (bf16(2, 64), PANELS, bf16(39), 40, ValueError, "bias must be [40]"),
    (bf16(64), PANELS.transpose(2, 3).contiguous().transpose(2, 3), None, 40, ValueError, "panels must be contiguous"),
]


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize(("x", "panels", "bias", "out_features", "error", "message"), BAD_INPUTS)
def test_bad_input_is_refused_by_name(backend, x, panels, bias, out_features, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ops.panel_linear(x, panels, bias, out_features, backend=backend)


def test_pack_panels_refuses_what_it_cannot_pack():
    with pytest.raises(TypeError, match="weight must be bfloat16 or float32"):
        pack_panels(torch.zeros(4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=re.escape("in_features (7) must be even in bfloat16")):
        pack_panels(torch.zeros(4, 7, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="weight must be"):
        pack_panels(torch.zeros(4, 8, 2, dtype=torch.bfloat16))
