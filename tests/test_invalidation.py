"""Stale K/V are never served: weights, dtype, device or adapter changes drop the cache."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers.integrations.peft
from packaging.version import Version

from tests.models import tiny_pair

IDS = torch.arange(3, 30)[None]


def warm(model):
    model.generate(IDS, max_new_tokens=3, do_sample=False)
    assert model.prefix_cache.stats()["cached_blocks"] > 0


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
        with pytest.raises(RuntimeError, match="earlier KV cache"):
            model(IDS[:, :1], past_key_values=out.past_key_values)


def test_device_or_dtype_change_rebuilds_the_pool():
    _, model = tiny_pair()
    warm(model)
    model.to(torch.float16)
    assert model.prefix_cache.pool.kv.dtype == torch.float16
    assert model.prefix_cache.stats()["cached_blocks"] == 0


def _import_peft_usable_by_transformers():
    """peft, skipping the test when it is missing or when transformers' adapter integration
    refuses its version (transformers 5.24 asks for peft 0.22, not yet released)."""
    peft = pytest.importorskip("peft")
    needed = getattr(transformers.integrations.peft, "MIN_PEFT_VERSION", "0")
    if Version(peft.__version__) < Version(needed):
        pytest.skip(f"transformers {transformers.__version__} needs peft >= {needed}, have {peft.__version__}")
    return peft


def test_peft_adapter_switches_drop_the_cache():
    peft = _import_peft_usable_by_transformers()
    ref, model = tiny_pair()
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model.add_adapter(config, adapter_name="a")
    model.add_adapter(config, adapter_name="b")
    model.set_adapter("a")
    warm(model)
    with_a = model(IDS, logits_to_keep=1).logits
    model.set_adapter("b")
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    warm(model)
    model.disable_adapters()
    assert model.prefix_cache.stats()["cached_blocks"] == 0
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, logits_to_keep=1).logits, ref(IDS).logits[:, -1:], atol=1e-4, rtol=0)
    model.enable_adapters()
    model.set_adapter("a")
    torch.testing.assert_close(model(IDS, logits_to_keep=1).logits, with_a, atol=1e-5, rtol=0)


def test_the_watchers_hooks_are_installed_with_the_first_model_not_at_import():
    """Importing Trellis changes nothing process-wide; building a model installs the two
    module registration hooks the weights watcher counts on (once, however many models)."""
    script = (
        "import torch.nn.modules.module as m, trellis\n"
        "from tests.models import tiny_pair\n"
        "hooks = lambda: (len(m._global_parameter_registration_hooks), len(m._global_module_registration_hooks))\n"
        "assert hooks() == (0, 0), hooks()\n"
        "tiny_pair(); tiny_pair()\n"
        "assert hooks() == (1, 1), hooks()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])
