"""Saving the prefix cache to safetensors and loading it back, and refusing what does not fit.

A loaded file must never change an answer: it is refused unless it was saved by the very same
computation (every weight and buffer, the config, the dtype and the linear kernel), and unless
its tree is one that ``save_prefix_cache`` could have written, checksum or not.
"""

import functools
import json
import os
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import installed
from tests.models import smollm2_reference, smollm2_tokenizer, smollm2_trellis, tiny_config, tiny_pair
from trellis.cache.block_pool import BlockPool, OutOfBlocksError
from trellis.cache.manager import KVCacheManager
from trellis.cache.persist import (
    FORMAT,
    PrefixCacheFileError,
    _checksum,
    load_prefix_cache,
    model_fingerprint,
    save_prefix_cache,
)
from trellis.eval import score_continuations
from trellis.models import loading
from trellis.runner import cpu_linear

SYSTEM = torch.arange(3, 43)[None]  # 40 tokens: 10 blocks of 4


def ask(model, suffix):
    ids = torch.cat([SYSTEM, torch.tensor([suffix])], dim=1)
    return model.generate(ids, max_new_tokens=5, do_sample=False)


def held_blocks(model):
    """What a save writes and a load into an empty cache takes: the nodes' blocks and the tails'."""
    stats = model.prefix_cache.stats()
    return stats["cached_blocks"] + stats["tail_blocks"]


def saved(tmp_path, model):
    ask(model, [50, 51])
    ask(model, [60, 61, 62, 63, 64])
    path = tmp_path / "prefixes.safetensors"
    assert model.save_prefix_cache(path) == held_blocks(model)
    return path


def read(path):
    with safe_open(path, framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open is not a mapping


def write_signed(path, metadata, tensors):
    """Write a file as a crafted one would be: whatever its tensors, with a valid checksum."""
    save_file(tensors, path, metadata={**metadata, "checksum": _checksum(tensors)})
    return path


def picture(manager):
    """Everything a refused load must leave as it was: the tree, the reference counts, the cached K/V."""
    def path_of(node):
        return () if node.parent is None else path_of(node.parent) + node.tokens

    return (manager.stats(), sorted((path_of(n), tuple(n.blocks), n.lock_count, tuple(sorted(n.tails.items())))
                                    for n in manager.radix.every_node()),
            list(manager.pool.ref_counts), manager.pool.kv.clone())


def assert_same_picture(a, b):
    assert a[:3] == b[:3]
    referenced = torch.tensor([count > 0 for count in a[2]])  # what free blocks hold does not matter
    # Bit for bit: a tail block's slots past its tokens were never written, and may hold NaNs.
    assert torch.equal(a[3][:, :, referenced].view(torch.uint8), b[3][:, :, referenced].view(torch.uint8))


def assert_nothing_leaked(manager):
    manager.check_integrity()
    stats = manager.stats()
    assert stats["live_sessions"] == 0
    assert stats["free_blocks"] + stats["cached_blocks"] + stats["tail_blocks"] == stats["total_blocks"]


def test_round_trip_survives_a_restart(tmp_path):
    ref, model = tiny_pair()
    path = saved(tmp_path, model)
    _, restarted = tiny_pair()  # same weights, empty cache
    loaded = restarted.load_prefix_cache(path)
    assert loaded == held_blocks(model)
    assert restarted.prefix_cache.stats()["nodes"] == model.prefix_cache.stats()["nodes"]
    restarted.prefix_cache.check_integrity()
    hits = restarted.prefix_cache.stats()["hit_tokens"]
    out = ask(restarted, [70, 71])
    assert restarted.prefix_cache.stats()["hit_tokens"] - hits == 40  # the whole system prompt
    assert torch.equal(out, ask(ref, [70, 71]))


def test_a_conversation_continues_from_a_saved_tail(tmp_path):
    """The partly filled last block a finished session left is saved and loaded: the next turn of
    that conversation is served every token the last one computed, and answers as transformers does."""
    ref, model = tiny_pair()
    first = ask(model, [50, 51])  # 42 prompt tokens and 5 new: 46 computed, 11 blocks and a 2-token tail
    path = saved(tmp_path, model)
    assert model.prefix_cache.stats()["tail_blocks"] == 2
    _, restarted = tiny_pair()
    restarted.load_prefix_cache(path)
    assert restarted.prefix_cache.stats()["tail_blocks"] == 2
    turn = torch.cat([first, torch.tensor([[80, 81, 82]])], dim=1)
    with torch.no_grad():
        logits = restarted(turn, logits_to_keep=1).logits
        torch.testing.assert_close(logits, ref(turn).logits[:, -1:], atol=1e-4, rtol=0)
    stats = restarted.prefix_cache.stats()
    assert stats["hit_tokens"] == 46  # 11 whole blocks and the tail's 2 tokens
    restarted.prefix_cache.check_integrity()


def test_a_forward_whose_output_was_dropped_is_saved_with_its_tail(tmp_path):
    """Dropping a forward's output queues its session for release; a save releases it first, so the
    file holds the session's tail as well as its whole blocks."""
    _, model = tiny_pair()
    with torch.no_grad():
        model(torch.cat([SYSTEM, torch.tensor([[50, 51]])], dim=1))  # 42 tokens: 10 blocks and a 2-token tail
    path = tmp_path / "prefixes.safetensors"
    assert model.save_prefix_cache(path) == 11
    _, restarted = tiny_pair()
    assert restarted.load_prefix_cache(path) == 11
    assert restarted.prefix_cache.stats()["tail_blocks"] == 1


def test_a_name_as_long_as_the_file_system_takes_is_saved_to(tmp_path):
    _, model = tiny_pair()
    ask(model, [50, 51])
    path = tmp_path / ("\u00e9" * 120 + ".safetensors")  # 252 bytes of the 255 a name may have
    assert model.save_prefix_cache(path) == held_blocks(model)
    _, fresh = tiny_pair()
    assert fresh.load_prefix_cache(path) == held_blocks(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no staging file left


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_a_saved_cache_takes_the_umask_s_permissions(tmp_path, umask, mode):
    _, model = tiny_pair()
    ask(model, [50, 51])
    previous = os.umask(umask)
    try:
        model.save_prefix_cache(tmp_path / "cache.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "cache.safetensors").stat().st_mode & 0o777 == mode


def test_a_tail_block_is_saved_with_its_own_tokens_only(tmp_path):
    """A tail block reuses a pool block whose later slots still hold an earlier prompt's K/V (or
    memory never written): the file carries the tail's tokens' K/V and zeros, not those."""
    _, model = tiny_pair(block_size=8, num_blocks=4)
    secret = torch.arange(200, 216)[None]
    model.generate(secret, max_new_tokens=1, do_sample=False)  # fills the pool's blocks
    model.prefix_cache.clear()  # forgotten: the blocks are free, their memory as it was
    model.generate(torch.tensor([[5, 6]]), max_new_tokens=1, do_sample=False)  # a 2-token tail
    path = tmp_path / "prefixes.safetensors"
    assert model.save_prefix_cache(path) == 1
    metadata, tensors = read(path)
    assert tensors["tail_num_tokens"].tolist() == [2]
    tail = tensors["kv"][:, :, -1]  # [L, 2, S, Hkv, D]
    assert tail[:, :, :2].abs().sum() > 0
    assert torch.equal(tail[:, :, 2:], torch.zeros_like(tail[:, :, 2:]))
    again = tmp_path / "again.safetensors"
    model.save_prefix_cache(again)
    assert read(again)[0]["checksum"] == metadata["checksum"]  # the same cache, the same bytes


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
    with pytest.raises(PrefixCacheFileError, match="by a model with other weights or buffers"):
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


@pytest.mark.parametrize("change", [{"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
                                    {"rms_norm_eps": 1e-3}, {"hidden_act": "gelu"}])
def test_same_weights_under_another_config_are_refused(tmp_path, change):
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    _, other = tiny_pair(config=tiny_config(**change))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    with pytest.raises(PrefixCacheFileError, match=r"other settings \(config\)"):
        other.load_prefix_cache(path)
    assert other.prefix_cache.stats()["cached_blocks"] == 0


def _scale_attention(model):
    model.model.layers[0].self_attn.scaling *= 2


def _replace_activation(model):
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()


def _hook_mlp(model):
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, output: output * 0.5)


def _set_norm_eps(model):
    model.model.layers[0].input_layernorm.variance_epsilon = 0.5


@pytest.mark.parametrize("change", [_set_norm_eps, _scale_attention, _replace_activation, _hook_mlp])
def test_same_weights_and_config_with_other_modules_are_refused(tmp_path, change):
    """What the modules run besides their weights (an RMSNorm's eps, attention's scale, a module
    replaced, a forward hook) changes the K/V: a file saved by such a model is refused, and one
    saved by the plain model is refused by it."""
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    _, other = tiny_pair()
    change(other)
    with pytest.raises(PrefixCacheFileError, match=r"other modules \(their classes, settings"):
        other.load_prefix_cache(path)
    assert other.prefix_cache.stats()["cached_blocks"] == 0
    ask(other, [50, 51])
    other_path = tmp_path / "other.safetensors"
    other.save_prefix_cache(other_path)
    _, plain = tiny_pair()
    with pytest.raises(PrefixCacheFileError, match="other modules"):
        plain.load_prefix_cache(other_path)


def test_a_weight_outside_any_sample_or_a_buffer_changed_is_refused(tmp_path):
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    _, retrained = tiny_pair()
    with torch.no_grad():
        retrained.model.embed_tokens.weight[5, 1] += 0.5  # one element: every byte counts, not a sample
    with pytest.raises(PrefixCacheFileError, match="other weights or buffers"):
        retrained.load_prefix_cache(path)
    _, other_rope = tiny_pair()
    other_rope.model.rotary_emb.inv_freq[1] *= 1.001  # a non-persistent buffer: not in the state dict
    with pytest.raises(PrefixCacheFileError, match="other weights or buffers"):
        other_rope.load_prefix_cache(path)


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="needs oneDNN")
def test_another_linear_kernel_is_refused_but_a_weight_layout_is_no_identity(tmp_path, intel):
    _, model = tiny_pair()
    model.set_linear_kernel("onednn")
    path = saved(tmp_path, model)
    _, blas = tiny_pair()
    blas.set_linear_kernel("blas")
    with pytest.raises(PrefixCacheFileError, match=r"is for linear_kernel='onednn \(input-major\)', "
                                                   r"this cache needs 'blas \(1-8 rows streamed\)'"):
        blas.load_prefix_cache(path)
    # The same values hash the same whatever their strides (oneDNN stores weights input-major on Intel).
    assert not model.model.layers[0].mlp.up_proj.weight.is_contiguous()
    assert blas.model.layers[0].mlp.up_proj.weight.is_contiguous()
    parts = {"adapters": "", "hardware": "", "modules": ""}
    assert model_fingerprint(model, {}, "k", **parts) == model_fingerprint(blas, {}, "k", **parts)


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="needs oneDNN")
def test_one_kind_that_rounds_otherwise_on_another_cpu_is_refused(tmp_path, vendor):
    """``"onednn"`` on AMD (row-major weights, one to eight decode rows streamed) and on Intel
    (input-major: those weights do not stream) compute K/V that differ in the last bits: a file names which."""
    vendor("AuthenticAMD")
    _, model = tiny_pair()
    model.set_linear_kernel("onednn")
    path = saved(tmp_path, model)
    vendor("GenuineIntel")
    _, intel = tiny_pair()
    intel.set_linear_kernel("onednn")
    with pytest.raises(PrefixCacheFileError, match=r"is for linear_kernel='onednn \(1-8 rows streamed\)', "
                                                   r"this cache needs 'onednn \(input-major\)'"):
        intel.load_prefix_cache(path)
    assert intel.prefix_cache.stats()["cached_blocks"] == 0


@pytest.mark.parametrize("unit", ["amx_bf16", "avx512_bf16"])
def test_a_file_from_another_kind_of_cpu_is_refused(tmp_path, monkeypatch, unit):
    """oneDNN's bf16 matmuls and Trellis' bf16 attention scores run on the CPU's bf16 dot-product
    units, and the kernels are built for its SIMD level: K/V from a CPU that differs there differ
    in the last bits, so a file names the CPU it was computed on."""
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    here = loading.hardware_identity(torch.device("cpu"))
    capabilities = torch.cpu.get_capabilities()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**capabilities, unit: not capabilities.get(unit)})
    elsewhere = loading.hardware_identity(torch.device("cpu"))
    assert elsewhere != here and elsewhere.startswith("cpu: ")
    _, other = tiny_pair()
    with pytest.raises(PrefixCacheFileError, match=re.escape(f"is for hardware={here!r}, this cache needs {elsewhere!r}")):
        other.load_prefix_cache(path)
    assert other.prefix_cache.stats()["cached_blocks"] == 0
    monkeypatch.undo()
    assert other.load_prefix_cache(path) == held_blocks(model)


def test_hardware_identity_names_the_device():
    assert loading.hardware_identity(torch.device("mps")) == "mps"
    cpu = loading.hardware_identity(torch.device("cpu"))
    assert torch.backends.cpu.get_cpu_capability() in cpu and platform.machine() in cpu


def test_another_attention_backend_is_refused(tmp_path):
    """Attention's rounding reaches every later layer's K/V (through the hidden states)."""
    _, model = tiny_pair(backend="reference")
    path = saved(tmp_path, model)
    _, cpp = tiny_pair(backend="cpp")
    with pytest.raises(PrefixCacheFileError, match="other settings"):
        cpp.load_prefix_cache(path)
    _, same = tiny_pair(backend="reference")
    assert same.load_prefix_cache(path) == held_blocks(model)


def test_another_adapter_state_is_refused(tmp_path):
    """LoRA weights are parameters; which adapter runs, and at what scale, is not: both are in the
    fingerprint, so a file saved under one adapter does not load under another."""
    peft = installed("peft")
    _, base = tiny_pair()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, config, adapter_name="a")
    model.add_adapter("b", config)
    model.set_adapter("a")
    path = saved(tmp_path, base)
    model.set_adapter("b")
    with pytest.raises(PrefixCacheFileError, match="other adapters"):
        base.load_prefix_cache(path)
    model.set_adapter("a")
    assert base.load_prefix_cache(path) > 0
    base.prefix_cache.check_integrity()


def test_another_format_version_is_refused(tmp_path):
    _, model = tiny_pair()
    metadata, tensors = read(saved(tmp_path, model))
    old = write_signed(tmp_path / "old.safetensors", {**metadata, "format": "trellis-prefix-cache/1"}, tensors)
    with pytest.raises(PrefixCacheFileError, match=f"format 'trellis-prefix-cache/1'.*{FORMAT}"):
        model.load_prefix_cache(old)


def test_negative_block_counts_with_the_right_sum_are_refused(tmp_path):
    _, model = tiny_pair()
    metadata, tensors = read(saved(tmp_path, model))
    counts = tensors["node_num_blocks"]
    assert counts[0] == 10 and counts[1] == 1  # the system prompt, then its continuations
    counts[0] += 2
    counts[1] -= 2  # -1: node 1 would overlap node 0
    crafted = write_signed(tmp_path / "crafted.safetensors", metadata, tensors)
    _, fresh = tiny_pair()
    with pytest.raises(PrefixCacheFileError, match="at least one block"):
        fresh.load_prefix_cache(crafted)
    assert fresh.prefix_cache.stats()["cached_blocks"] == 0
    fresh.prefix_cache.check_integrity()


@pytest.mark.parametrize(("step", "warm", "failing_call"), [
    ("insert", [200] * 20, 2),  # the target shares 6 blocks with the file (its first 24 tokens): loading splits that edge
    # the target holds a tail where the file has one (not added again), and the file a tail the target has not
    ("add_tail", None, 1),
])
def test_a_failure_half_way_through_loading_changes_and_leaks_nothing(tmp_path, monkeypatch, step, warm, failing_call):
    _, model = tiny_pair()
    path = saved(tmp_path, model)  # whole blocks and two tails
    _, target = tiny_pair()
    if warm is None:
        ask(target, [50, 51])
    else:
        target.generate(torch.cat([SYSTEM[:, :24], torch.tensor([warm])], dim=1), max_new_tokens=3, do_sample=False)
    manager = target.prefix_cache
    before = picture(manager)
    original, calls = getattr(manager.radix, step), []

    def one_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError("interrupted")
        return original(*args, **kwargs)

    monkeypatch.setattr(manager.radix, step, one_call_fails)
    with pytest.raises(RuntimeError, match="interrupted"):
        target.load_prefix_cache(path)
    assert_same_picture(picture(manager), before)
    assert_nothing_leaked(manager)
    monkeypatch.undo()
    # What the target holds of the file is not loaded again: the first 24 tokens' 6 blocks, or the
    # whole first conversation with its tail.
    shared = {"insert": 6, "add_tail": held_blocks(target)}[step]
    assert target.load_prefix_cache(path) == held_blocks(model) - shared
    assert_nothing_leaked(manager)


def test_a_load_interrupted_after_a_tail_was_replaced_puts_the_shorter_tail_back(tmp_path, monkeypatch):
    """The file's tail replaces a shorter one of the target's; an interrupt right after that puts
    the shorter tail back with its block, which the tree never let go of."""
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    _, target = tiny_pair()  # the file's first conversation less its last token: 11 blocks and a 1-token tail
    target.generate(torch.cat([SYSTEM, torch.tensor([[50, 51]])], dim=1), max_new_tokens=4, do_sample=False)
    manager = target.prefix_cache
    before = picture(manager)
    original = manager.radix.add_tail

    def interrupted_once_a_tail_is_replaced(*args, **kwargs):
        replaced = original(*args, **kwargs)
        if replaced:
            raise KeyboardInterrupt
        return replaced

    monkeypatch.setattr(manager.radix, "add_tail", interrupted_once_a_tail_is_replaced)
    with pytest.raises(KeyboardInterrupt):
        target.load_prefix_cache(path)
    assert_same_picture(picture(manager), before)
    assert_nothing_leaked(manager)
    monkeypatch.undo()
    assert target.load_prefix_cache(path) == held_blocks(model) - 11  # all but the 11 blocks it shares


def test_damaged_or_missing_file_is_refused(tmp_path):
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    metadata, tensors = read(path)
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


def test_saving_where_no_file_can_be_leaves_everything_as_it_was(tmp_path, monkeypatch):
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    before = path.read_bytes()
    (tmp_path / "a_directory").mkdir()
    with pytest.raises(ValueError, match="a_directory exists and is not a regular file"):
        model.save_prefix_cache(tmp_path / "a_directory")
    with pytest.raises(FileNotFoundError, match="no directory .*nowhere to save the prefix cache p.safetensors in"):
        model.save_prefix_cache(tmp_path / "nowhere" / "p.safetensors")
    weights, notes = tmp_path / "model.safetensors", tmp_path / "notes.txt"  # a mistyped path
    safetensors.torch.save_file({"w": torch.ones(3)}, weights)
    notes.write_text("not a cache\n")
    for other in (weights, notes):
        kept = other.read_bytes()
        with pytest.raises(ValueError, match="exists and is not a saved prefix cache: it is not replaced"):
            model.save_prefix_cache(other)
        assert other.read_bytes() == kept
        other.unlink()
    (tmp_path / "empty").touch()  # an empty file (a temporary file made for it) is replaced
    assert model.save_prefix_cache(tmp_path / "empty") > 0
    (tmp_path / "empty").unlink()

    def failing_write(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("trellis.cache.persist.save_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        model.save_prefix_cache(path)
    assert path.read_bytes() == before  # the old file stands, and no staging file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_directory", "prefixes.safetensors"]
    monkeypatch.undo()
    staged = []
    monkeypatch.setattr("trellis.cache.persist.save_file", lambda t, name, **kw: (staged.append(name), save_file(t, name, **kw)))
    model.save_prefix_cache(path)
    model.save_prefix_cache(path)
    assert len(set(staged)) == 2  # each save stages a file of its own: concurrent saves do not share one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_directory", "prefixes.safetensors"]


def test_file_larger_than_the_pool_is_refused_whole(tmp_path):
    _, model = tiny_pair()
    path = saved(tmp_path, model)
    _, small = tiny_pair(num_blocks=12)  # the file holds 13 blocks
    small.generate(torch.arange(3, 10)[None], max_new_tokens=5, do_sample=False)
    before = small.prefix_cache.stats()
    with pytest.raises(OutOfBlocksError, match=rf"cannot load prefix cache file {re.escape(str(path))}: it adds \d+ "
                                                r"blocks of 4 tokens that the cache does not hold"):
        small.load_prefix_cache(path)
    assert small.prefix_cache.stats() == before
    small.prefix_cache.check_integrity()


def test_what_the_cache_holds_already_is_not_loaded_again(tmp_path):
    """A file's prefixes that the cache holds take no blocks: reloading a cache's own file adds
    nothing and evicts no other prefix, even with the pool full, and with the shared prefix locked
    by a session in flight it needs no free block."""
    _, model = tiny_pair(num_blocks=16)
    a, b = list(range(3, 43)), list(range(100, 124))  # 10 blocks; 6 more, unrelated
    score_continuations(model, [(a, [50])])
    path = tmp_path / "a.safetensors"
    assert model.save_prefix_cache(path) == 10
    score_continuations(model, [(b, [60])])
    score_continuations(model, [(a, [51])])  # a is the hotter prefix: b is the one eviction would take
    manager = model.prefix_cache
    before = manager.stats()
    assert before["free_blocks"] == 1 and manager.cached_tokens(b) == 20
    assert model.load_prefix_cache(path) == 0
    assert manager.stats()["cached_blocks"] == before["cached_blocks"] and manager.cached_tokens(b) == 20
    live = manager.admit([*a, 7, 8, 9, 10, 11], max_reuse=40)  # on top of a: locks it, takes the free blocks
    held = manager.stats()
    assert held["free_blocks"] == 0
    assert model.load_prefix_cache(path) == 0
    assert manager.stats() == held
    manager.release(live, commit=False)
    manager.check_integrity()


def test_a_tail_the_file_and_a_full_cache_share_is_not_evicted_to_make_room(tmp_path):
    """Eviction takes a node's tails whatever its locks, and first: a tail the file holds too is
    kept out of its reach while a load makes room, or neither the cache's copy nor the file's
    would be left."""
    def manager(num_blocks):
        return KVCacheManager(BlockPool(num_blocks, 4, num_layers=1, num_kv_heads=1, head_dim=1))

    def run(m, tokens):
        seq = m.admit(tokens)
        m.mark_computed(seq)
        m.release(seq)

    shared, other, newer = [10, 11, 12, 13, 14, 15], [20 + i for i in range(12)], [40 + i for i in range(12)]
    source = manager(16)
    run(source, shared)  # one block and a 2-token tail
    run(source, [*other, 99])
    path, fingerprint = tmp_path / "c.safetensors", {"model": "m"}
    save_prefix_cache(source, path, fingerprint)
    target = manager(6)
    run(target, shared)  # the least recently used: its tail is what eviction takes first
    run(target, [*newer, 99])  # the pool is full
    assert target.cached_tokens([*shared, 0]) == 6 and target.pool.num_free == 0
    assert load_prefix_cache(target, path, fingerprint, vocab_size=100) == 4  # other's blocks and tail
    target.check_integrity()
    assert target.cached_tokens([*shared, 0]) == 6 and target.cached_tokens([*other, 99, 0]) == 13


def test_a_cache_made_under_inference_mode_loads_a_file(tmp_path):
    """The KV pool made inside ``torch.inference_mode()`` (a first generate there) is an inference
    tensor; a load outside that mode still writes it."""
    ref, model = tiny_pair()
    path = saved(tmp_path, model)
    _, target = tiny_pair()
    with torch.inference_mode():
        target.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, do_sample=False)
    assert target.load_prefix_cache(path) == held_blocks(model)
    assert torch.equal(ask(target, [50, 51]), ask(ref, [50, 51]))
    assert target.prefix_cache.stats()["hit_tokens"] >= 40  # the system prompt's blocks, from the file


# --- fuzzing: damaged files (bytes flipped) and crafted ones (edited tensors, valid checksum) ---------


def node_slices(tensors):
    """Each node's parent and its slice of blocks in the file."""
    parents, counts = tensors["node_parent"].tolist(), tensors["node_num_blocks"].tolist()
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return parents, [slice(s, s + n) for s, n in zip(starts, counts)]


def with_nodes(tensors, bs, order, parents, slices):
    """The file's tensors with nodes ``order`` (indices into the old lists; ``parents`` already renumbered),
    the tails following their nodes (their K/V last, as saved)."""
    blocks = torch.tensor([b for i in order for b in range(slices[i].start, slices[i].stop)], dtype=torch.int64)
    num_node_blocks = tensors["kv"].shape[2] - len(tensors["tail_node"])
    tail_blocks = torch.arange(num_node_blocks, tensors["kv"].shape[2])
    new_index = {}
    for new, old in enumerate(order):
        new_index.setdefault(old, new)
    return {"kv": tensors["kv"].index_select(2, torch.cat([blocks, tail_blocks])),
            "tokens": tensors["tokens"].view(-1, bs).index_select(0, blocks).reshape(-1),
            "node_parent": torch.tensor(parents, dtype=torch.int64),
            "node_num_blocks": torch.tensor([slices[i].stop - slices[i].start for i in order], dtype=torch.int64),
            "tail_node": torch.tensor([-1 if i < 0 else new_index[i] for i in tensors["tail_node"].tolist()],
                                      dtype=torch.int64),
            "tail_num_tokens": tensors["tail_num_tokens"].clone(), "tail_tokens": tensors["tail_tokens"].clone()}


def reordered(tensors, bs, rng):
    """A harmless edit: the same tree, its nodes listed in another order with parents first."""
    parents, slices = node_slices(tensors)
    order, pending = [], list(range(len(parents)))
    while pending:
        i = rng.choice([i for i in pending if parents[i] == -1 or parents[i] in order])
        order.append(i)
        pending.remove(i)
    return with_nodes(tensors, bs, order, [-1 if parents[i] < 0 else order.index(parents[i]) for i in order], slices)


def crafted(tensors, bs, vocab, rng):
    """One edit that ``save_prefix_cache`` could never have written."""
    t = {name: value.clone() for name, value in tensors.items()}
    n = len(t["node_parent"])
    kind = rng.choice(["count", "parent", "truncate", "token", "sibling", "kv", "dtype", "names", "tail"])
    if kind == "count":  # a count below one, the total kept
        i, j = rng.sample(range(n), 2)
        shift = int(t["node_num_blocks"][i]) - rng.choice([0, -1, -3])
        t["node_num_blocks"][i] -= shift
        t["node_num_blocks"][j] += shift
    elif kind == "parent":  # a parent listed after its child, itself, or below -1
        i = rng.randrange(n)
        t["node_parent"][i] = rng.choice([i, max(i, n - 1), -2, n + 5])
    elif kind == "truncate":
        t["tokens"] = t["tokens"][: -rng.randint(1, 2 * bs)].clone()
    elif kind == "token":
        t["tokens"][rng.randrange(len(t["tokens"]))] = rng.choice([-1, vocab, vocab + 1000, -(2**40)])
    elif kind == "sibling":  # a copy of a node under the same parent: two children with one key
        parents, slices = node_slices(t)
        i = rng.randrange(n)
        return with_nodes(t, bs, [*range(n), i], [*parents, parents[i]], slices)
    elif kind == "kv":
        t["kv"] = t["kv"][:, :, 1:].clone() if rng.random() < 0.5 else t["kv"].to(torch.float16)
    elif kind == "tail":  # a tail after no node, of no tokens or a whole block's, of ids outside the vocabulary
        m = len(t["tail_node"])
        edit = rng.choice(["node", "length", "token"])
        if edit == "node":
            t["tail_node"][rng.randrange(m)] = rng.choice([-2, n, n + 7])
        elif edit == "length":
            t["tail_num_tokens"][rng.randrange(m)] = rng.choice([0, bs, bs + 1])
        else:
            t["tail_tokens"][rng.randrange(len(t["tail_tokens"]))] = rng.choice([-1, vocab])
    elif kind == "dtype":
        name = rng.choice(["tokens", "node_parent", "node_num_blocks", "tail_node", "tail_num_tokens", "tail_tokens"])
        t[name] = t[name].to(rng.choice([torch.int32, torch.float64]))
    elif rng.random() < 0.5:
        del t[rng.choice(sorted(t))]
    else:
        t["extra"] = torch.zeros(3)
    return t


def assert_serves_fresh_kv(model, fresh_kv):
    """Every cached path holds the K/V that ``fresh_kv`` computes for its tokens."""
    manager = model.prefix_cache
    for leaf in [n for n in manager.radix.nodes() if not n.children]:
        tokens, node = (), leaf
        while node.parent is not None:
            tokens, node = node.tokens + tokens, node.parent
        blocks = manager.radix.match(tokens, max_tokens=len(tokens)).blocks
        got = manager.pool.kv.index_select(2, torch.tensor(blocks)).flatten(2, 3)  # [L, 2, T, Hkv, D]
        torch.testing.assert_close(got, fresh_kv(tokens), atol=1e-4, rtol=1e-4)
    for node in manager.radix.every_node():
        path, up = (), node
        while up.parent is not None:
            path, up = up.tokens + path, up.parent
        for tokens, block in node.tails.items():  # its first len(tokens) slots: those tokens' K/V after the path
            got = manager.pool.kv[:, :, block, : len(tokens)]
            torch.testing.assert_close(got, fresh_kv(path + tokens)[:, :, -len(tokens):], atol=1e-4, rtol=1e-4)


def plain_transformers_kv(ref):
    """K/V of a token path as plain transformers computes them, ``[L, 2, T, Hkv, D]``; memoised."""
    @functools.cache
    def kv(tokens):
        with torch.no_grad():
            cache = ref(torch.tensor([tokens]), use_cache=True).past_key_values
        return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]).transpose(2, 3)

    return kv


def test_fuzzed_files_are_refused_whole_or_serve_the_right_kv(tmp_path):
    ref, model = tiny_pair()
    path = saved(tmp_path, model)
    metadata, tensors = read(path)
    bs, vocab = model.prefix_cache.block_size, model.config.vocab_size
    _, target = tiny_pair(num_blocks=24)
    target.generate(torch.cat([SYSTEM[:, :24], torch.tensor([[200] * 20])], dim=1), max_new_tokens=3,
                    do_sample=False)  # cached already: loads split its edge, and evict to make room
    manager, fresh_kv = target.prefix_cache, plain_transformers_kv(ref)
    rng = random.Random(15)
    refusals, loaded = [], 0
    for attempt in range(600):
        file = tmp_path / f"fuzz{attempt}.safetensors"
        if attempt % 3 == 0:  # damage: bytes flipped anywhere, checksum left as it was
            data = bytearray(path.read_bytes())
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            file.write_bytes(bytes(data))
        else:
            edited = reordered(tensors, bs, rng)
            if attempt % 3 == 1:
                edited = crafted(edited, bs, vocab, rng)
            write_signed(file, metadata, edited)
        before = picture(manager)
        try:
            target.load_prefix_cache(file)
        except (PrefixCacheFileError, OutOfBlocksError) as exc:
            assert_same_picture(picture(manager), before)
            refusals.append(str(exc))
        else:
            assert_serves_fresh_kv(target, fresh_kv)
            loaded += 1
        assert_nothing_leaked(manager)
        file.unlink()
    assert len(refusals) >= 390 and loaded >= 195  # bytes flipped and tensors edited are refused, reorders load
    for problem in ("damaged", "holds tensors", "1-D int64", "kv is", "at least one block", "an earlier node",
                    "blocks of K/V", "outside the vocabulary", "earlier sibling", "inconsistent tails"):
        assert any(problem in message for message in refusals), f"no edit was refused for {problem!r}"


# --- the real model, across processes -------------------------------------------------------------------

CHILD = """
import json, sys
import torch
from tests.models import smollm2_trellis

cache_file, ids_file, out_file = sys.argv[1:]
ids = torch.tensor(json.loads(open(ids_file).read()))
model = smollm2_trellis(num_blocks=64)
loaded = model.load_prefix_cache(cache_file)
with torch.no_grad():
    logits = model(ids, logits_to_keep=8).logits
torch.save({"loaded": loaded, "hit_tokens": model.prefix_cache.stats()["hit_tokens"], "logits": logits}, out_file)
"""


def smollm2_chat(question):
    system = ("You are a careful assistant who answers questions about geography, history and science. Keep "
              "answers short and precise, say when you do not know something, and never guess. Prefer plain "
              "words to jargon, give one example when it helps the reader, and end with a one-line summary.")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return smollm2_tokenizer().apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]


@pytest.mark.slow
def test_smollm2_prefix_cache_reloaded_in_a_new_process_matches_transformers(tmp_path):
    model = smollm2_trellis(num_blocks=64)
    with torch.no_grad():
        model(smollm2_chat("What is the capital of France?"))
    cache_file = tmp_path / "smollm2.safetensors"
    saved_blocks = model.save_prefix_cache(cache_file)
    ids = smollm2_chat("Who was Ada Lovelace?")
    ids_file, out_file = tmp_path / "ids.json", tmp_path / "out.pt"
    ids_file.write_text(json.dumps(ids.tolist()))
    run = subprocess.run([sys.executable, "-c", CHILD, str(cache_file), str(ids_file), str(out_file)],
                         capture_output=True, text=True, timeout=300, check=False, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    child = torch.load(out_file)
    assert child["loaded"] == saved_blocks
    first = smollm2_chat("What is the capital of France?")[0]
    shared = next(i for i, (a, b) in enumerate(zip(first.tolist(), ids[0].tolist())) if a != b)
    assert child["hit_tokens"] == shared > 64  # the system prompt came from the file, its last tokens from a tail
    with torch.no_grad():
        want = smollm2_reference()(ids).logits[:, -8:]
        here = model(ids, logits_to_keep=8).logits  # the same hit on the cache that was saved
    assert (child["logits"] - want).abs().max() <= 1e-4
    torch.testing.assert_close(child["logits"], here, atol=1e-6, rtol=0)


def test_the_demo_starts_warm_from_its_file_and_cold_from_one_it_cannot_use(tmp_path, capsys):
    from trellis import cli

    path = tmp_path / "demo.safetensors"
    demo = ["demo", "--questions", "What is a radix tree?", "--max-new-tokens", "3", "--prefix-cache", str(path)]
    cli.main([*demo, "--dtype", "float32"])
    cli.main([*demo, "--dtype", "float32"])
    assert "warm start:" in capsys.readouterr().out
    cli.main([*demo, "--dtype", "bfloat16"])  # a file of another dtype: refused, so the run starts cold
    out = capsys.readouterr().out
    assert "cold start: " in out and "dtype" in out and "saved" in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*demo[:-1], str(tmp_path / "missing" / "demo.safetensors")])
    assert exit_info.value.code == 2 and "no file can be saved there" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # not taken for a hub id
        cli.main(["demo", "--model", str(tmp_path / "no_model")])
    assert exit_info.value.code == 2 and "argument --model: no model directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:  # not left to the tokenizer's message
        cli.main(["demo", "--model", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "holds no model: neither a config.json nor a .gguf file" in \
        capsys.readouterr().err
