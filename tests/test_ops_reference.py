"""The reference paged attention against a float64 oracle, and its argument checks."""

import pytest
import torch

from tests.attention_cases import SHAPES, make_case, naive_attention, tolerance
from trellis import ops


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block_size", [1, 4, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_oracle(shape, block_size, dtype):
    q_lens, kv_lens = SHAPES[shape]
    case = make_case(q_lens, kv_lens, block_size=block_size, dtype=dtype)
    out = ops.paged_attention(
        case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, case.scale,
        backend="reference",
    )
    torch.testing.assert_close(out.double(), naive_attention(case), atol=tolerance(dtype), rtol=tolerance(dtype))


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (9, 3), (6, 1)])
def test_gqa_groupings(heads):
    case = make_case([2, 1], [10, 7], num_q_heads=heads[0], num_kv_heads=heads[1])
    out = ops.paged_attention(
        case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, case.scale,
        backend="reference",
    )
    torch.testing.assert_close(out.double(), naive_attention(case), atol=2e-5, rtol=2e-5)


def test_store_kv_writes_only_given_slots():
    k_cache = torch.zeros(4, 8, 2, 16)
    v_cache = torch.zeros(4, 8, 2, 16)
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    slots = torch.tensor([3 * 8 + 7, 0, 13], dtype=torch.int64)
    ops.store_kv(k, v, k_cache, v_cache, slots, backend="reference")
    torch.testing.assert_close(k_cache[3, 7], k[0])
    torch.testing.assert_close(v_cache[1, 5], v[2])
    assert k_cache.abs().sum() == pytest.approx(k.abs().sum().item(), rel=1e-5)


def test_bad_arguments_name_the_problem():
    case = make_case([2], [5])
    with pytest.raises(ValueError, match="block_table must be int32"):
        ops.paged_attention(
            case.q, case.k_cache, case.v_cache, case.block_table.long(), case.seq_lens, case.cu_seqlens_q, case.scale,
            backend="reference",
        )
    with pytest.raises(ValueError, match="not a multiple of KV heads"):
        ops.paged_attention(
            case.q[:, :3].contiguous(), case.k_cache, case.v_cache, case.block_table, case.seq_lens,
            case.cu_seqlens_q, case.scale, backend="reference",
        )
    no_heads = case.k_cache[:, :, :0]  # a cache without KV heads: named, not a division by zero
    with pytest.raises(ValueError, match="the cache needs a KV head and a head_dim of 1 or more"):
        ops.paged_attention(case.q, no_heads, no_heads, case.block_table, case.seq_lens, case.cu_seqlens_q,
                            case.scale, backend="reference")
    with pytest.raises(ValueError, match="the cache needs a KV head"):
        ops.plan_attention(case.block_table, case.seq_lens, case.cu_seqlens_q, num_tokens=2, num_q_heads=4,
                           k_cache=no_heads, max_q_len=2, max_kv_len=5, backend="reference")
    with pytest.raises(ValueError, match="q needs a query head"):
        ops.paged_attention(case.q[:, :0].contiguous(), case.k_cache, case.v_cache, case.block_table, case.seq_lens,
                            case.cu_seqlens_q, case.scale, backend="reference")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.paged_attention(
            case.q, case.k_cache, case.v_cache, case.block_table, case.seq_lens, case.cu_seqlens_q, case.scale,
            backend="cuda-magic",
        )
