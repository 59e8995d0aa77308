"""Stale K/V are never served: a change to anything a forward reads (weights, buffers, settings,
adapters, dtype, device) drops the cache, and ``reset()`` drops what no key can see."""

import copy
import gc
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.activations import ACT2FN

from tests.conftest import installed
from tests.models import tiny_config, tiny_pair
from trellis.cache.block_pool import BlockPool
from trellis.cache.manager import KVCacheManager
from trellis.models.paged_cache import CACHE_ARG
from trellis.runner import cpu_linear
from trellis.runner import runner as runner_module
from trellis.runner.weights_watcher import WeightsWatcher

IDS = torch.arange(3, 30)[None]
ATOL = 1e-4
KERNELS = [kind for kind in cpu_linear.LINEAR_KERNELS if kind == "blas" or cpu_linear.onednn_available()]


def warm(model, ids=IDS):
    model.generate(ids, max_new_tokens=3, do_sample=False)
    assert model.prefix_cache.stats()["cached_blocks"] > 0


def on_both(ref, model, edit: Callable[[torch.nn.Module], None]) -> None:
    with torch.no_grad():
        for m in (ref, model):
            edit(m)


def assert_answers_match(ref, model, ids=IDS):
    """The last logits of ``ids`` (whose prefix a warm-up cached) equal transformers'."""
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=1).logits, ref(ids).logits[:, -1:], atol=ATOL, rtol=0)
    model.prefix_cache.check_integrity()


def test_reset_empties_the_cache():
    _, model = tiny_pair()
    warm(model)
    model.prefix_cache.reset()
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    model.prefix_cache.check_integrity()


def test_in_place_weight_edit_drops_the_cache_and_answers_change_accordingly():
    ref, model = tiny_pair()
    warm(model)
    with torch.no_grad():
        for m in (ref, model):
            m.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, logits_to_keep=1).logits, ref(IDS).logits[:, -1:], atol=1e-4, rtol=0)


def test_load_state_dict_and_parameter_replacement_drop_the_cache():
    ref, model = tiny_pair()
    warm(model)
    model.load_state_dict(ref.state_dict())
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    warm(model)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert model.prefix_cache.stats()["cached_blocks"] == 0


def test_moving_existing_modules_in_drops_the_cache():
    _, model = tiny_pair()
    warm(model)
    layers = model.model.layers
    layers[0], layers[1] = layers[1], layers[0]  # no new parameter anywhere, only new places
    assert model.prefix_cache.stats()["cached_blocks"] == 0


def test_forwards_do_not_rewalk_the_parameters():
    """transformers slices model.layers into a new ModuleList on every forward; that must not
    count as a change to the model (re-walking its parameters each step costs ~1 ms)."""
    _, model = tiny_pair()
    warm(model)
    walks = model.runner.weights_watcher.walks
    warm(model)
    assert model.runner.weights_watcher.walks == walks
    assert model.prefix_cache.stats()["cached_blocks"] > 0


def test_a_live_handle_is_refused_after_the_weights_change():
    _, model = tiny_pair()
    with torch.no_grad():
        out = model(IDS)
        model.model.norm.weight.add_(0.1)
        with pytest.raises(RuntimeError, match="another KV cache"):
            model(IDS[:, :1], past_key_values=out.past_key_values)


def test_device_or_dtype_change_rebuilds_the_pool():
    _, model = tiny_pair()
    warm(model)
    model.to(torch.float16)
    assert model.prefix_cache.pool.kv.dtype == torch.float16
    assert model.prefix_cache.stats()["cached_blocks"] == 0


def test_a_pool_rebuilt_for_new_weights_keeps_its_default_size(monkeypatch):
    """The default pool is sized from free memory once: a rebuild (new weights) reads it while the
    old pool still holds its share, which would shrink the pool at every rebuild."""
    free = iter([64 << 20, 32 << 20, 16 << 20])
    monkeypatch.setattr(runner_module, "free_memory", lambda device: next(free))
    _, model = tiny_pair(num_blocks=None)
    warm(model)
    blocks = model.prefix_cache.pool.num_blocks
    for _ in range(2):
        with torch.no_grad():
            model.model.norm.weight.add_(0.1)
        assert model.prefix_cache.pool.num_blocks == blocks
    model.configure_cache(block_size=4)  # new settings read free memory again
    assert model.prefix_cache.pool.num_blocks == blocks // 2


def test_peft_adapter_switches_drop_the_cache():
    """Switching, disabling and re-enabling adapters through peft itself (transformers' own
    ``add_adapter`` needs a newer peft than the pinned one; it ends in the same tuner layers)."""
    peft = installed("peft")
    ref, base = tiny_pair()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(base, config, adapter_name="a")
    model.add_adapter("b", config)
    model.set_adapter("a")
    warm(base)
    with torch.no_grad():
        with_a = model(input_ids=IDS, logits_to_keep=1).logits
    model.set_adapter("b")
    assert base.prefix_cache.stats()["cached_blocks"] == 0
    warm(base)
    with model.disable_adapter(), torch.no_grad():
        assert base.prefix_cache.stats()["cached_blocks"] == 0
        torch.testing.assert_close(model(input_ids=IDS, logits_to_keep=1).logits, ref(IDS).logits[:, -1:],
                                   atol=1e-4, rtol=0)
    model.set_adapter("a")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, logits_to_keep=1).logits, with_a, atol=1e-5, rtol=0)


def test_a_merged_adapter_disabled_generates_as_peft_unmerges_it():
    """peft unmerges a merged adapter inside its layers' next forward once it is disabled: Trellis
    does it before the forward takes the cache, so the generation gets peft's answer (the base
    model's) instead of losing its cache part-way. peft's adapter_names beyond one row are refused
    by name (the rows run as one packed sequence)."""
    peft = installed("peft")
    ref, base = tiny_pair()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"], init_lora_weights=False)
    wrapped = []
    for plain in (ref, base):
        torch.manual_seed(1)
        wrapped.append(peft.get_peft_model(plain, config, adapter_name="a"))
        wrapped[-1].add_adapter("b", config)
        wrapped[-1].eval()
    want, model = wrapped
    model.load_state_dict(want.state_dict())
    for peft_model in wrapped:
        peft_model.merge_adapter()
    assert torch.equal(model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False),
                       want.generate(input_ids=IDS, max_new_tokens=4, do_sample=False))
    with want.disable_adapter():
        plain = want.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
    with model.disable_adapter():
        assert torch.equal(model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False), plain)
    base.prefix_cache.check_integrity()
    with pytest.raises(ValueError, match=r"peft's adapter_names=\['a', 'b'\] \(an adapter for each row"):
        model.generate(input_ids=IDS.repeat(2, 1), max_new_tokens=2, do_sample=False, adapter_names=["a", "b"])
    for module in model.modules():  # (peft leaves its hooks installed when a forward raises)
        module._forward_pre_hooks.clear()
    assert base.prefix_cache.stats()["live_sessions"] == 0
    assert torch.equal(model.generate(input_ids=IDS, max_new_tokens=2, do_sample=False, adapter_names=["b"]),
                       want.generate(input_ids=IDS, max_new_tokens=2, do_sample=False, adapter_names=["b"]))


def test_the_watchers_hooks_are_installed_with_the_first_model_not_at_import():
    """Importing Trellis changes nothing process-wide; building a model installs the three
    module registration hooks the weights watcher counts on (once, however many models)."""
    script = (
        "import torch.nn.modules.module as m, trellis\n"
        "from tests.models import tiny_pair\n"
        "hooks = lambda: (len(m._global_parameter_registration_hooks), len(m._global_buffer_registration_hooks),\n"
        "                 len(m._global_module_registration_hooks))\n"
        "assert hooks() == (0, 0, 0), hooks()\n"
        "tiny_pair(); tiny_pair()\n"
        "assert hooks() == (1, 1, 1), hooks()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])


# --- issue #15: everything the K/V depend on is in the key -----------------------------------


def test_an_in_place_buffer_edit_drops_the_cache():
    """A linear RoPE rescale, in place on the ``inv_freq`` buffer (case 1)."""
    ref, model = tiny_pair()
    warm(model)
    on_both(ref, model, lambda m: m.model.rotary_emb.inv_freq.div_(4))
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    assert_answers_match(ref, model)


def test_a_replaced_buffer_drops_the_cache():
    ref, model = tiny_pair()
    warm(model)
    on_both(ref, model, lambda m: setattr(m.model.rotary_emb, "inv_freq", m.model.rotary_emb.inv_freq / 4))
    assert_answers_match(ref, model)


def test_buffers_replaced_by_a_dtype_round_trip_are_watched():
    """``model.to()`` puts new buffers into their modules' dicts, with no registration."""
    ref, model = tiny_pair()
    warm(model)
    on_both(ref, model, lambda m: m.to(torch.bfloat16).to(torch.float32))  # every value rounded to bf16
    assert_answers_match(ref, model)
    on_both(ref, model, lambda m: m.model.rotary_emb.inv_freq.div_(4))  # the new buffer, in place
    assert_answers_match(ref, model)


def test_inference_tensors_made_by_a_round_trip_under_inference_mode_are_watched():
    """``model.to()`` under ``torch.inference_mode`` makes inference tensors, which have no version
    counter: the watcher and the packed copies read them without one."""
    ref, model = tiny_pair()
    warm(model)

    def round_trip(m):
        with torch.inference_mode():
            m.to(torch.float16).to(torch.float32)

    on_both(ref, model, round_trip)
    assert model.model.rotary_emb.inv_freq.is_inference()
    assert_answers_match(ref, model)
    assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False),
                       ref.generate(IDS, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_parametrized_linear_layer_runs_its_computed_weight(kernel):
    """torch.nn.utils.parametrize makes the layer a subclass whose weight is computed at each call:
    it runs F.linear over that weight, and changing the parametrization's original drops the cache."""
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def forward(self, weight):
            return weight * 1.5

    ref, model = tiny_pair()
    cpu_linear.set_linear_kernel(model, kernel)
    warm(model)
    on_both(ref, model, lambda m: parametrize.register_parametrization(m.model.layers[0].self_attn.k_proj, "weight",
                                                                         Scale()))
    assert_answers_match(ref, model)
    warm(model)
    on_both(ref, model, lambda m: m.model.layers[0].self_attn.k_proj.parametrizations.weight.original.mul_(0.5))
    assert_answers_match(ref, model)


def _scale_attention(m):
    for layer in m.model.layers:
        layer.self_attn.scaling *= 0.5


def _norm_eps(m):
    for module in m.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.5


@pytest.mark.parametrize("edit", [_scale_attention, _norm_eps], ids=["attention scale", "norm eps"])
def test_a_setting_the_forward_reads_drops_the_cache(edit):
    ref, model = tiny_pair()
    warm(model)
    on_both(ref, model, edit)
    assert_answers_match(ref, model)


def _layers(m, count: int) -> None:
    m.config.num_hidden_layers = count


def test_a_lower_layer_count_keeps_the_cache_and_caches_nothing_it_computes():
    """transformers' early-exit drafter lowers ``config.num_hidden_layers`` for its drafts. A
    layer's K/V depend on the layers before it only, so the cache and live handles stay valid; the
    lowered forward writes its layers only, so nothing it computes is cached, and a handle it
    computed is refused to more layers, changing nothing."""
    ref, model = tiny_pair()
    warm(model)
    cached = model.prefix_cache.stats()["cached_blocks"]
    other = torch.arange(100, 130)[None]
    with torch.no_grad():
        live = model(IDS[:, :10])[CACHE_ARG]
        on_both(ref, model, lambda m: _layers(m, 1))
        assert_answers_match(ref, model)  # one layer over the full model's cached blocks
        drafted = model(other)[CACHE_ARG]
        assert model.prefix_cache.stats()["cached_blocks"] == cached
        on_both(ref, model, lambda m: _layers(m, 2))
        with pytest.raises(ValueError, match="first 1 decoder layers"):
            model(other[:, :1], **{CACHE_ARG: drafted})
        assert drafted.get_seq_length() == len(drafted.seqs[0].token_ids) == 30
        want = ref(IDS).logits[:, 10:]
        torch.testing.assert_close(model(IDS[:, 10:], **{CACHE_ARG: live}).logits, want, atol=ATOL, rtol=0)
        assert_answers_match(ref, model, other)  # the one-layer K/V of ``other`` were never cached
    assert model.prefix_cache.stats()["cached_blocks"] >= cached


def test_longrope_rewriting_its_inv_freq_every_forward_keeps_the_cache():
    """LongRoPE's forward rewrites ``inv_freq`` (from the sequence length): no change of the model.
    (Its sequences stay within original_max_position_embeddings, past which Trellis refuses them.)"""
    config = tiny_pair()[0].config
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                              "long_factor": [2.0] * 8, "original_max_position_embeddings": 32, "factor": 32.0}
    ref, model = tiny_pair(config=config)
    with torch.no_grad():
        expected = ref.generate(IDS, max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False), expected)
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False), expected)
    assert model.prefix_cache.stats()["hit_tokens"] > 0


def lora_pair(kernel: str = "blas"):
    """The tiny pair with the same random LoRA adapter on the attention projections."""
    peft = installed("peft")
    ref, model = tiny_pair()
    model.set_linear_kernel(kernel)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    for m in (ref, model):
        peft.inject_adapter_in_model(config, m)
    model.load_state_dict(ref.state_dict())
    return ref, model


def lora_layers(m):
    from peft.tuners.lora import LoraLayer

    return [module for module in m.modules() if isinstance(module, LoraLayer)]


LORA_EDITS = {"set_scale": lambda layer: layer.set_scale("default", 3.0), "scale_layer": lambda layer: layer.scale_layer(0.5),
              "disable": lambda layer: layer.enable_adapters(False), "merge": lambda layer: layer.merge()}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("edit", LORA_EDITS)
def test_peft_adapter_state_is_in_the_key(edit, kernel):
    """A LoRA rescale (case 2), disabling, or merging into the base weights (which peft writes
    through ``.data``, unseen: the rebuilt cache drops the packed copies too)."""
    ref, model = lora_pair(kernel)
    warm(model)
    for m in (ref, model):
        for layer in lora_layers(m):
            LORA_EDITS[edit](layer)
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    assert_answers_match(ref, model)


def _new_storage_twice(weight: torch.nn.Parameter) -> None:
    """The last storage can land at the first one's address, with the version counter (the
    parameter's, kept across ``.data`` assignment) unchanged."""
    weight.data = weight.data * 3
    weight.data = weight.data.clone()


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_weight_given_new_storage_drops_the_cache(kernel):
    """Case 3: ``(data_ptr, _version)`` is no identity. One weight at a time, so that any reused
    address would leave the whole model's pointers and versions as they were."""
    ref, model = tiny_pair()
    model.set_linear_kernel(kernel)
    warm(model)
    for name, _ in ref.named_parameters():
        on_both(ref, model, lambda m, name=name: _new_storage_twice(m.get_parameter(name)))
        assert_answers_match(ref, model)


def test_the_watcher_sees_a_storage_replaced_at_the_same_address():
    """Whatever the allocator does; among these tries the last storage usually lands at the first
    one's address (same data pointer, same version)."""
    reused = 0
    for size in (16, 64, 256) * 5:
        layer = torch.nn.Linear(size, size)
        watcher = WeightsWatcher(layer)
        before, identity = watcher.state(), (layer.weight.data_ptr(), layer.weight._version)
        layer.weight.data = layer.weight.data * 3
        layer.weight.data = layer.weight.data.clone()
        assert watcher.state() != before
        reused += (layer.weight.data_ptr(), layer.weight._version) == identity
    if not reused:
        pytest.skip("this allocator never gave the new storage the old address")


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="no oneDNN on this machine or build")
def test_a_packed_copy_follows_a_storage_replaced_at_the_same_address():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    cpu_linear.set_linear_kernel(layer, "packed")
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer(x)
        layer.weight.data = layer.weight.data * 3
        layer.weight.data = layer.weight.data.clone()
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("edit", ["mul", "copy"])
def test_edits_through_data_are_served_fresh_after_reset(edit, kernel):
    """Case 4: ``p.data`` has a version counter of its own, so writes through it cannot be seen;
    ``prefix_cache.reset()`` (documented for them) drops the cached K/V and the packed copies."""
    ref, model = tiny_pair()
    model.set_linear_kernel(kernel)
    warm(model)

    def through_data(m):
        for weight in (m.model.layers[0].self_attn.k_proj.weight, m.lm_head.weight):
            weight.data.mul_(1.5) if edit == "mul" else weight.data.copy_(weight.detach() * 1.5)

    on_both(ref, model, through_data)
    model.prefix_cache.reset()
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    assert_answers_match(ref, model)


# --- issue #15 case 11: a dropped handle's blocks are free for the next decision ------------


def test_a_dropped_generate_output_frees_its_blocks_for_generate_batch():
    _, model = tiny_pair(num_blocks=8)
    out = model.generate(IDS, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    del out
    gc.collect()
    result = model.generate_batch([list(range(100, 130))], max_new_tokens=3, do_sample=False)
    assert len(result["req_0"].generated_tokens) == 3
    model.prefix_cache.check_integrity()


def test_a_dropped_handle_frees_its_blocks_for_a_growing_session():
    _, model = tiny_pair(num_blocks=8)
    with torch.no_grad():
        kept = getattr(model(IDS[:, :8]), CACHE_ARG)  # 2 blocks
        dropped = model(IDS[:, 8:28])  # 5 blocks, locked while its session lives
        del dropped
        gc.collect()
        model(IDS[:, :16], **{CACHE_ARG: kept})  # 2 more blocks: 1 free, the rest only once released
    model.prefix_cache.check_integrity()


@pytest.mark.parametrize("decide", [
    lambda m, seq: m.pool.decref(m.allocate(1)), lambda m, seq: m.admission_cost([1, 2, 3]), lambda m, seq: m.admit([1, 2, 3]),
    lambda m, seq: m.fork(seq), lambda m, seq: m.truncate([seq], [5]),
    lambda m, seq: m.stats(), lambda m, seq: m.append(seq, [9] * 8), lambda m, seq: m.reset(),
], ids=["allocate", "admission_cost", "admit", "fork", "truncate", "stats", "append", "reset"])
def test_released_handles_are_drained_before_any_decision(decide):
    manager = KVCacheManager(BlockPool(16, 4, num_layers=1, num_kv_heads=1, head_dim=4))
    kept, dropped = manager.admit(list(range(10))), manager.admit(list(range(20, 30)))
    manager.release_later([dropped])
    decide(manager, kept)
    assert dropped.released and dropped not in manager.live
    manager.check_integrity()


# --- property: any interleaving of changes and generations answers as transformers ----------

PROMPTS = [IDS, IDS[:, :17], torch.cat([IDS, torch.arange(40, 46)[None]], dim=1)]  # sharing prefixes


def _toggle_steering_hook(m, i: int) -> None:
    """A forward hook that adds a vector to a decoder layer's output (activation steering), or,
    if one is set, its removal."""
    handle = vars(m).pop("_steering", None)
    if handle is not None:
        handle.remove()
        return
    steer = torch.full((m.config.hidden_size,), 0.5 + i)
    m._steering = m.model.layers[i % 2].register_forward_hook(lambda module, args, out: out + steer)


def _swap_activation(m, i: int) -> None:
    """A module without parameters replaced: SiLU for GELU and back."""
    mlp = m.model.layers[i % 2].mlp
    mlp.act_fn = ACT2FN["silu"] if isinstance(mlp.act_fn, torch.nn.GELU) else torch.nn.GELU()


def _toggle_instance_forward(m, i: int) -> None:
    """A ``forward`` set on an MLP instance (its output scaled), or, if one is set, its removal."""
    mlp = m.model.layers[i % 2].mlp
    if "forward" in vars(mlp):
        del mlp.forward
    else:
        own = type(mlp).forward.__get__(mlp)
        mlp.forward = lambda x: own(x) * 1.5


@pytest.mark.parametrize("edit", [_toggle_steering_hook, _swap_activation, _toggle_instance_forward],
                         ids=["hook", "activation", "instance forward"])
def test_a_change_of_the_code_a_forward_runs_drops_the_cache(edit):
    """What the weights do not show: a hook set or removed, a module without parameters replaced,
    a forward set on an instance or removed. Each way, the answers are transformers'."""
    ref, model = tiny_pair()
    for i in range(3):
        warm(model)
        on_both(ref, model, lambda m, i=i: edit(m, i))
        assert model.prefix_cache.stats()["cached_blocks"] == 0
        assert_answers_match(ref, model)


def test_hidden_states_capture_hooks_keep_the_cache():
    """transformers installs its output-capturing hooks for good once hidden states are asked for;
    they record only then and change no output, so the cache keeps its prefixes."""
    ref, model = tiny_pair()
    warm(model)
    model.generate(IDS, max_new_tokens=2, do_sample=False, output_hidden_states=True, return_dict_in_generate=True)
    hits = model.prefix_cache.stats()["hit_tokens"]
    warm(model)
    assert model.prefix_cache.stats()["hit_tokens"] > hits
    assert_answers_match(ref, model)


def _delete_first(m):
    del m.model.layers[0]


def _pop_middle(m):
    m.model.layers.pop(1)


def _insert_copy(m):
    """A copy of layer 0 run second, under a new layer_idx, and one more layer in the count."""
    copied = copy.deepcopy(m.model.layers[0])
    copied.self_attn.layer_idx = 3
    m.model.layers.insert(1, copied)
    m.config.num_hidden_layers = 4


@pytest.mark.parametrize("warmed", [True, False], ids=["after a forward", "first"])
@pytest.mark.parametrize("edit", [_delete_first, _pop_middle, _insert_copy], ids=["del", "pop", "insert"])
def test_layers_deleted_or_inserted_answer_as_transformers(edit, warmed):
    """``del layers[i]``, ``pop`` and ``insert`` change a ModuleList without a registration; the
    layers keep their layer_idx, under which the pool keeps their K/V as transformers' caches do."""
    ref, model = tiny_pair(config=tiny_config(num_hidden_layers=3))
    if warmed:
        warm(model)
    on_both(ref, model, edit)
    assert_generation_matches(ref, model, IDS)
    assert_answers_match(ref, model)


def test_layers_sharing_a_layer_idx_are_refused():
    _, model = tiny_pair()
    model.model.layers[1].self_attn.layer_idx = 0
    with pytest.raises(ValueError, match=r"share the layer_idx \[0\]"):
        model.generate(IDS, max_new_tokens=2, do_sample=False)
    model.model.layers[1].self_attn.layer_idx = 1
    warm(model)


def _weight(m, i: int) -> torch.nn.Parameter:
    layer = m.model.layers[i % 2]
    return [layer.self_attn.k_proj.weight, layer.mlp.up_proj.weight, layer.input_layernorm.weight, m.lm_head.weight][i]


def _replace(m, i):
    owner = [m.model.layers[i % 2].self_attn.k_proj, m.lm_head][i % 2]
    owner.weight = torch.nn.Parameter(owner.weight.detach() * 0.8)


def _assign_data(m, i):
    weight = _weight(m, i)
    weight.data = weight.data * 1.25
    if i % 2:
        weight.data = weight.data.clone()  # the second storage may take the first one's address


CHANGES: dict[str, Callable] = {  # (ref, model, i): the same change on both, or a cache operation on model
    "nothing": lambda ref, model, i: None,
    "in place": lambda ref, model, i: on_both(ref, model, lambda m: _weight(m, i).mul_(1.2)),
    "buffer": lambda ref, model, i: on_both(ref, model, lambda m: m.model.rotary_emb.inv_freq.mul_(0.5 + i / 4)),
    "replace": lambda ref, model, i: on_both(ref, model, lambda m: _replace(m, i)),
    ".data =": lambda ref, model, i: on_both(ref, model, lambda m: _assign_data(m, i)),
    "dtype": lambda ref, model, i: on_both(ref, model, lambda m: m.to([torch.bfloat16, torch.float16][i % 2]).float()),
    ".data edit, reset": lambda ref, model, i: (on_both(ref, model, lambda m: _weight(m, i).data.mul_(0.9)),
                                                model.prefix_cache.reset()),
    "reset": lambda ref, model, i: model.prefix_cache.reset(),
    "kernel": lambda ref, model, i: model.set_linear_kernel(KERNELS[i % len(KERNELS)]),
    "layer count": lambda ref, model, i: on_both(ref, model, lambda m: _layers(m, 1 + i % 2)),
    "hook": lambda ref, model, i: on_both(ref, model, lambda m: _toggle_steering_hook(m, i)),
    "activation": lambda ref, model, i: on_both(ref, model, lambda m: _swap_activation(m, i)),
    "instance forward": lambda ref, model, i: on_both(ref, model, lambda m: _toggle_instance_forward(m, i)),
}


def assert_generation_matches(ref, model, ids):
    """Greedy tokens and every step's logits, the first being the prompt's last, as transformers'."""
    kwargs = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        got, want = model.generate(ids, **kwargs), ref.generate(ids, **kwargs)
    for got_logits, want_logits in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(got_logits, want_logits, atol=ATOL, rtol=0)
    assert torch.equal(got.sequences, want.sequences)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(sorted(CHANGES)), st.integers(0, 3), st.integers(0, len(PROMPTS) - 1)),
                min_size=1, max_size=5))
def test_interleaved_changes_and_generations_answer_as_transformers(steps):
    ref, model = tiny_pair()
    warm(model)
    for change, i, prompt in steps:
        CHANGES[change](ref, model, i)
        assert_generation_matches(ref, model, PROMPTS[prompt])
    gc.collect()
    model.prefix_cache.check_integrity()
