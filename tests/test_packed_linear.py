"""Opt-in oneDNN-prepacked linear layers: same results as nn.Linear up to fp32 reassociation,
kept current when weights change, invisible to state dicts, copies and training."""

import copy
import pickle

import pytest
import torch

from tests.models import smollm2_reference, smollm2_tokenizer, smollm2_trellis, tiny_pair
from trellis.models import packed_linear
from trellis.models.packed_linear import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not packed_linear.packing_available(), reason="PyTorch built without oneDNN")
IDS = torch.arange(3, 40)[None]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (7, 48), (2, 5, 48), (0, 48)])
def test_matches_nn_linear(bias, shape):
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 40, bias=bias)
    packed = copy.deepcopy(plain)
    assert pack_linears(packed, True) == 1 and type(packed) is PackedLinear
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-5)


def test_repacks_when_the_weight_changes():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    pack_linears(layer, True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = layer(x)
        layer.weight.mul_(2)  # in place: the version counter moves
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        layer.weight = torch.nn.Parameter(torch.randn(8, 16))  # replaced: a new data pointer
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(before, layer(x))


def test_training_takes_the_plain_path_and_gets_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    pack_linears(layer, True)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.weight.grad is not None and layer._packed is None


def test_model_state_dict_copies_pickles_and_unpacking():
    _, model = tiny_pair()
    keys = set(model.state_dict())
    assert model.pack_weights() == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    with torch.no_grad():
        model(IDS)  # packs
    assert set(model.state_dict()) == keys
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert type(clone.lm_head) is PackedLinear and clone.lm_head._packed is None
    with torch.no_grad():
        torch.testing.assert_close(clone(IDS).logits, model(IDS).logits)
    assert model.pack_weights(False) == 15 and type(model.lm_head) is torch.nn.Linear
    assert "_packed" not in model.lm_head.__dict__


def test_tiny_model_matches_transformers_with_cache_hits():
    ref, model = tiny_pair()
    model.pack_weights()
    with torch.no_grad():
        expected = ref(IDS).logits
        torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(model(IDS, logits_to_keep=1).logits, expected[:, -1:], rtol=0, atol=1e-4)
    assert model.prefix_cache.stats()["hit_tokens"] > 0
    assert torch.equal(model.generate(IDS, max_new_tokens=12, do_sample=False),
                       ref.generate(IDS, max_new_tokens=12, do_sample=False))


def test_packing_drops_the_cache_and_refuses_its_handles():
    _, model = tiny_pair()
    with torch.no_grad():
        out = model(IDS)
        model.pack_weights()
        assert model.prefix_cache.stats()["cached_blocks"] == 0
        with pytest.raises(RuntimeError, match="earlier KV cache"):
            model(IDS[:, :1], past_key_values=out.past_key_values)


def test_smollm2_greedy_tokens_match_transformers():
    tok, ref = smollm2_tokenizer(), smollm2_reference()
    model = smollm2_trellis(num_blocks=64, pack_weights=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three primary colours."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    expected = ref.generate(ids, max_new_tokens=24, do_sample=False)
    for _ in range(2):  # cold, then with the prompt cached
        assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False), expected)
    with torch.no_grad():  # fp32 reassociation across 30 layers: ~1e-4 of the logits' scale
        got, want = model(ids).logits, ref(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max() * 10
