"""The Hugging Face seam: what a user of ``LlamaForCausalLM`` passes or expects back gets
transformers' answer from ``TrellisLlama``, or a clear refusal (never a different answer)."""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import installed
from tests.models import tiny_config, tiny_pair
from trellis import TrellisLlama
from trellis.runner import ATTN_IMPLEMENTATION, cpu_linear

ATOL = 1e-4
IDS = torch.arange(3, 23)[None]  # 20 tokens: 5 blocks of 4


def close(a, b, atol=ATOL):
    return (a - b).abs().max().item() <= atol


def warm(model, ids=IDS):
    """Cache ``ids``' blocks, so that a later forward over the same prefix could hit them."""
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert model.prefix_cache.stats()["cached_blocks"] > 0


def test_caller_position_ids_are_honoured_and_never_shared():
    ref, model = tiny_pair()
    warm(model)
    positions = torch.cat([torch.arange(6), torch.arange(40, 54)])[None]  # a jump, as packed documents have
    with torch.no_grad():
        got = model(IDS, position_ids=positions).logits
        want = ref(IDS, position_ids=positions).logits
        assert close(got, want)
        hits = model.prefix_cache.stats()["hit_tokens"]
        # Trellis' own positions, passed explicitly (generate() does), still hit the cache...
        own = model(IDS, position_ids=torch.arange(20)[None], logits_to_keep=1).logits
        assert close(own, ref(IDS).logits[:, -1:])
        assert model.prefix_cache.stats()["hit_tokens"] > hits
        # ... and the K/V computed at the caller's positions were never cached for later prompts.
        assert close(model(IDS).logits, ref(IDS).logits)
    model.prefix_cache.check_integrity()


def test_position_ids_of_a_padded_batch_and_of_decoding_steps():
    ref, model = tiny_pair()
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 0, 10, 11, 12, 13], [3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions)
        want = ref(ids, attention_mask=mask, position_ids=positions)
        assert close(got.logits[:, 2:], want.logits[:, 2:])  # padded positions: see test_padded_positions
        step = torch.tensor([[20], [21]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        next_positions = torch.tensor([[14], [9]])
        got = model(step, attention_mask=mask, position_ids=next_positions, past_key_values=got.past_key_values)
        want = ref(step, attention_mask=mask, position_ids=next_positions, past_key_values=want.past_key_values)
        assert close(got.logits, want.logits)
    with pytest.raises(ValueError, match="position_ids of shape"):
        model(IDS, position_ids=torch.arange(5)[None])
    model.prefix_cache.check_integrity()


def test_hidden_states_match_transformers_even_over_a_cached_prefix():
    ref, model = tiny_pair()
    warm(model)
    with torch.no_grad():
        got = model(IDS, output_hidden_states=True)
        want = ref(IDS, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == model.config.num_hidden_layers + 1
    assert all(close(g, w) for g, w in zip(got.hidden_states, want.hidden_states))
    assert close(got.logits, want.logits)


def test_generate_returns_hidden_states_and_scores_like_transformers():
    ref, model = tiny_pair()
    settings = {"max_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True,
                "output_hidden_states": True, "output_scores": True, "output_logits": True}
    with torch.no_grad():
        got, want = model.generate(IDS, **settings), ref.generate(IDS, **settings)
    assert torch.equal(got.sequences, want.sequences)
    assert all(close(g, w) for g, w in zip(got.scores, want.scores))
    assert len(got.hidden_states) == len(want.hidden_states) == 4
    for got_step, want_step in zip(got.hidden_states, want.hidden_states):
        assert all(close(g, w) for g, w in zip(got_step, want_step))


def test_output_attentions_is_refused():
    _, model = tiny_pair()
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model.generate(IDS, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_return_dict_false_gives_transformers_tuple():
    ref, model = tiny_pair()
    with torch.no_grad():
        got = model(IDS, labels=IDS, return_dict=False)
        want = ref(IDS, labels=IDS, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want)
    assert close(got[0], want[0]) and close(got[1], want[1])  # loss, logits


def test_inputs_embeds_are_served_without_the_prefix_cache():
    ref, model = tiny_pair()
    warm(model)
    embeds = ref.get_input_embeddings()(IDS)
    with torch.no_grad():
        assert close(model(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits)
        got = model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
        want = ref.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    hits = model.prefix_cache.stats()["hit_tokens"]
    warm(model)  # the embeddings' sessions cached nothing under placeholder ids
    assert model.prefix_cache.stats()["hit_tokens"] - hits == 19  # all of IDS but its last token
    model.prefix_cache.check_integrity()


def test_padded_positions_give_zero_logits_and_real_ones_match():
    """A documented deviation: padding is dropped before packing, so nothing is computed there."""
    ref, model = tiny_pair()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        got, want = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert torch.count_nonzero(got[0, :2]) == 0
    assert close(got[0, 2:], want[0, 2:]) and close(got[1], want[1])


def test_training_gradients_match_transformers():
    ref, model = tiny_pair()
    warm(model)  # a cached prefix must not cut the gradient
    for m in (ref, model):
        m.train()
        m(IDS, labels=IDS).loss.backward()
    grads = {name: p.grad for name, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert close(p.grad, grads[name], atol=1e-5), name
    model.prefix_cache.check_integrity()


def test_dropout_in_training_mode_is_applied_and_never_cached():
    """transformers drops attention probabilities in training mode (attention_dropout > 0), with or
    without gradients: Trellis does too, and such a forward's K/V (one random draw) neither reuse
    the cache nor enter it."""
    ref, model = tiny_pair(config=tiny_config(attention_dropout=0.5))
    warm(model)
    hits = model.prefix_cache.stats()["hit_tokens"]
    longer = torch.cat([IDS, torch.arange(40, 46)[None]], 1)
    for m in (ref, model):
        m.train()
    with torch.no_grad():
        torch.manual_seed(3)
        want = ref(longer).logits
        torch.manual_seed(3)
        got = model(longer).logits
        assert close(got, want)
        torch.manual_seed(4)
        assert not close(model(longer).logits, got)  # another draw
        assert model.prefix_cache.stats()["hit_tokens"] == hits  # IDS' cached blocks were not reused
        model.prefix_cache.reset()
        model(longer)  # computed with dropout: not shared
        for m in (ref, model):
            m.eval()
        assert close(model(longer, logits_to_keep=1).logits, ref(longer).logits[:, -1:])
    assert model.prefix_cache.stats()["hit_tokens"] == 0
    model.prefix_cache.check_integrity()


def test_lora_dropout_in_training_mode_keeps_its_kv_out_of_the_cache():
    peft = installed("peft")
    ref, model = tiny_pair()
    lora = peft.LoraConfig(r=4, lora_dropout=0.5, target_modules=["k_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    peft.inject_adapter_in_model(copy.deepcopy(lora), ref)
    peft.inject_adapter_in_model(copy.deepcopy(lora), model)
    model.load_state_dict(ref.state_dict())
    ref.eval()  # (the injected modules start in training mode)
    longer = torch.cat([IDS, torch.arange(40, 46)[None]], 1)
    with torch.no_grad():
        model.train()
        model(IDS)  # K/V from dropped-out adapter inputs
        model.eval()
        assert close(model(longer, logits_to_keep=1).logits, ref(longer).logits[:, -1:])
    assert model.prefix_cache.stats()["hit_tokens"] == 0


@pytest.mark.parametrize("tuning", ["prompt", "prefix"])
def test_peft_prompt_learning_generates_or_is_refused_by_name(tuning):
    """PEFT's prompt tuning hides forward's arguments behind its own, so generate() checks the cache
    argument against forward's names: it must be one. Prefix tuning brings a cache of its own: refused
    by name before generate() starts (peft would read settings the paged cache has not), and in a forward."""
    peft = installed("peft")
    ref, model = tiny_pair()
    config = (peft.PromptTuningConfig if tuning == "prompt" else peft.PrefixTuningConfig)(
        task_type="CAUSAL_LM", num_virtual_tokens=4)
    tuned = []
    for m in (ref, model):
        torch.manual_seed(1)
        tuned.append(peft.get_peft_model(m, copy.deepcopy(config)).eval())
    inputs = {"input_ids": IDS[:, :10], "attention_mask": torch.ones_like(IDS[:, :10]), "max_new_tokens": 6,
              "do_sample": False}
    with torch.no_grad():
        expected = tuned[0].generate(**inputs)
        if tuning == "prefix":
            with pytest.raises(TypeError, match="peft's prefix tuning is not supported"):
                tuned[1].generate(**inputs)
            with pytest.raises(TypeError, match="must be a PagedKVCache from this model, got DynamicCache"):
                tuned[1](input_ids=IDS[:, :10])
            return
        assert torch.equal(tuned[1].generate(**inputs), expected)
        assert torch.equal(tuned[1].generate(**inputs), expected)  # over its cached prefix


def test_prefill_chunks_over_left_padding_are_served_or_refused_by_name():
    """generate(prefill_chunk_size=k) runs the prompt k columns at a time: a first chunk of nothing
    but a row's padding would start that row with no token, which the paged cache cannot hold."""
    from tests.test_conformance import left_pad

    ref, model = tiny_pair()
    ids, mask = left_pad([torch.arange(3, 14), torch.arange(20, 26)])  # the second row: 5 padding columns
    settings = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        expected = ref.generate(ids, prefill_chunk_size=6, **settings)
        assert torch.equal(model.generate(ids, prefill_chunk_size=6, **settings), expected)
        with pytest.raises(ValueError, match="prefill_chunk_size=5: a row's first chunk is all padding"):
            model.generate(ids, prefill_chunk_size=5, **settings)
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_longrope_is_answered_up_to_its_original_length_and_refused_past_it():
    """Past original_max_position_embeddings transformers' LongRoPE turns every token of a forward
    to its long-context frequencies, so a token's K/V depend on the length of the forward that
    computed it; within that length Trellis answers as transformers does, cache hits included."""
    config = tiny_config()
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                              "long_factor": [4.0] * 8, "original_max_position_embeddings": 24, "factor": 32.0}
    ref, model = tiny_pair(config=config)
    assert model.runner.max_positions() == 24
    warm(model, IDS[:, :12])
    with torch.no_grad():
        assert close(model(IDS, logits_to_keep=1).logits, ref(IDS).logits[:, -1:])
        assert model.prefix_cache.stats()["hit_tokens"] > 0
        expected = ref.generate(IDS, max_new_tokens=5, do_sample=False)  # the last new token needs no position
        assert torch.equal(model.generate(IDS, max_new_tokens=5, do_sample=False), expected)
        with pytest.raises(ValueError, match=r"exceeds the 24 positions .* original_max_position_embeddings"):
            model.generate(IDS, max_new_tokens=6, do_sample=False)
        with pytest.raises(ValueError, match="LongRoPE switches every token"):
            model(torch.arange(3, 28)[None])
    model.prefix_cache.check_integrity()


def test_longrope_drafts_past_the_original_length_leave_nothing_shared():
    """Prompt-lookup drafts that generate() discards may pass original_max_position_embeddings; that
    forward runs at LongRoPE's long frequencies for every token, as in transformers, and its K/V
    (not what a cold forward computes) are never shared with a later request."""
    config = tiny_config()
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [2.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 24,
                              "factor": 4.0}
    ref, model = tiny_pair(config=config)
    prompt = torch.tensor([[5, 9, 13, 17, 21, 25] * 3])  # repetitive: prompt lookup drafts many tokens
    with torch.no_grad():
        drafted = {"max_new_tokens": 7, "do_sample": False, "prompt_lookup_num_tokens": 10}  # 18 + 7 - 1 = 24 kept
        assert torch.equal(model.generate(prompt, **drafted), ref.generate(prompt, **drafted))
        assert close(model(prompt, logits_to_keep=1).logits, ref(prompt).logits[:, -1:])
        plain = {"max_new_tokens": 5, "do_sample": False}
        assert torch.equal(model.generate(prompt, **plain), ref.generate(prompt, **plain))
        # With the prompt cached (at the short frequencies), the drafted forward reuses none of it.
        assert model.prefix_cache.admission_cost(prompt[0].tolist() + [7]).cached_tokens > 0
        assert torch.equal(model.generate(prompt, **drafted), ref.generate(prompt, **drafted))
    model.prefix_cache.check_integrity()


def test_lora_on_attention_learns_through_the_paged_model():
    peft = installed("peft")
    ref, model = tiny_pair()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    grads = []
    for m in (ref, model):
        torch.manual_seed(1)
        tuned = peft.get_peft_model(m, copy.deepcopy(lora))
        tuned(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in tuned.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[1].items():
        assert grad is not None and close(grad, grads[0][name], atol=1e-5), name


def test_cache_implementation_is_refused_clearly():
    _, model = tiny_pair()
    with pytest.raises(ValueError, match="paged prefix cache, not in a 'static' cache"):
        model.generate(IDS, max_new_tokens=2, cache_implementation="static")


def test_the_class_runs_paged_attention_however_it_is_built():
    config = tiny_config()
    assert TrellisLlama(copy.deepcopy(config)).config._attn_implementation == ATTN_IMPLEMENTATION
    assert TrellisLlama._from_config(copy.deepcopy(config)).config._attn_implementation == ATTN_IMPLEMENTATION
    explicit = TrellisLlama._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    assert explicit.config._attn_implementation == "sdpa"


def test_from_pretrained_loading_info_and_state_dict(tmp_path):
    ref, model = tiny_pair()
    model.save_pretrained(tmp_path)
    loaded, info = TrellisLlama.from_pretrained(tmp_path, output_loading_info=True, device="cpu")
    assert isinstance(loaded, TrellisLlama) and not info["missing_keys"]
    from_dict = TrellisLlama.from_pretrained(None, config=tiny_config(), state_dict=ref.state_dict(), device="cpu")
    with torch.no_grad():
        assert close(from_dict(IDS).logits, ref(IDS).logits)


def test_state_dict_saves_with_safetensors(tmp_path):
    ref, model = tiny_pair()
    if cpu_linear.onednn_available():
        model.set_linear_kernel("onednn")  # input-major weights: transposed views
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), path)
    saved = load_file(path)
    assert all(torch.equal(saved[name], tensor) for name, tensor in ref.state_dict().items())


@pytest.mark.skipif(not cpu_linear.onednn_available(), reason="no oneDNN on this machine or build")
def test_onednn_linear_layers_compile():
    layer = torch.nn.Sequential(torch.nn.Linear(64, 32))
    cpu_linear.set_linear_kernel(layer, "onednn")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert close(torch.compile(layer)(x), torch.nn.functional.linear(x, layer[0].weight, layer[0].bias), 1e-5)
