"""Saving the prefix cache to safetensors and loading it back, and refusing what does not fit."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.models import tiny_pair
from trellis.cache.block_pool import OutOfBlocksError
from trellis.cache.persist import PrefixCacheFileError

SYSTEM = torch.arange(3, 43)[None]  # 40 tokens: 10 blocks of 4


def ask(model, suffix):
    ids = torch.cat([SYSTEM, torch.tensor([suffix])], dim=1)
    return model.generate(ids, max_new_tokens=5, do_sample=False)


def saved(tmp_path, model):
    ask(model, [50, 51])
    ask(model, [60, 61, 62, 63, 64])
    path = tmp_path / "prefixes.safetensors"
    assert model.save_prefix_cache(path) == model.prefix_cache.stats()["cached_blocks"]
    return path


def test_round_trip_survives_a_restart(tmp_path):
    ref, model = tiny_pair()
    path = saved(tmp_path, model)
    _, restarted = tiny_pair()  # same weights, empty cache
    loaded = restarted.load_prefix_cache(path)
    assert loaded == model.prefix_cache.stats()["cached_blocks"]
    assert restarted.prefix_cache.stats()["nodes"] == model.prefix_cache.stats()["nodes"]
    restarted.prefix_cache.check_integrity()
    hits = restarted.prefix_cache.stats()["hit_tokens"]
    out = ask(restarted, [70, 71])
    assert restarted.prefix_cache.stats()["hit_tokens"] - hits == 40  # the whole system prompt
    assert torch.equal(out, ask(ref, [70, 71]))


def test_loading_twice_keeps_one_copy(tmp_path):
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    before = model.prefix_cache.stats()
    model.load_prefix_cache(path)
    after = model.prefix_cache.stats()
    assert after["cached_blocks"] == before["cached_blocks"] and after["free_blocks"] == before["free_blocks"]
    model.prefix_cache.check_integrity()


def test_other_weights_dtype_or_block_size_are_refused(tmp_path):
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    _, other_weights = tiny_pair(seed=1)
    with pytest.raises(PrefixCacheFileError, match="model="):
        other_weights.load_prefix_cache(path)
    _, other_block = tiny_pair(block_size=8)
    with pytest.raises(PrefixCacheFileError, match="block_size="):
        other_block.load_prefix_cache(path)
    _, other_dtype = tiny_pair()
    other_dtype.to(torch.float16)
    with pytest.raises(PrefixCacheFileError, match="dtype="):
        other_dtype.load_prefix_cache(path)
    for m in (other_weights, other_block, other_dtype):
        assert m.prefix_cache.stats()["cached_blocks"] == 0


def test_damaged_or_missing_file_is_refused(tmp_path):
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a mapping
    tensors["kv"][0, 0, 0, 0, 0, 0] += 1.0
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, damaged, metadata=metadata)
    _, fresh = tiny_pair()
    with pytest.raises(PrefixCacheFileError, match="damaged"):
        fresh.load_prefix_cache(damaged)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PrefixCacheFileError, match="cannot read"):
        fresh.load_prefix_cache(truncated)
    with pytest.raises(PrefixCacheFileError, match="cannot read"):
        fresh.load_prefix_cache(tmp_path / "missing.safetensors")
    assert fresh.prefix_cache.stats()["cached_blocks"] == 0
    fresh.prefix_cache.check_integrity()


def test_file_larger_than_the_pool_is_refused_whole(tmp_path):
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    _, small = tiny_pair(num_blocks=12)  # the file holds 13 blocks
    small.generate(torch.arange(3, 10)[None], max_new_tokens=5, do_sample=False)
    before = small.prefix_cache.stats()
    with pytest.raises(OutOfBlocksError):
        small.load_prefix_cache(path)
    assert small.prefix_cache.stats() == before
    small.prefix_cache.check_integrity()
