"""The C++ CPU kernels (kernels/*.cpp) against the float64 oracle, the reference, and themselves;
their plans and what they refuse; then all of that again over the kernels built with
AddressSanitizer, in a child process."""

import math
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from tests.attention_cases import (
    SHAPES,
    PagedCase,
    make_case,
    naive_attention,
    opcheck_ops,
    tiled_bf16_attention,
    tolerance,
)
from tests.kernel_builds import kernels_for, rerun_over
from trellis import ops
from trellis.ops import cpp

BLOCK_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Which bf16 units the kernel's attention multiplies on here (item_scores): an AVX-512 build
# on a Linux CPU with AVX512_BF16, and AMX-BF16 (every such CPU has AVX512_BF16) for AMX tiles.
_CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if sys.platform.startswith("linux") else set()
BF16_DOTS = cpp.capability() == "AVX512" and "avx512_bf16" in _CPU_FLAGS
AMX_TILES = BF16_DOTS and "amx_bf16" in _CPU_FLAGS


@contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module", autouse=True)
def cpp_kernels():
    with kernels_for(("store_kv_cpu.cpp", "paged_attention_cpu.cpp", "panel_linear_cpu.cpp")):
        yield


def attend(case: PagedCase, backend: str = "cpp", out: torch.Tensor | None = None) -> torch.Tensor:
    return ops.paged_attention(
        case.q,
        case.k_cache,
        case.v_cache,
        case.block_table,
        case.seq_lens,
        case.cu_seqlens_q,
        case.scale,
        out=out,
        backend=backend,
    )


def assert_matches_oracle(case: PagedCase) -> None:
    """fp32: within tolerance(); fp16/bf16: at most twice the error of the low-precision reference."""
    expected = naive_attention(case)
    error = (attend(case).double() - expected).abs().max().item()
    if case.q.dtype == torch.float32:
        assert error <= tolerance(torch.float32), error
    else:
        reference_error = (attend(case, "reference").double() - expected).abs().max().item()
        assert error <= max(2 * reference_error, tolerance(torch.float32)), (error, reference_error)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_oracle(shape, block_size, dtype):
    q_lens, kv_lens = SHAPES[shape]
    assert_matches_oracle(make_case(q_lens, kv_lens, block_size=block_size, dtype=dtype))


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (9, 3), (6, 1), (32, 4), (64, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_groupings(heads, dtype):
    assert_matches_oracle(make_case([2, 1, 19], [10, 7, 45], num_q_heads=heads[0], num_kv_heads=heads[1], dtype=dtype))


@pytest.mark.parametrize("head_dim", [8, 9, 24, 64, 128])
def test_head_dims(head_dim):
    # 8, 9 and 24 are not whole AVX-512 vectors: the scalar tail of P @ V by rows runs (the one-token
    # sequence; the five-token one accumulates by columns, a partial block of d); 9 is odd, so the
    # paired layout (two elements of d per lane pair) is off.
    assert_matches_oracle(make_case([1, 5], [30, 70], head_dim=head_dim, block_size=16))


@pytest.mark.parametrize("q_len", range(33, 49))
def test_smollm2_prompt_lengths(q_len):
    # SmolLM2's heads (9 query heads over 3 KV heads, head_dim 64): work items of 99-144 query
    # rows, where a score tile once overran its workspace on AVX-512; cold and over a prefix.
    assert_matches_oracle(make_case([q_len, q_len], [q_len, 100 + q_len], num_q_heads=9, num_kv_heads=3,
                                    head_dim=64, block_size=32))


@pytest.mark.parametrize("head_dim", [9, 24, 32, 48, 64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32, 64])
def test_bf16_scores(head_dim, block_size):
    """bf16 extends, whose scores come from bf16 pairs: on AMX tiles where the CPU has AMX-BF16
    (head_dim a multiple of 32; the decodes beside them too), else from AVX512_BF16 dot products
    where it has those (head_dim a multiple of 16); other head dims (9, 24), the decodes beside
    those, and other CPUs take the fp32 vector path:
    1-47 keys past the last whole 16-key block of a tile, one to four 16-row blocks of query rows
    (an odd count leaves one alone), within twice the reference's error of the float64 oracle."""
    q_lens, kv_lens = [1, 3, 5, 7, 16, 2], [7, 19, 33, 70, 64, 120]
    assert_matches_oracle(make_case(q_lens, kv_lens, num_q_heads=9, num_kv_heads=3, head_dim=head_dim,
                                    block_size=block_size, dtype=torch.bfloat16))


@pytest.mark.parametrize("scale", [2.5, 0.0, -0.3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_scale(scale, dtype):
    """Scales other than head_dim ** -0.5, zero and negative ones included: bf16 scores from bf16
    pairs are scaled inside the softmax (after their max, which a positive scale commutes with),
    others before it."""
    case = make_case([1, 5, 3], [9, 40, 70], num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=16, dtype=dtype)
    assert_matches_oracle(replace(case, scale=scale))


def test_long_extend_spans_many_query_tiles():
    assert_matches_oracle(make_case([150, 1], [300, 90], num_q_heads=9, num_kv_heads=3, head_dim=32, block_size=32))


def test_decode_8k_context():
    assert_matches_oracle(make_case([1, 1], [8192, 5000], num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=32))


@pytest.mark.parametrize("q_len", [1, 3])
def test_split_keys_match_unsplit(q_len):
    # Eight sequences fill both threads' queues, so each runs whole; alone, the first is split.
    batch = make_case([q_len] * 8, [3000] * 8, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16)
    alone = make_case([q_len], [3000], num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16)
    alone.k_cache, alone.v_cache, alone.q = batch.k_cache, batch.v_cache, batch.q[:q_len]
    alone.block_table = batch.block_table[:1].contiguous()
    with torch_threads(2):
        unsplit, split = attend(batch)[:q_len], attend(alone)
    torch.testing.assert_close(split, unsplit, atol=1e-5, rtol=1e-5)
    assert_matches_oracle(alone)


def invariant_attend(case: PagedCase) -> torch.Tensor:
    plan = case.plan("cpp", batch_invariant=True)
    return ops.run_attention(plan, case.q, case.k_cache, case.v_cache, case.scale)


def one_token(case: PagedCase, token: int, seq: int = 0) -> PagedCase:
    """Query token ``token`` (a packed index) of sequence ``seq`` alone: a decode step over the
    keys it sees, on the same cache."""
    q_len = int(case.cu_seqlens_q[seq + 1] - case.cu_seqlens_q[seq])
    keys = int(case.seq_lens[seq]) - q_len + (token - int(case.cu_seqlens_q[seq])) + 1
    return PagedCase(case.q[token : token + 1], case.k_cache, case.v_cache, case.block_table[seq : seq + 1].clone(),
                     torch.tensor([keys], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32), case.scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(("kv_len", "q_len", "block_size"), [(600, 120, 32), (300, 300, 16), (40, 7, 4), (1100, 2, 32)])
def test_a_batch_invariant_plan_computes_a_row_alike_in_any_batch(dtype, threads, kv_len, q_len, block_size):
    """A prefill's rows equal, bit for bit, those of each token decoded alone over the keys it
    sees (pieces of 256 keys, causal limits inside and across them), and those of the same tokens
    in a batch beside other sequences (decodes sharing the prompt's blocks, another prefill),
    whatever the thread count; and they match the oracle."""
    case = make_case([q_len], [kv_len], num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=block_size,
                     dtype=dtype, spare_blocks=80)
    with torch_threads(threads):
        rows = invariant_attend(case)
        for token in sorted({0, q_len // 2, q_len - 1, *range(0, q_len, 37)}):
            assert torch.equal(invariant_attend(one_token(case, token)), rows[token : token + 1]), token
        # Beside others: the first and last tokens decoded over the same blocks (sessions sharing a
        # prompt, which a batch-invariant plan does not read as one) and a prefill of 5 tokens.
        other = torch.randn(5, 9, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
        mixed = PagedCase(torch.cat([case.q[:1], case.q, case.q[-1:], other]), case.k_cache, case.v_cache,
                          case.block_table.repeat(4, 1),
                          torch.tensor([kv_len - q_len + 1, kv_len, kv_len, min(kv_len, 20)], dtype=torch.int32),
                          torch.tensor([0, 1, 1 + q_len, 2 + q_len, 7 + q_len], dtype=torch.int32), case.scale)
        together = invariant_attend(mixed)
        assert torch.equal(together[1 : 1 + q_len], rows)
        assert torch.equal(together[:1], rows[:1]) and torch.equal(together[1 + q_len : 2 + q_len], rows[-1:])
    if dtype == torch.float32:
        assert (rows.double() - naive_attention(case)).abs().max().item() <= tolerance(torch.float32)


def test_a_batch_invariant_plan_is_the_cpp_backends_alone():
    case = make_case([3], [9])
    with pytest.raises(ValueError, match="a batch-invariant plan .* is the C\\+\\+ CPU backend's alone"):
        case.plan("reference", batch_invariant=True)
    torch.library.opcheck(torch.ops.trellis.plan_paged_attention.default,  # (its checks that can hold: opcheck_ops)
                          (case.k_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, 4, 3, 9, True),
                          test_utils=("test_autograd_registration", "test_faketensor"))


def shared_prefix_case(own_keys: list[int], shared_blocks: int, block_size: int = 4, dtype=torch.float32,
                       q_lens: list[int] | None = None, sharing: list[bool | int] | None = None) -> PagedCase:
    """Sequences whose block tables begin with the same ``shared_blocks`` blocks (sessions over one
    cached prompt; those ``sharing`` False have their own, those ``sharing`` n the first n only),
    then ``own_keys`` keys each; decode tokens unless ``q_lens`` says otherwise. GQA groups of 3,
    as SmolLM2's."""
    q_lens = q_lens or [1] * len(own_keys)
    sharing = sharing or [True] * len(own_keys)
    case = make_case(q_lens, [shared_blocks * block_size + n for n in own_keys], num_q_heads=9, num_kv_heads=3,
                     head_dim=32, block_size=block_size, dtype=dtype)
    first = sharing.index(True)
    for i, shares in enumerate(sharing):
        blocks = shared_blocks if shares is True else shares  # (False: 0)
        case.block_table[i, :blocks] = case.block_table[first, :blocks]
    return case


@dataclass
class PlanItem:
    seq: int
    kv_begin: int
    kv_end: int
    q_tokens: int


def plan_items(case: PagedCase) -> tuple[list[PlanItem], int]:
    """The work items of the C++ plan for ``case``, and how many outputs it merges, read from the
    encoded plan: kernels/attention_plan.h's PlanHeader (a magic number, 14 facts, then threads,
    partials, partial_rows, the counts of items, merge groups and parts, and batch_invariant),
    then the items as kernels/work_plan.h's WorkItem (nine int64 each)."""
    encoded = case.plan("cpp").backend_plan.tolist()
    items, groups = encoded[18], encoded[19]
    rows = [encoded[22 + 9 * i : 31 + 9 * i] for i in range(items)]
    return [PlanItem(seq=r[0], q_tokens=r[4], kv_begin=r[6], kv_end=r[7]) for r in rows], groups


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "own_keys, shared_blocks, block_size, q_lens, sharing",
    [
        ([5, 9, 1, 13], 12, 4, None, None),  # four sessions, short own tails
        ([33, 40, 65, 2], 14, 32, None, None),  # the seed's shape: 448 shared keys
        ([0, 3], 16, 4, None, None),  # a session with no key of its own
        ([70] * 8, 40, 16, None, None),  # the shared range long enough to split
        ([3] * 25, 10, 4, None, None),  # more sessions than one item's rows: two runs
        ([4, 6, 5, 7], 12, 4, [1, 1, 5, 1], None),  # a prefill between decodes breaks the run
        ([4, 6, 5, 7], 12, 4, None, [True, False, True, True]),  # a session over another prompt
        ([4, 6, 5, 7], 20, 4, None, [8, True, True, True]),  # one sharing 8 blocks before three sharing 20
    ],
)
def test_shared_prefix_decode_matches_oracle(dtype, threads, own_keys, shared_blocks, block_size, q_lens, sharing):
    case = shared_prefix_case(own_keys, shared_blocks, block_size, dtype, q_lens, sharing)
    with torch_threads(threads):
        assert_matches_oracle(case)


def test_shared_prefix_is_read_once():
    # Four sessions over 48 shared keys: one item reads them for all four tokens, each session's
    # own keys are an item of their own, and the four outputs are merged. One thread: no splits.
    # Items hold both KV heads where their rows fit (AVX-512), one each where not (AVX2's 32 rows):
    # the same items per KV-head group, and a merged output per session and group.
    case = shared_prefix_case([5, 9, 1, 13], shared_blocks=12)
    with torch_threads(1):
        items, merged = plan_items(case)
    head_groups = sum(i.q_tokens == 4 for i in items)
    assert sorted((i.seq, i.q_tokens, i.kv_begin, i.kv_end) for i in items) == sorted(head_groups * [
        (0, 1, 48, 53), (0, 4, 0, 48), (1, 1, 48, 57), (2, 1, 48, 49), (3, 1, 48, 61)])
    assert head_groups in (1, 2) and merged == 4 * head_groups
    # Sessions over different prompts, or shorter common prefixes than a key tile, run alone.
    assert plan_items(shared_prefix_case([5, 9, 1, 13], 12, sharing=[True, False, False, False]))[1] == 0
    assert plan_items(shared_prefix_case([5, 9, 1, 13], shared_blocks=7))[1] == 0
    # One sharing 32 keys (the chat template's, say) before three sharing 80: those three share 80,
    # and the first runs alone.
    items, merged = plan_items(shared_prefix_case([5, 9, 1, 13], shared_blocks=20, sharing=[8, True, True, True]))
    head_groups = sum(i.q_tokens == 3 for i in items)
    assert head_groups in (1, 2) and merged == 3 * head_groups and sorted((i.seq, i.q_tokens, i.kv_begin, i.kv_end) for i in items) == sorted(
        head_groups * [(0, 1, 0, 85), (1, 1, 80, 89), (1, 3, 0, 80), (2, 1, 80, 81), (3, 1, 80, 93)])


@pytest.mark.parametrize("q_len", [51, 64, 100, 512])
def test_extend_queries_fill_whole_vectors(q_len):
    # An item pays for its rows in whole SIMD vectors (16 rows on AVX-512, 8 elsewhere), at most four.
    # SmolLM2's 3 rows a token (9 query heads over 3 KV heads): the fewest tiles, sharing the fewest
    # vectors the tokens allow, evenly, so no tile is short (it would read every key for a few rows).
    # On AVX-512, 64 tokens take four tiles of 16, not three of 21 and one of a single token; 51
    # tokens (153 rows) take 10 vectors (16 + 15 + 20 tokens), where three tiles of 17 took 12.
    # One thread: no splits.
    lanes = 16 if cpp.capability() == "AVX512" else 8
    case = make_case([q_len], [512 + q_len], num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=32)
    with torch_threads(1):
        items, merged = plan_items(case)
    tiles = sorted((i.kv_end - i.q_tokens, i.q_tokens) for i in items)[::3]  # one KV head's (first token, tokens)
    tile_tokens = 4 * lanes // 3
    vectors = [math.ceil(3 * tokens / lanes) for _, tokens in tiles]
    even_cut = [math.ceil(3 * (q_len * (t + 1) // len(tiles) - q_len * t // len(tiles)) / lanes)
                for t in range(len(tiles))]
    assert merged == 0 and len(items) == 3 * len(tiles) == 3 * math.ceil(q_len / tile_tokens)
    assert [start for start, _ in tiles] == [512 + sum(t for _, t in tiles[:i]) for i in range(len(tiles))]
    assert sum(t for _, t in tiles) == q_len and max(vectors) <= 4 and sum(vectors) <= sum(even_cut)
    assert max(vectors) - min(vectors) <= 1  # the vectors spread evenly
    if q_len == 51:
        assert sum(vectors) == math.ceil(3 * q_len / lanes) < sum(even_cut)
    if q_len == 64 and lanes == 16:
        assert [t for _, t in tiles] == [16] * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_caches_are_accumulated_in_fp32(dtype):
    """fp16 / bf16 K/V are read into fp32, and the softmax and P @ V accumulate in fp32 over the
    whole context: the output is the float64 oracle over the same inputs, rounded once (within
    one unit in the last place); for bf16 on CPUs with bf16 units, the oracle whose tile probabilities
    enter P @ V in bf16 (tiled_bf16_attention; one thread, so that no item is split). Accumulating 8k
    keys in the storage dtype would be off by many."""
    case = make_case([1, 5], [8192, 3000], num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=32, dtype=dtype)
    units = dtype == torch.bfloat16 and BF16_DOTS
    with torch_threads(1 if units else torch.get_num_threads()):
        got = attend(case).double()
    expected, slack = tiled_bf16_attention(case, AMX_TILES) if units else (naive_attention(case), 0.0)
    error = (got - expected).abs()
    assert (error <= expected.abs() * torch.finfo(dtype).eps + slack + (2 ** -12 if units else 1e-6)).all(), error.max()


@pytest.mark.skipif(not BF16_DOTS, reason="bf16 P @ V runs on bf16 units only on CPUs with AVX512_BF16 or AMX")
@pytest.mark.parametrize("head_dim", [32, 48, 64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32, 48, 64])
def test_bf16_probabilities(head_dim, block_size):
    """bf16 items whose scores come from bf16 units take P @ V from them as well, each key tile's
    probabilities rounded to bf16 (as SDPA and Triton take them): on AMX tiles (head_dim a multiple
    of 32), else on AVX512_BF16 dot products (head_dim a multiple of 16), every item, a decode's
    few rows included, so that an item's size never changes them. On one thread (no split items) the
    output is tiled_bf16_attention's within one unit in the last place and 2^-12, plus its slack
    where exp's approximation may round a probability the other way (a near tie; the kernel's
    scores and exp are fp32: a few rows in a hundred have one). 3 to 63 query rows an item (one to four 16-row blocks),
    tiles of 8 to 128 keys (on AMX, runs chained across blocks of 32, 48 and 64 keys for more than
    16 rows), contexts ending 1 to 31 keys past a whole run; a decode's 3 rows and a 2-token
    extend's 6 as well (in key lanes: the 3 rows everywhere, the 6 without AMX; the second token sees one
    key more)."""
    case = make_case([4, 16, 21, 9, 1, 2], [4, 101, 300, 45, 77, 50], num_q_heads=9, num_kv_heads=3,
                     head_dim=head_dim, block_size=block_size, dtype=torch.bfloat16)
    with torch_threads(1):
        got = attend(case).double()
    expected, slack = tiled_bf16_attention(case, AMX_TILES)
    error = (got - expected).abs()
    assert (error <= expected.abs() * 2 ** -7 + slack + 2 ** -12).all(), error.max()


def test_thread_counts_agree():
    # A mixed batch: the decode items hold both KV heads, the extend items one; with 3 threads
    # the long decodes are split as well.
    case = make_case([1, 40, 1], [700, 120, 2000], num_q_heads=8, num_kv_heads=2, block_size=8)
    expected = naive_attention(case)
    for n in (1, 2, 3):
        with torch_threads(n):
            torch.testing.assert_close(attend(case).double(), expected, atol=2e-5, rtol=2e-5)


def test_zero_length_sequences_are_skipped():
    case = make_case([0, 2, 0], [5, 9, 0 + 1], block_size=4)
    out = torch.full_like(case.q, 7.0)
    attend(case, out=out)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_matches_reference(dtype):
    k_cache = torch.randn(6, 8, 3, 16).to(dtype)
    v_cache = torch.randn(6, 8, 3, 16).to(dtype)
    k = torch.randn(3, 10, 16).to(dtype).transpose(0, 1)  # [T, Hkv, D] with heads not adjacent
    v = torch.randn(10, 3, 16).to(dtype)
    slots = torch.randperm(48)[:10]
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    ops.store_kv(k, v, expected_k, expected_v, slots, backend="reference")
    ops.store_kv(k, v, k_cache, v_cache, slots, backend="cpp")
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize(("rows", "out_features", "in_features"), [(1, 17, 30), (7, 40, 64), (13, 1, 2), (64, 200, 96)])
def test_panel_linear_stays_in_bounds(rows, out_features, in_features):
    """Row and feature tails (rows past a register block, a last panel of fewer than 16 features,
    with and without a bias): under the sanitizer, every read and masked store stays in bounds."""
    torch.manual_seed(rows)
    weight, x = torch.randn(out_features, in_features).bfloat16(), torch.randn(rows, in_features).bfloat16()
    panels = ops.panels.pack_panels(weight)
    for bias in (None, torch.randn(out_features).bfloat16()):
        got = ops.panel_linear(x, panels, bias, out_features, backend="cpp")
        ref = ops.panel_linear(x, panels, bias, out_features, backend="reference")
        torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-2)


def test_opcheck():
    opcheck_ops()  # torch.ops.trellis on CPU tensors: the C++ kernels


def call_kernel(case: PagedCase, **changes: torch.Tensor | None) -> None:
    """The C++ kernel straight through the dispatcher, past the Python checks."""
    args = {
        "q": case.q,
        "k_cache": case.k_cache,
        "v_cache": case.v_cache,
        "block_table": case.block_table,
        "seq_lens": case.seq_lens,
        "cu_seqlens_q": case.cu_seqlens_q,
        "scale": case.scale,
        "out": torch.empty_like(case.q),
        "plan": None,
    }
    args.update(changes)
    torch.ops.trellis.paged_attention(*args.values())


@pytest.mark.parametrize(
    "changes, message",
    [
        (lambda c: {"block_table": c.block_table.long()}, "block_table must be a contiguous int32"),
        (lambda c: {"seq_lens": c.seq_lens[:1]}, "seq_lens must be int32"),
        (lambda c: {"q": c.q.double(), "out": c.q.double()}, "supports float32, float16 and bfloat16"),
        (lambda c: {"q": c.q.half(), "out": c.q.half()}, "q dtype Half != cache dtype Float"),
        (lambda c: {"q": c.q[:, :3].contiguous(), "out": c.q[:, :3].contiguous()}, "not a multiple of KV heads"),
        (lambda c: {"k_cache": c.k_cache.transpose(0, 1), "v_cache": c.v_cache.transpose(0, 1)}, "must be contiguous"),
        (lambda c: {"q": c.q[0]}, "q must be \\[T, Hq, D\\]"),
        (lambda c: {"out": c.q[:1]}, "out must match q"),
        (lambda c: {"seq_lens": c.seq_lens + 50}, "exceeds its block table"),
        (lambda c: {"seq_lens": c.seq_lens - c.seq_lens}, "queries but seq_lens"),
        (lambda c: {"block_table": c.block_table + 100}, "is outside the cache"),
        (lambda c: {"cu_seqlens_q": c.cu_seqlens_q - 1}, "cu_seqlens_q must run from 0"),
        # Views the kernel would read through their data pointers, past what they show.
        (lambda c: {"seq_lens": c.seq_lens.repeat_interleave(2)[::2]}, "seq_lens and cu_seqlens_q must be contiguous"),
        (lambda c: {"cu_seqlens_q": c.cu_seqlens_q.repeat_interleave(2)[::2]}, "must be contiguous"),
        # Sizes the kernel divides by (a SIGFPE before these checks).
        (lambda c: {"k_cache": c.k_cache[:, :, :0], "v_cache": c.v_cache[:, :, :0]}, "the cache needs a KV head"),
        (lambda c: {"q": c.q[:, :0].contiguous(), "out": c.q[:, :0].contiguous()}, "q needs a query head"),
        (lambda c: {"q": c.q[..., :0].contiguous(), "out": c.q[..., :0].contiguous(), "k_cache": c.k_cache[..., :0],
                    "v_cache": c.v_cache[..., :0]}, "a head_dim of 1 or more"),
    ],
)
def test_bad_arguments_name_the_problem(changes, message):
    case = make_case([2, 1], [5, 9], block_size=4)
    with pytest.raises(RuntimeError, match=message):
        call_kernel(case, **changes(case))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_plan_serves_every_layer(shape, dtype):
    case = make_case(*SHAPES[shape], block_size=4, dtype=dtype)
    plan = case.plan("cpp")
    for layer in (case, case.next_layer(1), case.next_layer(2)):
        out = ops.run_attention(plan, layer.q, layer.k_cache, layer.v_cache, layer.scale)
        assert torch.equal(out, attend(layer))  # the same work items as the call that plans itself


def test_plan_keeps_its_thread_count():
    # Planned for 2 threads (long decodes split), run with 1: still every item, and the merge.
    case = make_case([1, 1], [3000, 700], num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16)
    with torch_threads(2):
        plan = case.plan("cpp")
    with torch_threads(1):
        out = ops.run_attention(plan, case.q, case.k_cache, case.v_cache, case.scale)
    torch.testing.assert_close(out.double(), naive_attention(case), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    "changes, message",
    [
        (lambda c: {"block_table": c.block_table.clone()}, "another block_table tensor"),
        (lambda c: {"seq_lens": c.seq_lens.clone()}, "another seq_lens tensor"),
        (lambda c: {"cu_seqlens_q": c.cu_seqlens_q.clone()}, "another cu_seqlens_q tensor"),
        (lambda c: {"q": c.q[:2].contiguous(), "out": c.q[:2].contiguous()}, "made for q \\[3, 4, 16\\], got \\[2, 4"),
        (lambda c: {"q": c.q.repeat(1, 2, 1), "out": c.q.repeat(1, 2, 1)}, "made for q \\[3, 4, 16\\], got \\[3, 8"),
        (lambda c: {"k_cache": c.k_cache[:, :, :1].contiguous(), "v_cache": c.v_cache[:, :, :1].contiguous()},
         "made for a cache \\[8, 4, 2, 16\\], got \\[8, 4, 1"),
        (lambda c: {"k_cache": torch.cat([c.k_cache] * 2), "v_cache": torch.cat([c.v_cache] * 2)},
         "made for a cache \\[8, 4, 2, 16\\], got \\[16"),
        (lambda c: {"plan": torch.empty(0, dtype=torch.int64)}, "not a C\\+\\+ plan"),
        (lambda c: {"plan": c.plan("cpp").backend_plan[:-1]}, "not a C\\+\\+ plan"),
    ],
)
def test_plan_refuses_what_it_was_not_made_for(changes, message):
    case = make_case([2, 1], [5, 9], block_size=4)
    with pytest.raises(RuntimeError, match=message):
        call_kernel(case, **{"plan": case.plan("cpp").backend_plan, **changes(case)})


@pytest.mark.parametrize("name", ["block_table", "seq_lens", "cu_seqlens_q"])
def test_plan_refuses_tensors_changed_in_place(name):
    case = make_case([2, 1], [5, 9], block_size=4)
    plan = case.plan("cpp")
    getattr(case, name).add_(0)  # any in-place op: the version counter moves
    with pytest.raises(RuntimeError, match=f"{name} changed in place after the plan was made"):
        ops.run_attention(plan, case.q, case.k_cache, case.v_cache, case.scale)


def test_plan_over_inference_tensors_validates_again():
    # Inference tensors keep no version counter: the kernel validates the sequences again.
    case = make_case([2, 1], [5, 9], block_size=4)
    with torch.inference_mode():
        case.block_table, case.seq_lens, case.cu_seqlens_q = (
            t.clone() for t in (case.block_table, case.seq_lens, case.cu_seqlens_q)
        )
        plan = case.plan("cpp")
        out = ops.run_attention(plan, case.q, case.k_cache, case.v_cache, case.scale)
        torch.testing.assert_close(out.double(), naive_attention(case), atol=2e-5, rtol=2e-5)
        case.block_table.add_(100)
        with pytest.raises(RuntimeError, match="is outside the cache"):
            ops.run_attention(plan, case.q, case.k_cache, case.v_cache, case.scale)


def test_plan_checks_the_longest_query_and_context():
    case = make_case([2, 1], [5, 9], block_size=4)
    with pytest.raises(RuntimeError, match="but the longest query and context are 2, 9"):
        torch.ops.trellis.plan_paged_attention(case.k_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, 4, 1, 9)


def test_store_kv_rejects_slots_outside_the_cache():
    k_cache = torch.zeros(2, 4, 1, 8)
    k = torch.randn(1, 1, 8)
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.trellis.store_kv(k, k, k_cache, k_cache.clone(), torch.tensor([8]))


def test_import_builds_nothing():
    code = (
        "import sys, torch, trellis, trellis.ops; assert 'trellis.ops.cpp' not in sys.modules; "
        "assert not torch._C._dispatch_has_kernel_for_dispatch_key('trellis_cpp::paged_attention', 'CPU')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_pass_under_address_sanitizer():
    """Every other test of this file, over the kernels built with -fsanitize=address: a read or
    write past a workspace, the cache or an output aborts the run with a report, where the
    optimised build may corrupt the heap silently (as it once did; see test_llama_smollm2)."""
    # Python is not built with the sanitizer, so its runtime is preloaded; libstdc++ right after it,
    # or the runtime cannot find the real __cxa_throw when a kernel's argument check throws.
    runtime = [compiler_library(name) for name in ("libasan.so", "libstdc++.so")]
    if not sys.platform.startswith("linux") or None in runtime:
        pytest.skip("no AddressSanitizer runtime for the C++ compiler here")
    env = {"ASAN_OPTIONS": "detect_leaks=0",  # Python's own
           "LD_PRELOAD": " ".join(filter(None, [*runtime, os.environ.get("LD_PRELOAD")]))}
    assert "AddressSanitizer" not in rerun_over("sanitized", __file__, "not address_sanitizer", env)


def compiler_library(name: str) -> str | None:
    """The path of one of the C++ compiler's runtime libraries, if it has it."""
    try:
        found = subprocess.run([os.environ.get("CXX", "c++"), f"-print-file-name={name}"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return found if os.path.isabs(found) and os.path.exists(found) else None
