"""The benchmarks' three systems on a tiny model: each serves the seed's workload, and the counts
the README reports (fresh blocks, blocks held, cache bytes, hit rates) follow the seed's definitions.

Timings are not checked here (they belong to the benchmarks); this keeps the benchmark code
working across transformers releases, whose continuous batching is one of the peers.
"""

import sys
from pathlib import Path

import pytest

from tests.models import tiny_config, tiny_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # scripts, not a package
from common import SEED_BLOCK, Workload
from systems import HFGenerate, HFGenerateBatch, Trellis

L, D, N = 128, 4, 3


@pytest.fixture(scope="module")
def model():
    # Workload prompts draw token ids below 30000, which the model's vocabulary must hold.
    return tiny_pair(config=tiny_config(vocab_size=30000))[1]


def blocks(tokens: int) -> int:
    return -(-tokens // SEED_BLOCK)


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_trellis_holds_the_shared_blocks_once(model, phi):
    w = Workload(L=L, D=D, N=N, phi=phi)
    shared = w.shared // SEED_BLOCK
    assert shared == min(round(phi * L / SEED_BLOCK), L // SEED_BLOCK - 1)
    result = Trellis(model).op(w)
    # The last generated token is never fed back, so a session writes L + D - 1 tokens of K/V.
    expected = shared + N * (blocks(L + D - 1) - shared)
    assert result.generated == N * D
    assert result.fresh_blocks == expected
    assert result.live_blocks == expected
    assert result.leaves == N
    probe = Trellis(model).ttft(w)
    assert probe.hit_rate == w.shared / L


def test_transformers_generate_batch_shares_the_warm_prefix(model):
    w = Workload(L=L, D=D, N=N, phi=0.5)
    result = HFGenerateBatch(model).op(w)
    assert result.generated == N * D
    # Its warm-up decodes two tokens (see HFGenerateBatch), so it takes at most one block more.
    no_sharing = blocks(w.shared + 1) + N * blocks(L + D - 1)
    assert result.fresh_blocks < no_sharing
    assert HFGenerateBatch(model).ttft(w).hit_rate == w.shared / L


def test_transformers_generate_keeps_one_full_cache_per_session(model):
    w = Workload(L=L, D=D, N=N, phi=0.5)
    result = HFGenerate(model).op(w)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # K and V, fp32
    assert result.generated == N * D
    assert result.kv_bytes == N * (L + D - 1) * per_token
    assert HFGenerate(model).ttft(w).hit_rate == 0.0


def test_allocations_are_counted_for_every_system(model):
    w = Workload(L=L, D=2, N=2, phi=0.5)
    for system in (Trellis(model), HFGenerateBatch(model), HFGenerate(model)):
        tally = system.allocations(w)
        assert tally.count > 0 and tally.bytes > 0, system.name
