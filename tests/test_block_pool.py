import pytest
import torch

from trellis.cache.block_pool import BlockPool, OutOfBlocksError


def make_pool(num_blocks=8, block_size=4):
    return BlockPool(num_blocks, block_size, num_layers=2, num_kv_heads=2, head_dim=8)


def test_layout_and_alloc_free_cycle():
    pool = make_pool()
    assert pool.kv.shape == (2, 2, 8, 4, 2, 8)
    k, v = pool.layers[1]
    assert k.shape == (8, 4, 2, 8) and k.is_contiguous() and v.data_ptr() != k.data_ptr()
    blocks = pool.alloc(3)
    assert len(set(blocks)) == 3 and pool.num_free == 5
    pool.incref(blocks[:1])
    pool.decref(blocks)
    assert pool.num_free == 7 and pool.ref_counts[blocks[0]] == 1
    pool.decref(blocks[:1])
    assert pool.num_free == 8
    pool.check_integrity()


def test_exhaustion_is_a_clear_error_and_changes_nothing():
    pool = make_pool(num_blocks=4)
    pool.alloc(3)
    with pytest.raises(OutOfBlocksError, match="2 blocks requested, 1 free of 4"):
        pool.alloc(2)
    assert pool.num_free == 1
    pool.check_integrity()


def test_double_free_and_incref_of_free_block_are_refused():
    pool = make_pool()
    (b,) = pool.alloc(1)
    pool.decref([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref([b])
    with pytest.raises(RuntimeError, match="incref of free block"):
        pool.incref([b])
    pool.check_integrity()


@pytest.mark.parametrize("block_size", [0, -4, 3, 48, 512, 2.0])
def test_block_size_must_be_a_power_of_two_up_to_256(block_size):
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        make_pool(block_size=block_size)


@pytest.mark.parametrize("made_under_inference_mode", [False, True])
def test_copy_block_copies_every_layer(made_under_inference_mode):
    """Also for a pool made under ``torch.inference_mode`` (a model's first call there), copied
    outside it: an inference tensor refuses in-place writes outside inference_mode."""
    with torch.inference_mode(made_under_inference_mode):
        pool = make_pool()
        a, b = pool.alloc(2)
        pool.kv[:, :, a] = torch.randn_like(pool.kv[:, :, a])
    pool.copy_block(a, b)
    torch.testing.assert_close(pool.kv[:, :, b], pool.kv[:, :, a])


def test_bytes_per_block():
    assert BlockPool.bytes_per_block(32, 30, 3, 64, torch.float32) == 2 * 30 * 32 * 3 * 64 * 4


def test_a_pool_larger_than_memory_is_refused_by_name():
    """The allocator's own error (a RuntimeError from deep in ATen) would reach a user of
    --num-blocks / --kv-cache-memory as a traceback."""
    with pytest.raises(ValueError, match=r"a KV pool of 1000000000000 blocks \(.* GiB\) cannot be allocated on cpu: "
                                         "lower num_blocks / kv_cache_memory"):
        make_pool(num_blocks=10**12)
