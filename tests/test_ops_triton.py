"""The Triton kernels against the float64 oracle.

Without a GPU the launchers run on CPU tensors in Triton's interpreter (``conftest.py`` sets
``TRITON_INTERPRET=1``), in fp32 and fp16. With one, the same cases run on CUDA, plus bf16, an
8k-token decode and ``opcheck``. Both through ``ops.paged_attention(..., backend="triton")``.
"""

import contextlib
import sys

import pytest
import torch

pytest.importorskip("triton")

from tests.attention_cases import SHAPES as COMMON_SHAPES
from tests.attention_cases import PagedCase, make_case, naive_attention, tolerance
from trellis import ops
from trellis.ops import triton as triton_backend
from trellis.ops.triton import decode
from trellis.ops.triton.decode import decode_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, *([torch.bfloat16] if CUDA else [])]

SHAPES = {  # (q_lens, kv_lens)
    **COMMON_SHAPES,
    "extend_many_query_blocks": ([70], [150]),  # > one 64-query block, tiles both phases
    "idle_sequence_decode": ([1, 0, 1], [5, 9, 20]),
    "idle_sequence_extend": ([3, 0, 2], [5, 9, 20]),
}


def args(case: PagedCase) -> tuple:
    return case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, case.scale


def triton_attention(case: PagedCase) -> torch.Tensor:
    case = case.to(DEVICE)
    out = torch.zeros_like(case.q)  # rows of idle sequences stay 0, as the oracle's
    ops.paged_attention(*args(case), out=out, backend="triton")
    return out.cpu()


def assert_matches_oracle(out: torch.Tensor, case: PagedCase) -> None:
    tol = tolerance(case.q.dtype)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=tol, rtol=tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [1, 8, 16, 32, 64, 256])
def test_shapes_and_block_sizes(shape, block_size):
    case = make_case(*SHAPES[shape], block_size=block_size)
    assert_matches_oracle(triton_attention(case), case)


@pytest.mark.parametrize("shape", ["extend_over_prefix", "decode", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(shape, dtype):
    case = make_case(*SHAPES[shape], block_size=16, dtype=dtype)
    assert_matches_oracle(triton_attention(case), case)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (9, 3), (32, 4), (8, 1)])
@pytest.mark.parametrize("shape", ["decode", "mixed"])
def test_gqa_groups(heads, shape):
    case = make_case(*SHAPES[shape], num_q_heads=heads[0], num_kv_heads=heads[1], block_size=8, dtype=torch.float16)
    assert_matches_oracle(triton_attention(case), case)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("shape", ["decode", "mixed"])
def test_head_dims(head_dim, shape):
    case = make_case(*SHAPES[shape], head_dim=head_dim, block_size=16)
    assert_matches_oracle(triton_attention(case), case)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_split_k_decode(num_splits):
    # 8 slices of a 7-key context leave most of them empty; 300 keys cross several tiles per slice.
    case = make_case([1, 1, 1, 1], [300, 7, 129, 64], num_q_heads=9, num_kv_heads=3, block_size=16).to(DEVICE)
    out = torch.empty_like(case.q)
    decode_attention(*args(case), out, num_splits=num_splits)
    assert_matches_oracle(out.cpu(), case.to("cpu"))


# The opt-in shared memory per program: sm_86/sm_89 (RTX 30/40, L4, L40), sm_80 (A100), sm_90 (H100, H200).
SHARED_LIMITS = {"sm_86": 101_376, "sm_80": 166_912, "sm_90": 232_448}


@pytest.mark.parametrize("gpu", SHARED_LIMITS)
def test_decode_tiles_fit_the_shared_memory(gpu):
    """Every head dim, dtype size and GQA group gets tiles whose shared memory fits the GPU, the
    key tile never below tl.dot's 16; what fits already keeps the whole group and _TILES' tile."""
    limit = SHARED_LIMITS[gpu]
    for element_size in (2, 4):
        for head_dim in (16, 32, 64, 128, 256):
            for group in (1, 3, 8, 32, 48, 64, 128):
                heads, tile_n, _ = decode.decode_tiles(element_size, head_dim, group, limit)
                whole = decode.decode_tiles(element_size, head_dim, group, None)
                assert decode.shared_bytes(element_size, head_dim, heads, tile_n) + decode._SHARED_SCRATCH <= limit
                assert tile_n >= 16 and heads >= 16 and heads & (heads - 1) == 0
                if decode.shared_bytes(element_size, head_dim, *whole[:2]) + decode._SHARED_SCRATCH <= limit:
                    assert (heads, tile_n) == whole[:2]
    # fp32, head dim 256, a group of 64: 102,720 bytes as one program (Triton's count), over sm_86's 101,376
    assert decode.decode_tiles(4, 256, 64, SHARED_LIMITS["sm_86"]) == (32, 16, 8)
    assert decode.decode_tiles(4, 256, 64, SHARED_LIMITS["sm_90"]) == (64, 16, 8)


@pytest.mark.parametrize("shared_limit", [14_000, 10_000])
def test_decode_splits_a_group_over_programs_where_shared_memory_is_short(monkeypatch, shared_limit):
    """Groups of 48 query heads (two KV heads) cut into programs of 32 or 16 heads, the last one
    part padding, give the oracle's answer."""
    monkeypatch.setattr(decode, "shared_memory_limit", lambda device: shared_limit)
    heads, _, _ = decode.decode_tiles(4, 32, 48, shared_limit)
    assert heads == {14_000: 32, 10_000: 16}[shared_limit]
    case = make_case([1, 1, 1], [300, 7, 129], num_q_heads=96, num_kv_heads=2, head_dim=32, block_size=16).to(DEVICE)
    for num_splits in (1, 3):
        out = torch.empty_like(case.q)
        decode_attention(*args(case), out, num_splits=num_splits)
        assert_matches_oracle(out.cpu(), case.to("cpu"))


def test_store_kv_from_strided_views():
    num_blocks, block_size, num_kv_heads, head_dim = 6, 8, 3, 16
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float16, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    # K and V as views of a fused projection [T, Hq + 2 * Hkv, D]: token stride 12 * D.
    qkv = torch.randn(5, 6 + 2 * num_kv_heads, head_dim, device=DEVICE).half()
    k, v = qkv[:, 6:9], qkv[:, 9:]
    slots = torch.tensor([5 * 8 + 7, 0, 13, 14, 22], dtype=torch.int64, device=DEVICE)
    triton_backend.store_kv(k, v, k_cache, v_cache, slots)
    k_expected, v_expected = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    ops.store_kv(k, v, k_expected, v_expected, slots, backend="reference")
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_store_kv_skips_slots_outside_the_cache():
    """Slots are not read back from the device: a row whose slot is -1 or past the cache writes
    nothing, in its layer or in the pool's other tensors beside it (the CPU kernels refuse it)."""
    pool = torch.zeros(2, 2, 4, 4, 2, 16, device=DEVICE)  # [layers, K/V, blocks, block_size, Hkv, D]
    k = torch.randn(4, 2, 16, device=DEVICE)
    slots = torch.tensor([3, -1, 16, 2**40], device=DEVICE)
    triton_backend.store_kv(k, 2 * k, pool[0, 0], pool[0, 1], slots)
    expected = torch.zeros_like(pool)
    expected[0, 0].view(16, 2, 16)[3], expected[0, 1].view(16, 2, 16)[3] = k[0], 2 * k[0]
    assert torch.equal(pool, expected)
    with pytest.raises(ValueError, match="power-of-two head_dim from 16 to 256, got 48"):
        triton_backend.store_kv(torch.randn(1, 2, 48), torch.randn(1, 2, 48), torch.zeros(2, 4, 2, 48),
                                torch.zeros(2, 4, 2, 48), torch.tensor([0]))


def test_plan_refuses_lengths_the_shapes_rule_out():
    case = make_case([1, 3], [5, 9]).to(DEVICE)  # block table: 3 blocks of 4
    plan = {"num_tokens": 4, "num_q_heads": case.q.shape[1], "k_cache": case.k_cache, "backend": "triton"}
    sequences = case.block_table, case.seq_lens, case.cu_seqlens_q
    with pytest.raises(ValueError, match="max_q_len = 0 does not fit 4 query tokens"):
        ops.plan_attention(*sequences, **plan, max_q_len=0, max_kv_len=9)
    with pytest.raises(ValueError, match="max_q_len = 5 does not fit 4 query tokens"):
        ops.plan_attention(*sequences, **plan, max_q_len=5, max_kv_len=9)
    with pytest.raises(ValueError, match="a context holds at most the block table's 12 keys"):
        ops.plan_attention(*sequences, **plan, max_q_len=3, max_kv_len=13)
    with pytest.raises(ValueError, match="a query is no longer than its context"):
        ops.plan_attention(*sequences, **plan, max_q_len=3, max_kv_len=2)


ONE_CALL_REFUSALS = {  # what the C++ plan refuses, the one-call Triton path refuses from its one readback
    "cu_seqlens_q past T": (lambda c: c.cu_seqlens_q.copy_(torch.tensor([0, 1, 40])), "run from 0 to T = 4"),
    "more queries than keys": (lambda c: c.seq_lens.copy_(torch.tensor([5, 2])), "queries <= seq_lens"),
    "a context past its block table": (lambda c: c.seq_lens.copy_(torch.tensor([5, 13])), "seq_lens <= its block"),
    "a block id outside the cache": (lambda c: c.block_table[1, 1].fill_(10_000), "1 block ids .* outside the cache"),
}


def test_one_call_with_nothing_to_compute_checks_the_query_ranges():
    """An empty batch with query tokens, or rows whose ranges count tokens q does not have: refused
    as the C++ op refuses them, not answered with out left unwritten."""
    case = make_case([1, 3], [5, 9]).to(DEVICE)
    empty_table, no_lens = case.block_table[:0], case.seq_lens[:0]
    with pytest.raises(ValueError, match=r"run from 0 to T = 4, got \[0, 0\]"):
        ops.paged_attention(case.q, case.k_cache, case.v_cache, empty_table, no_lens, case.cu_seqlens_q[:1],
                            case.scale, backend="triton")
    with pytest.raises(ValueError, match=r"run from 0 to T = 0, got \[0, 4\]"):
        ops.paged_attention(case.q[:0], case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.cu_seqlens_q,
                            case.scale, backend="triton")
    zero = torch.zeros_like(case.cu_seqlens_q)  # rows without query tokens: nothing to do, fine
    assert ops.paged_attention(case.q[:0], case.k_cache, case.v_cache, case.block_table, case.seq_lens, zero,
                               case.scale, backend="triton").shape == (0, *case.q.shape[1:])


@pytest.mark.parametrize("edit", ONE_CALL_REFUSALS)
def test_one_call_refuses_what_the_kernels_would_trust(edit):
    change, message = ONE_CALL_REFUSALS[edit]
    case = make_case([1, 3], [5, 9])
    change(case)
    with pytest.raises(ValueError, match=message):
        triton_attention(case)


def test_kernels_launch_inside_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device, not the tensors': every launch runs under
    launch_device(the tensors' device), which makes a CUDA device current and is nothing on CPU."""
    made_current = triton_backend.launch_device(torch.device("cuda", 1))
    assert isinstance(made_current, torch.cuda.device) and made_current.idx == 1
    assert isinstance(triton_backend.launch_device(torch.device("cpu")), contextlib.nullcontext)
    current: list[torch.device] = []  # what the fake made current, while it is

    @contextlib.contextmanager
    def fake_launch_device(device: torch.device):
        current.append(device)
        yield
        current.pop()

    launches = []

    def recorded(name: str, real):
        def launch(*arguments, **options):
            launches.append((name, list(current)))
            return real(*arguments, **options)
        return launch

    for name in ("store_kv_rows", "decode_attention", "extend_attention"):
        monkeypatch.setattr(triton_backend, name, recorded(name, getattr(triton_backend, name)))
    monkeypatch.setattr(triton_backend, "launch_device", fake_launch_device)
    device = torch.empty(0, device=DEVICE).device  # as the tensors name it (cuda:0, not cuda)
    for shape in ("decode", "mixed"):
        case = make_case(*SHAPES[shape], block_size=16)
        assert_matches_oracle(triton_attention(case), case)
    k = torch.randn(3, 2, 16, device=device)
    k_cache = torch.zeros(4, 4, 2, 16, device=device)
    triton_backend.store_kv(k, k, k_cache, torch.zeros_like(k_cache), torch.tensor([0, 5, 9], device=device))
    assert launches == [("decode_attention", [device]), ("extend_attention", [device]), ("store_kv_rows", [device])]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_a_device_that_is_not_current():
    with torch.cuda.device(0):
        for shape in ("decode", "mixed"):
            case = make_case(*SHAPES[shape], block_size=16).to("cuda:1")
            out = torch.zeros_like(case.q)
            ops.paged_attention(*args(case), out=out, backend="triton")
            assert_matches_oracle(out.cpu(), case.to("cpu"))


def test_bad_arguments_name_the_problem():
    case = make_case([2], [5], head_dim=8).to(DEVICE)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        triton_backend.paged_attention(*args(case), torch.empty_like(case.q))
    case = make_case([2], [5], dtype=torch.float64).to(DEVICE)
    with pytest.raises(ValueError, match="the Triton kernels take"):
        triton_backend.paged_attention(*args(case), torch.empty_like(case.q))


@pytest.mark.skipif(CUDA, reason="CPU tensors only reach the kernels under the interpreter")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    case = make_case([1], [5])
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        triton_backend.paged_attention(*args(case), torch.empty_like(case.q))


@pytest.mark.skipif(CUDA, reason="the interpreter runs only where there is no GPU")
def test_interpreter_refuses_bf16():
    case = make_case([1], [5], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="no bf16"):
        triton_backend.paged_attention(*args(case), torch.empty_like(case.q))


def test_interpreter_switch_read_without_triton_knobs(monkeypatch):
    """Triton 3.2 and 3.3 have no triton.knobs: there TRITON_INTERPRET itself is the switch."""
    import triton

    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.setitem(sys.modules, "triton.knobs", None)  # `from triton import knobs` raises ImportError
    for value, interpreting in (("1", True), ("0", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_backend.interpreting() is interpreting


def test_load_registers_only_with_cuda():
    assert triton_backend.load()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("trellis::paged_attention", "CUDA") == CUDA


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_8k_context(dtype):
    case = make_case([1, 1], [8192, 3000], num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=32, dtype=dtype)
    assert triton_backend.decode_splits(2, 8, 8192, torch.device("cuda")) > 1
    assert_matches_oracle(triton_attention(case), case)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_opcheck_on_cuda():
    assert triton_backend.load()
    case = make_case([3, 1], [9, 14], dtype=torch.float16).to("cuda")
    plan_args = (case.k_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, case.q.shape[1], 3, 14)
    torch.library.opcheck(torch.ops.trellis.plan_paged_attention.default, plan_args)
    plan = torch.ops.trellis.plan_paged_attention(*plan_args)
    for with_plan in (None, plan):
        torch.library.opcheck(torch.ops.trellis.paged_attention.default, (*args(case), torch.empty_like(case.q), with_plan))
    k = torch.randn(5, 2, 16, device="cuda").half()
    slots = torch.randperm(case.k_cache.shape[0] * case.k_cache.shape[1], device="cuda")[:5]
    torch.library.opcheck(
        torch.ops.trellis.store_kv.default, (k, k.clone(), case.k_cache.clone(), case.v_cache.clone(), slots)
    )


def test_a_head_size_the_kernels_cannot_take_is_refused_at_load(monkeypatch):
    from tests.models import tiny_config, tiny_pair

    config = tiny_config(hidden_size=96, num_attention_heads=2, num_key_value_heads=1)  # head_dim 48
    _, model = tiny_pair(config=config)
    with pytest.raises(ValueError, match="the triton kernels need a power-of-two head_dim from 16 to 256, this "
                                         "model's is 48: use backend='reference'"):
        model.configure_cache(block_size=4, num_blocks=64, backend="triton")  # refused as configured
    assert model.runner.settings.backend is None
    model.configure_cache(block_size=4, num_blocks=64)
    assert model.attention_backend() == ops.default_backend(model.device)
    monkeypatch.setattr(ops, "default_backend", lambda device: "triton")  # as on CUDA
    monkeypatch.delenv("TRELLIS_BACKEND", raising=False)
    assert model.attention_backend() == "reference"  # the default falls back; a named backend is refused
