"""Conformance with transformers: the behaviours its own Llama and generation tests expect of a
``LlamaForCausalLM`` (``GenerationTesterMixin``, ``CausalLMModelTest``, ``LlamaModelTest``), checked
on ``TrellisLlama`` against a plain sdpa ``LlamaForCausalLM`` with the same weights, on a cold
prefix cache and again on a warm one. Deliberate deviations are tested as such and listed in
docs/compatibility.md ("Conformance with transformers").
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import DynamicCache, GenerationConfig, LlamaForCausalLM
from transformers.generation.utils import GENERATION_MODES_MAPPING, GenerationMode

from tests.models import tiny_config, tiny_pair
from trellis import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG, PagedKVCache

ATOL = 1e-4
NEW = 5  # new tokens per generate() call: enough to cross a block boundary, few enough to stay fast


def tokens(seed: int, n: int = 13) -> torch.Tensor:
    """A ``[1, n]`` prompt of ordinary token ids (3 to 255: no pad, eos or bos)."""
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


IDS = tokens(0)  # 13 tokens: 3 full blocks of 4, so a warm cache serves 12 of them


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch ``[B, S]`` and its attention mask from 1-D prompts."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> bool:
    """Same shape, within ``atol``; infinities (filtered scores) must be the same."""
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=0, atol=atol)


def hits(model: TrellisLlama) -> int:
    return model.prefix_cache.stats()["hit_tokens"]


def seeded_generate(model, inputs, seed: int, **settings):
    torch.manual_seed(seed)
    return model.generate(inputs, **settings)


def assert_outputs_match(got, want) -> None:
    """Same tokens; for ``return_dict_in_generate`` also the same fields, scores, logits, hidden states, beams."""
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
        return
    assert type(got) is type(want)
    assert {k for k in got if k != CACHE_ARG} == {k for k in want if k != CACHE_ARG}
    assert torch.equal(got.sequences, want.sequences)
    for field in ("scores", "logits"):
        if getattr(want, field, None) is not None:
            assert len(got[field]) == len(want[field])
            assert all(close(g, w) for g, w in zip(got[field], want[field])), field
    if getattr(want, "hidden_states", None) is not None:
        assert len(got.hidden_states) == len(want.hidden_states)
        for got_step, want_step in zip(got.hidden_states, want.hidden_states):
            assert all(close(g, w) for g, w in zip(got_step, want_step))
    if getattr(want, "sequences_scores", None) is not None:
        assert close(got.sequences_scores, want.sequences_scores, 1e-5)
        assert torch.equal(got.beam_indices, want.beam_indices)


def assert_generate_matches(ref, model, inputs=None, seed: int = 0, warm_hits: bool = True, **settings):
    """Trellis' ``generate`` on a cold cache, then on a warm one, gives transformers' output
    (same seed); the warm call reuses cached blocks. Returns Trellis' last output."""
    want = seeded_generate(ref, inputs, seed, **settings)
    for run in ("cold", "warm"):
        before = hits(model)
        got = seeded_generate(model, inputs, seed, **settings)
        assert_outputs_match(got, want)
        if run == "warm" and warm_hits:
            assert hits(model) > before, "the warm call reused nothing"
    model.prefix_cache.check_integrity()
    return got


# --- generation strategies (GenerationTesterMixin) ---------------------------------------------------


@pytest.mark.parametrize(("batch", "with_mask"), [(1, False), (2, True)])
def test_greedy_generate(batch, with_mask):
    """test_greedy_generate: greedy tokens, with or without an (all-ones) attention_mask."""
    ref, model = tiny_pair()
    ids = torch.cat([tokens(i) for i in range(batch)])
    mask = {"attention_mask": torch.ones_like(ids)} if with_mask else {}
    assert_generate_matches(ref, model, ids, max_new_tokens=NEW, do_sample=False, **mask)
    assert model.prefix_cache.stats()["live_sessions"] == 0


@pytest.mark.parametrize(("warpers", "num_return_sequences"), [({}, 1), ({"top_k": 10, "top_p": 0.7, "temperature": 0.7}, 3)],
                         ids=["plain", "warped_3_returns"])
def test_sample_generate(warpers, num_return_sequences):
    """test_sample_generate: seeded sampling draws transformers' tokens (Trellis consumes no random numbers)."""
    ref, model = tiny_pair()
    out = assert_generate_matches(ref, model, IDS, seed=3, max_new_tokens=NEW, do_sample=True,
                                  num_return_sequences=num_return_sequences, **warpers)
    assert out.shape == (num_return_sequences, IDS.shape[1] + NEW)


@pytest.mark.parametrize(("num_beams", "num_return_sequences", "do_sample"), [(2, 1, False), (3, 3, False), (2, 2, True)],
                         ids=["beam_search_2", "beam_search_3_return_3", "beam_sample_2_return_2"])
def test_beam_search_generate(num_beams, num_return_sequences, do_sample):
    """test_beam_search_generate / test_beam_sample_generate, on a left-padded batch of two prompts."""
    ref, model = tiny_pair()
    ids, mask = left_pad([tokens(1)[0], tokens(2, 9)[0]])
    out = assert_generate_matches(ref, model, ids, seed=5, attention_mask=mask, max_new_tokens=NEW, do_sample=do_sample,
                                  num_beams=num_beams, num_return_sequences=num_return_sequences, length_penalty=2.0)
    assert out.shape[0] == 2 * num_return_sequences


@pytest.mark.parametrize(("strategy", "use_cache"), [
    ({"do_sample": False}, True),
    ({"do_sample": False}, False),
    ({"do_sample": True, "num_return_sequences": 2}, True),
    ({"do_sample": False, "num_beams": 2, "num_return_sequences": 2}, True),
], ids=["greedy", "greedy_without_cache", "sample", "beam"])
def test_generate_dict_outputs(strategy, use_cache):
    """test_*_generate_dict_output(s): return_dict_in_generate with scores, logits and hidden states, equal and shaped alike."""
    ref, model = tiny_pair()
    settings = {"max_new_tokens": 3, "return_dict_in_generate": True, "output_scores": True, "output_logits": True,
                "output_hidden_states": True, "use_cache": use_cache, **strategy}
    # Asking for every position's hidden states turns prefix reuse off (see TrellisLlama.forward).
    out = assert_generate_matches(ref, model, IDS, seed=1, warm_hits=False, **settings)
    rows, prompt_len = strategy.get("num_return_sequences", 1), IDS.shape[1]
    layers, hidden = model.config.num_hidden_layers + 1, model.config.hidden_size
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == 3
    assert all(s.shape == (rows, model.config.vocab_size) for s in out.scores)
    for step, states in enumerate(out.hidden_states):
        width = prompt_len if step == 0 else 1 if use_cache else prompt_len + step
        assert len(states) == layers and all(h.shape[1:] == (width, hidden) for h in states)
    assert isinstance(getattr(out, CACHE_ARG), PagedKVCache) if use_cache else getattr(out, CACHE_ARG) is None


@pytest.mark.parametrize("name", sorted({CACHE_ARG, "past_key_values"}))
def test_generate_continue_from_cache(name):
    """test_generate_continue_from_past_key_values: the returned cache fed back with the whole sequence (plus new text)."""
    ref, model = tiny_pair()
    settings = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True}
    want, got = ref.generate(IDS, **settings), model.generate(IDS, **settings)
    assert torch.equal(got.sequences, want.sequences)
    for more in (torch.empty(1, 0, dtype=torch.long), tokens(7, 6)):  # the answer alone, then the answer and a new turn
        want_ids, got_ids = torch.cat([want.sequences, more], 1), torch.cat([got.sequences, more], 1)
        want = ref.generate(want_ids, **{CACHE_ARG: want[CACHE_ARG]}, **settings)
        got = model.generate(got_ids, **{name: got[CACHE_ARG]}, **settings)
        assert torch.equal(got.sequences, want.sequences)
    del got
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


def test_two_calls_with_the_returned_cache_equal_one_long_call():
    """test_generate_continue_from_past_key_values: 3 + 3 tokens through the cache are the 6 tokens of one call."""
    ref, model = tiny_pair()
    first = model.generate(IDS, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    second = model.generate(first.sequences, **{CACHE_ARG: first[CACHE_ARG]}, max_new_tokens=3, do_sample=False)
    assert torch.equal(second, ref.generate(IDS, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("mode", [GenerationMode.CONTRASTIVE_SEARCH, GenerationMode.DOLA_GENERATION,
                                  GenerationMode.GROUP_BEAM_SEARCH, GenerationMode.CONSTRAINED_BEAM_SEARCH])
def test_strategies_moved_to_the_hub(mode):
    """test_contrastive_generate, test_dola_decoding_sample, test_group_beam_search_generate, test_constrained_beam_search_generate."""
    if "/" in GENERATION_MODES_MAPPING[mode]:
        pytest.skip(f"transformers {transformers.__version__} moved {mode.value} to the hub "
                    f"({GENERATION_MODES_MAPPING[mode]}, custom_generate with trust_remote_code): no model hub here")
    pytest.fail(f"{mode.value} is back in transformers' core: write its conformance test")


# --- padding, stopping, arguments -------------------------------------------------------------------


def test_left_padding_compatibility():
    """test_left_padding_compatibility: last-token logits of a left-padded batch equal the unpadded ones."""
    ref, model = tiny_pair()
    ids = torch.cat([IDS, tokens(1)])
    padded = torch.cat([torch.full((2, 4), 9), ids], 1)  # pad id 9: not the embedding's padding_idx
    mask = torch.cat([torch.zeros(2, 4, dtype=torch.long), torch.ones_like(ids)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids).logits[:, -1]
        model(IDS)  # warm the first row's prefix
        for extra in ({}, {"position_ids": positions}):
            assert close(model(padded, attention_mask=mask, **extra).logits[:, -1], want)
            assert close(ref(padded, attention_mask=mask, **extra).logits[:, -1], want)
    model.prefix_cache.check_integrity()


@pytest.mark.parametrize("infer_mask", [False, True], ids=["mask_passed", "mask_inferred_from_pad_token"])
def test_left_padded_batch_generate(infer_mask):
    """test_left_padding_compatibility for generate: a padded batch gives each prompt's unpadded tokens, cold and warm."""
    ref, model = tiny_pair()
    prompts = [tokens(10)[0], tokens(11, 6)[0], tokens(12, 9)[0]]
    ids, mask = left_pad(prompts)
    settings = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    out = assert_generate_matches(ref, model, ids, **settings, **({} if infer_mask else {"attention_mask": mask}))
    for row, prompt in zip(out, prompts):
        alone = ref.generate(prompt[None], **settings)[0]
        assert torch.equal(row[ids.shape[1]:], alone[len(prompt):])


def test_identical_prompts_in_one_batch():
    """test_batching_equivalence for generate: identical rows give transformers' tokens and are cached once."""
    ref, model = tiny_pair()
    ids = IDS.repeat(3, 1)
    before = hits(model)
    got = assert_generate_matches(ref, model, ids, max_new_tokens=NEW, do_sample=False)
    assert all(torch.equal(row, got[0]) for row in got)
    # Cold, each row computes its own prompt (no in-batch sharing); the tree keeps one copy. Warm, all three hit it.
    assert hits(model) - before == 3 * 12
    assert model.prefix_cache.stats()["cached_blocks"] == 4  # the prompt's 3 blocks and one of prompt + answer


def test_batching_equivalence():
    """test_batching_equivalence: each row of a batched forward equals that row run alone (one row's prefix warm)."""
    ref, model = tiny_pair()
    ids = torch.cat([IDS, tokens(1), tokens(2)])
    with torch.no_grad():
        model(tokens(1))
        batched = model(ids).logits
        for i in range(3):
            assert close(batched[i], ref(ids[i:i + 1]).logits[0])
            assert close(batched[i], model(ids[i:i + 1]).logits[0])
    model.prefix_cache.check_integrity()


def stopping_settings(case: str, ref: LlamaForCausalLM) -> dict:
    """Stopping settings, with an eos id that transformers' greedy run emits as its third new token."""
    third = int(ref.generate(IDS, max_new_tokens=3, do_sample=False)[0, -1])
    return {"max_length": {"max_length": 17}, "max_new_tokens": {"max_new_tokens": 4},
            "eos_list": {"max_new_tokens": 6, "eos_token_id": [250, third]},
            "min_new_tokens": {"max_new_tokens": 6, "eos_token_id": third, "min_new_tokens": 5},
            "min_length": {"max_new_tokens": 6, "eos_token_id": third, "min_length": 18}}[case]


@pytest.mark.parametrize("case", ["max_length", "max_new_tokens", "eos_list", "min_new_tokens", "min_length"])
def test_stopping_criteria(case):
    """MaxLengthCriteria, EosTokenCriteria, MinNewTokensLengthLogitsProcessor: same stop, same length."""
    ref, model = tiny_pair()
    settings = stopping_settings(case, ref)
    out = assert_generate_matches(ref, model, IDS, do_sample=False, **settings)
    stops_at = {"max_length": 17, "max_new_tokens": 17, "eos_list": 16}
    assert out.shape[1] == stops_at[case] if case in stops_at else out.shape[1] >= 18  # eos held back 5 tokens


def test_eos_in_a_batch_pads_the_finished_row():
    """test_eos_token_id / pad handling: a row that meets eos is padded while the other continues."""
    ref, model = tiny_pair()
    ids = torch.cat([IDS, tokens(1)])
    eos = int(ref.generate(ids, max_new_tokens=2, do_sample=False)[0, -1])
    out = assert_generate_matches(ref, model, ids, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert out[0, -1] == 0


@pytest.mark.parametrize("settings", [{"max_new_tokens": 0}, {"max_length": 10}, {"num_return_sequences": 2}],
                         ids=["no_new_tokens", "max_length_below_prompt", "greedy_with_several_returns"])
def test_invalid_generation_settings_raise_as_in_transformers(settings):
    """GenerationConfig validation: what transformers refuses, Trellis refuses with the same ValueError."""
    ref, model = tiny_pair()
    with pytest.raises(ValueError) as want:
        ref.generate(IDS, do_sample=False, **settings)
    with pytest.raises(ValueError) as got:
        model.generate(IDS, do_sample=False, **settings)
    assert str(got.value) == str(want.value)
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_generate_without_input_ids():
    """test_generate_without_input_ids: generation starts from bos_token_id."""
    ref, model = tiny_pair()
    assert torch.equal(model.generate(max_new_tokens=NEW, do_sample=False), ref.generate(max_new_tokens=NEW, do_sample=False))


@pytest.mark.parametrize("keep", [0, 1, 3, torch.tensor([12, 2, 2])], ids=["all", "last", "last3", "tensor"])
def test_logits_to_keep(keep):
    """test_forward_with_logits_to_keep: the kept columns' logits, cold and over a cached prefix."""
    ref, model = tiny_pair()
    with torch.no_grad():
        want = ref(IDS, logits_to_keep=keep).logits
        for _ in range(2):
            assert close(model(IDS, logits_to_keep=keep).logits, want)
    model.prefix_cache.check_integrity()


def test_generate_with_logits_to_keep_zero():
    """test_generate_methods_with_logits_to_keep: logits_to_keep=0 in generate changes nothing."""
    ref, model = tiny_pair()
    settings = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    assert_generate_matches(ref, model, IDS, logits_to_keep=0, warm_hits=False, **settings)  # all logits: no reuse


@pytest.mark.parametrize("padded", [False, True])
def test_labels_give_transformers_loss(padded):
    """CausalLM loss: labels (-100 ignored, num_items_in_batch, padding) give transformers' loss and logits."""
    ref, model = tiny_pair()
    ids, mask = left_pad([IDS[0], tokens(1, 9)[0]] if padded else [IDS[0], tokens(1)[0]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 5] = -100
    labels[:, 1:][(mask[:, :-1] == 0) & (mask[:, 1:] == 1)] = -100  # predicted from padding: refused otherwise
    real = mask.bool()
    with torch.no_grad():
        model(ids, attention_mask=mask)  # warm (a loss needs every logit, so it reuses nothing)
        for extra in ({}, {"num_items_in_batch": torch.tensor(11)}):
            got = model(ids, attention_mask=mask, labels=labels, **extra)
            want = ref(ids, attention_mask=mask, labels=labels, **extra)
            assert close(got.loss, want.loss) and close(got.logits[real], want.logits[real])


def test_use_cache_false():
    """use_cache=False: no cache returned by forward, the same tokens from generate."""
    ref, model = tiny_pair()
    with torch.no_grad():
        got, want = model(IDS, use_cache=False), ref(IDS, use_cache=False)
    assert getattr(got, CACHE_ARG) is None and getattr(want, CACHE_ARG) is None
    assert close(got.logits, want.logits)
    assert model.prefix_cache.stats()["live_sessions"] == 0
    # Each step of a cacheless generate() runs the whole sequence; it still reuses cached prefixes.
    assert_generate_matches(ref, model, IDS, max_new_tokens=NEW, do_sample=False, use_cache=False)


def test_position_ids():
    """position_ids honoured as transformers does: Trellis' own, shifted, or restarting (packed documents)."""
    ref, model = tiny_pair()
    with torch.no_grad():
        model(IDS)  # warm
        for positions in (torch.arange(13), torch.arange(13) + 7, torch.cat([torch.arange(6), torch.arange(7)])):
            assert close(model(IDS, position_ids=positions[None]).logits, ref(IDS, position_ids=positions[None]).logits)
    model.prefix_cache.check_integrity()


@pytest.mark.parametrize(("draft", "do_sample"), [("prompt_lookup", False), ("assistant", True), ("trellis_assistant", False),
                                               ("early_exit", False), ("early_exit", True)])
def test_assisted_decoding(draft, do_sample):
    """test_assisted_decoding_matches_greedy_search / _sample, test_prompt_lookup_decoding_matches_greedy_search;
    early exit (LayerSkip): the model drafts with its first layer, its drafts' K/V never cached."""
    ref, model = tiny_pair()
    ids = torch.cat([IDS, IDS[:, :6], IDS], 1)  # repeats, so that prompt lookup finds drafts
    if draft == "prompt_lookup":
        helper = {"prompt_lookup_num_tokens": 3}
    elif draft == "early_exit":
        helper = {"assistant_early_exit": 1}
    else:
        helper = {"assistant_model": tiny_pair(seed=1)[draft == "trellis_assistant"]}
    settings = {"max_new_tokens": 6, "do_sample": do_sample, "return_dict_in_generate": True, "output_scores": True}
    got = assert_generate_matches(ref, model, ids, seed=4, **settings, **helper)
    if not do_sample:  # assisted greedy equals plain greedy
        assert torch.equal(got.sequences, ref.generate(ids, max_new_tokens=6, do_sample=False))


# --- inputs, dtypes, weights ------------------------------------------------------------------------


def test_inputs_embeds_forward_and_generate():
    """test_inputs_embeds_matches_input_ids, test_generate_from_inputs_embeds (also with input_ids and padding)."""
    ref, model = tiny_pair()
    model.generate(IDS, max_new_tokens=2, do_sample=False)  # warm: embeddings must not hit these blocks
    embed = ref.get_input_embeddings()
    with torch.no_grad():
        assert close(model(inputs_embeds=embed(IDS)).logits, model(IDS).logits)
        assert close(model(inputs_embeds=embed(IDS)).logits, ref(inputs_embeds=embed(IDS)).logits)
        ids, mask = left_pad([IDS[0], tokens(1, 8)[0]])
        for inputs, extra in ((IDS, {}), (None, {"attention_mask": mask})):
            rows = ids if extra else IDS
            settings = {"inputs_embeds": embed(rows), "max_new_tokens": NEW, "do_sample": False, **extra}
            before = hits(model)
            assert_generate_matches(ref, model, inputs, warm_hits=False, **settings)
            assert hits(model) == before  # served without the prefix cache
    model.prefix_cache.check_integrity()


def test_inputs_embeds_in_another_dtype_promote_as_transformers():
    """bf16 embeddings into an fp32 model: transformers' modules promote as they go (its RMSNorm
    rounds to its input's dtype); so does Trellis."""
    ref, model = tiny_pair()
    embeds = ref.get_input_embeddings()(IDS).detach().bfloat16()
    with torch.no_grad():
        assert close(model(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits)
        settings = {"max_new_tokens": NEW, "do_sample": False}
        assert torch.equal(model.generate(inputs_embeds=embeds, **settings), ref.generate(inputs_embeds=embeds, **settings))


def test_a_cache_position_is_ignored_as_transformers_ignores_it():
    """transformers 5 has no cache_position; code written for 4.x passes one, which its Llama
    forward takes among its keyword arguments and never reads."""
    ref, model = tiny_pair()
    model.generate(IDS, max_new_tokens=2, do_sample=False)  # a cached prefix
    position = torch.arange(IDS.shape[1])
    with torch.no_grad():
        assert close(model(IDS, cache_position=position).logits, ref(IDS, cache_position=position).logits)


def test_generate_continue_from_inputs_embeds():
    """test_generate_continue_from_inputs_embeds: embeddings of the whole sequence with the returned cache."""
    ref, model = tiny_pair()
    embed = ref.get_input_embeddings()
    settings = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True}
    with torch.no_grad():
        want, got = ref.generate(inputs_embeds=embed(IDS), **settings), model.generate(inputs_embeds=embed(IDS), **settings)
        assert torch.equal(got.sequences, want.sequences)
        more = embed(torch.cat([IDS, want.sequences], 1))
        want = ref.generate(inputs_embeds=more, **{CACHE_ARG: want[CACHE_ARG]}, **settings)
        got = model.generate(inputs_embeds=more, **{CACHE_ARG: got[CACHE_ARG]}, **settings)
    assert torch.equal(got.sequences, want.sequences)


def test_grad_and_no_grad_forwards_agree():
    """torch.no_grad vs grad mode (test_training): same logits; grad mode records a graph, even over a warm prefix."""
    ref, model = tiny_pair()
    with torch.no_grad():
        model(IDS)  # warm
        cold = model(IDS).logits
    got = model(IDS)
    assert got.logits.grad_fn is not None and close(got.logits, cold) and close(got.logits, ref(IDS).logits)
    grads = []
    for m in (ref, model):  # gradients reach inputs_embeds alike
        embeds = ref.get_input_embeddings()(IDS).detach().requires_grad_()
        m(inputs_embeds=embeds).logits[0, -1].logsumexp(-1).backward()
        grads.append(embeds.grad)
    assert close(grads[1], grads[0], 1e-5)
    model.prefix_cache.check_integrity()


def test_bfloat16_greedy_matches_transformers_in_bfloat16():
    """The bf16 integration tests: greedy tokens equal transformers' in the same dtype."""
    ref, model = tiny_pair()
    ref.to(torch.bfloat16), model.to(torch.bfloat16)
    assert_generate_matches(ref, model, IDS, max_new_tokens=NEW, do_sample=False)
    assert model.prefix_cache.pool.kv.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", [None, "reference"])
def test_float64_matches(backend):
    """float64 models: the PyTorch reference attention serves them (by default too: the compiled
    kernels take fp32, fp16 and bf16), as transformers does."""
    ref, model = tiny_pair(backend=backend)
    ref.to(torch.float64), model.to(torch.float64)
    assert model.attention_backend() == "reference"
    with torch.no_grad():  # attention in fp64 as well (it ran in fp32: 6e-6 off on SmolLM2)
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, atol=1e-10, rtol=0)
    assert_generate_matches(ref, model, IDS, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_round_trip(tmp_path, tie):
    """test_save_load (and tied weights): what Trellis saves, Trellis and plain transformers load alike."""
    ref, model = tiny_pair(config=tiny_config(tie_word_embeddings=tie))
    model.generation_config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(tmp_path)
    again = TrellisLlama.from_pretrained(tmp_path, device="cpu", block_size=4)
    plain = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert again.config._attn_implementation == "trellis" and plain.config._attn_implementation == "sdpa"
    assert again.generation_config.max_new_tokens == 4
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert close(again(IDS).logits, ref(IDS).logits) and close(plain(IDS).logits, ref(IDS).logits)
    assert torch.equal(again.generate(IDS), plain.generate(IDS))  # both take the saved generation config


def test_resize_token_embeddings():
    """test_resize_tokens_embeddings: a larger vocabulary, new ids served, the same tokens as transformers."""
    ref, model = tiny_pair()
    model.generate(IDS, max_new_tokens=2)  # warm, with the old embeddings
    for m in (ref, model):
        torch.manual_seed(0)  # the new rows are drawn at random
        m.resize_token_embeddings(300)
    assert model.config.vocab_size == 300 and model.get_output_embeddings().weight.shape[0] == 300
    # The same draws; the LM head's covariance differs by rounding (Trellis stores it input-major).
    assert all(close(p, q, 1e-6) for p, q in zip(ref.parameters(), model.parameters()))
    ids = torch.cat([IDS, torch.tensor([[290, 299]])], 1)
    assert_generate_matches(ref, model, ids, max_new_tokens=NEW, do_sample=False)


def test_tied_word_embeddings():
    """test_tied_weights_keys: with tie_word_embeddings the LM head is the embedding, and generation matches."""
    ref, model = tiny_pair(config=tiny_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_generate_matches(ref, model, IDS, max_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("rope_type", ["linear", "yarn"])  # "dynamic" changes only past max_position_embeddings
def test_rope_scaling(rope_type):
    """test_model_rope_scaling_from_config: scaled RoPE gives transformers' tokens, cold and warm."""
    rope = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    ref, model = tiny_pair(config=tiny_config(rope_parameters=rope))
    assert_generate_matches(ref, model, tokens(3, 30), max_new_tokens=NEW, do_sample=False)


def test_gradient_checkpointing_training_step():
    """test_training_gradient_checkpointing: the same loss and gradients, then the trained weights generate alike."""
    ref, model = tiny_pair()
    model.generate(IDS, max_new_tokens=2)  # warm: a cached prefix must not cut the gradient
    for m in (ref, model):
        m.gradient_checkpointing_enable()
        m.train()
        m(IDS, labels=IDS).loss.backward()
    assert model.is_gradient_checkpointing
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        assert close(q.grad, p.grad, 1e-5), name
    for m in (ref, model):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        m.eval()
    assert_generate_matches(ref, model, IDS, max_new_tokens=NEW, do_sample=False)


# --- deliberate deviations --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["forward", "generate", "config"])
def test_output_attentions_is_refused(where):
    """Deviation from test_attention_outputs: the paged kernels never form attention weights; a clear ValueError."""
    ref, model = tiny_pair(config=tiny_config(output_attentions=where == "config"))
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        if where == "generate":
            model.generate(IDS, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
        else:
            model(IDS, **({"output_attentions": True} if where == "forward" else {}))
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()
    with torch.no_grad():  # transformers' sdpa model warns and returns no weights
        assert not ref(IDS, output_attentions=True).attentions


def test_padded_positions_give_zero_logits():
    """Deviation: padding is dropped before packing, so logits there are zero (transformers computes the pad token's)."""
    ref, model = tiny_pair()
    ids, mask = left_pad([IDS[0], tokens(1, 9)[0]], pad=7)  # 7 is not the embedding's padding_idx
    with torch.no_grad():
        got = model(ids, attention_mask=mask, output_hidden_states=True)
        want = ref(ids, attention_mask=mask, output_hidden_states=True)
    assert torch.count_nonzero(got.logits[1, :4]) == 0 and torch.count_nonzero(want.logits[1, :4]) > 0
    assert all(torch.count_nonzero(h[1, :4]) == 0 for h in got.hidden_states)
    assert close(got.logits[mask.bool()], want.logits[mask.bool()])


def test_returned_cache_is_a_paged_handle():
    """Deviation from test_past_key_values_format: a Cache whose length is transformers', without per-layer tensors."""
    ref, model = tiny_pair()
    settings = {"max_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True}
    got, want = model.generate(IDS, **settings)[CACHE_ARG], ref.generate(IDS, **settings)[CACHE_ARG]
    assert isinstance(got, PagedKVCache) and isinstance(want, DynamicCache)
    assert got.get_seq_length() == want.get_seq_length() == 15
    assert len(want.layers) == model.config.num_hidden_layers and len(got.layers) == 0  # K/V live in the block pool


@pytest.mark.parametrize("cache", ["dynamic_cache", "static", "dynamic"])
def test_transformers_caches_are_refused(cache):
    """Deviation from test_generate_with_static_cache & co.: K/V live in the paged pool, so other caches are refused."""
    ref, model = tiny_pair()
    if cache == "dynamic_cache":
        assert ref.generate(IDS, max_new_tokens=2, **{CACHE_ARG: DynamicCache()}).shape[1] == 15
        with pytest.raises(TypeError, match="must be a PagedKVCache"):
            model.generate(IDS, max_new_tokens=2, **{CACHE_ARG: DynamicCache()})
    else:
        assert ref.generate(IDS, max_new_tokens=2, cache_implementation=cache).shape[1] == 15
        with pytest.raises(ValueError, match="paged prefix cache"):
            model.generate(IDS, max_new_tokens=2, cache_implementation=cache)
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_custom_4d_attention_mask_is_refused():
    """Deviation from test_custom_4d_attention_mask: the paged attention is causal within each row; 2D masks only."""
    ref, model = tiny_pair()
    mask = torch.tril(torch.ones(1, 1, 13, 13))
    with torch.no_grad():
        assert ref(IDS, attention_mask=mask).logits.shape == (1, 13, 256)
        with pytest.raises(ValueError, match="4D attention masks are not supported"):
            model(IDS, attention_mask=mask)


def test_positions_beyond_max_position_embeddings_are_refused():
    """Deviation: transformers extrapolates RoPE past max_position_embeddings; Trellis refuses up front."""
    ref, model = tiny_pair(config=tiny_config(max_position_embeddings=16))
    assert ref.generate(IDS, max_new_tokens=NEW, do_sample=False).shape[1] == 18
    with pytest.raises(ValueError, match="exceeds the model's 16 positions"):
        model.generate(IDS, max_new_tokens=NEW, do_sample=False)
    assert model.prefix_cache.stats()["live_sessions"] == 0
    # The last new token is never fed back: a generation whose other tokens fill the positions is served
    ids = IDS[:, :12]
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                       ref.generate(ids, max_new_tokens=5, do_sample=False))
    assert torch.equal(model.generate(ids, max_length=17, do_sample=False), ref.generate(ids, max_length=17, do_sample=False))


def test_every_generation_length_is_checked_against_the_positions_before_anything_runs():
    """max_length, the model's own generation_config and an inputs_embeds prompt are refused up
    front, as max_new_tokens is: nothing is generated (or streamed) first."""
    _, model = tiny_pair(config=tiny_config(max_position_embeddings=16))
    generated = []

    class Counter:
        def put(self, value):
            generated.append(value)

        def end(self):
            pass

    embeds = model.model.embed_tokens(IDS).detach()
    calls = [lambda: model.generate(IDS, max_length=18, min_length=18, streamer=Counter()),
             lambda: model.generate(inputs_embeds=embeds, max_new_tokens=NEW, streamer=Counter()),
             lambda: model.generate(inputs_embeds=embeds, max_length=18, min_length=18, streamer=Counter())]
    for call in calls:
        with pytest.raises(ValueError, match="exceeds the model's 16 positions"):
            call()
    model.generation_config.max_new_tokens = NEW
    with pytest.raises(ValueError, match="exceeds the model's 16 positions"):
        model.generate(IDS, streamer=Counter())
    assert generated == [] and model.prefix_cache.stats()["live_sessions"] == 0


def test_max_length_counts_an_inputs_embeds_prompt_as_transformers_does():
    ref, model = tiny_pair(config=tiny_config(max_position_embeddings=16))
    embeds = model.model.embed_tokens(IDS[:, :12]).detach()
    want = ref.generate(inputs_embeds=embeds, max_length=17, min_length=17, do_sample=False)
    assert want.shape[1] == 5  # new tokens only: the 12 embeddings count towards max_length
    assert torch.equal(model.generate(inputs_embeds=embeds, max_length=17, min_length=17, do_sample=False), want)


def test_the_models_own_generation_config_decides_use_cache_and_cache_implementation():
    ref, model = tiny_pair()
    model.generation_config.use_cache = ref.generation_config.use_cache = False
    assert torch.equal(model.generate(IDS, max_new_tokens=NEW, do_sample=False),
                       ref.generate(IDS, max_new_tokens=NEW, do_sample=False))
    model.generation_config.use_cache = None
    model.generation_config.cache_implementation = "static"
    with pytest.raises(ValueError, match="not in a 'static' cache"):
        model.generate(IDS, max_new_tokens=NEW)


def test_right_padding_in_generate_and_labels_after_padding_are_refused():
    """generate() continues each row from its last column, and the loss predicts each label from
    the column before it: where that column is padding, transformers' logits are no prediction and
    Trellis' are zeros, so both are refused rather than answered differently."""
    ref, model = tiny_pair()
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(5))
    right = torch.ones(2, 10, dtype=torch.long)
    right[0, -3:] = 0
    with pytest.raises(ValueError, match="last column, which the attention_mask marks as padding"):
        model.generate(ids, attention_mask=right, max_new_tokens=2)
    left = right.flip(1)
    labels = ids.masked_fill(left == 0, -100)
    with pytest.raises(ValueError, match="row 0's label at column 3 would be predicted from padding"):
        model(ids, attention_mask=left, labels=labels)
    labels[0, 3] = -100
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=left, labels=labels).loss,
                                   ref(ids, attention_mask=left, labels=labels).loss)
        # the loss's own ignore_index marks ignored labels as -100 does
        ignored = labels.masked_fill(labels == -100, 0)
        torch.testing.assert_close(model(ids, attention_mask=left, labels=ignored, ignore_index=0).loss,
                                   ref(ids, attention_mask=left, labels=labels).loss)
    # shift_labels replaces labels[:, 1:] in the loss: its targets at padding columns are refused too
    shift = torch.full_like(ids, -100)
    shift[:, :-1] = ids[:, 1:]
    with pytest.raises(ValueError, match="shift_labels: row 0's label at column 0 would be predicted from padding"):
        model(ids, attention_mask=left, labels=labels, shift_labels=shift)
    shift[left == 0] = -100
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=left, labels=labels, shift_labels=shift).loss,
                                   ref(ids, attention_mask=left, labels=labels, shift_labels=shift).loss)
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_padding_at_the_end_of_a_continuation_or_of_a_prompt_is_refused_with_nothing_changed():
    """Where generate() would continue a row from a padding column, transformers computes that
    column from the pad token and Trellis computes no padding: refused, with the cache and the
    handle as they were, whether the mask pads a continuation on the right or transformers infers
    it from a last token equal to pad_token_id (pad != eos: attention_mask = input_ids != pad). So
    is assisted decoding continuing a handle over input with padding, whose first forward
    transformers runs over the whole input again, the mask no longer lining up with the cache. A
    mask that marks the pad id as a real token gets transformers' answer."""
    ref, model = tiny_pair()  # pad_token_id 0, eos_token_id 1
    settings = {"max_new_tokens": 2, "do_sample": False, "return_dict_in_generate": True, "output_scores": True}
    want, got = ref.generate(IDS, **settings), model.generate(IDS, **settings)
    handle = got[CACHE_ARG]
    ends_in_pad = torch.cat([got.sequences, torch.tensor([[7, 0]])], 1)
    right = torch.ones_like(ends_in_pad)
    right[0, -1] = 0

    def state():
        return model.prefix_cache.stats(), handle.get_seq_length(), list(handle.seqs[0].token_ids)

    before = state()
    for refused, extra in [("the attention_mask marks as padding", {"attention_mask": right, CACHE_ARG: handle}),
                           ("holds the pad token 0", {CACHE_ARG: handle}), ("holds the pad token 0", {})]:
        with pytest.raises(ValueError, match=f"last column, which {refused}"):
            model.generate(ends_in_pad, **settings, **extra)
        assert state() == before
    holes = torch.cat([got.sequences, torch.tensor([[7, 0, 9]])], 1)
    with pytest.raises(ValueError, match="cannot continue a past_key_values over input with padding"):
        model.generate(holes, prompt_lookup_num_tokens=3, **settings, **{CACHE_ARG: handle})
    assert state() == before
    real = torch.ones_like(ends_in_pad)
    assert_outputs_match(model.generate(ends_in_pad, attention_mask=real, **settings, **{CACHE_ARG: handle}),
                         ref.generate(ends_in_pad, attention_mask=real, **settings, **{CACHE_ARG: want[CACHE_ARG]}))
    model.prefix_cache.check_integrity()


def test_a_trellis_assistant_refuses_an_input_ending_in_the_pad_token():
    """transformers hands the assistant the whole sequence each round and infers its mask from
    the pad id: once the main model's last accepted token is the pad id, the assistant would draft
    from a padding column (transformers' assistant drafts from the pad token at position 0). A
    TrellisLlama assistant refuses by name, and the main model's cache is left as it was."""
    ref, model = tiny_pair()
    assistant = tiny_pair(seed=1)[1]
    first = int(ref.generate(IDS, max_new_tokens=1, do_sample=False)[0, -1])  # the main model's first token
    assert first not in IDS[0] and first != int(assistant.generate(IDS, max_new_tokens=1, do_sample=False)[0, -1])
    stats = model.prefix_cache.stats()
    with pytest.raises(ValueError, match=f"holds the pad token {first}") as refused:  # its draft rejected, the pad id accepted
        model.generate(IDS, assistant_model=assistant, max_new_tokens=4, do_sample=False, pad_token_id=first)
    assert refused.value.__notes__ == ["(raised by assistant_model while it drafted candidate tokens)"]
    # (the error's traceback holds the drafter's cache handle for the assistant: its session ended all the same)
    assert model.prefix_cache.stats()["cached_blocks"] >= stats["cached_blocks"]
    assert model.prefix_cache.stats()["live_sessions"] == assistant.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


# --- cache copies, hidden-state gradients, output flags, checkpointing ---------------------------------


def test_deepcopy_of_a_prefilled_cache_continues_each_prompt():
    """transformers' cache docs ("re-use a prompt cache"): prefill once, deepcopy per continuation."""
    ref, model = tiny_pair()
    with torch.no_grad():
        caches = [ref(IDS, **{CACHE_ARG: DynamicCache()})[CACHE_ARG], model(IDS)[CACHE_ARG]]
    for suffix in (tokens(1, 3), tokens(2, 5)):
        ids = torch.cat([IDS, suffix], 1)
        want, got = (m.generate(ids, max_new_tokens=3, do_sample=False, **{CACHE_ARG: copy.deepcopy(c)})
                     for m, c in zip((ref, model), caches))
        assert torch.equal(got, want)


def test_hidden_states_are_on_the_autograd_graph():
    """test_retain_grad_hidden_states_attentions: gradients of the logits reach the returned hidden states."""
    ref, model = tiny_pair()
    grads = []
    for m in (ref, model):
        m.train()
        out = m(IDS, output_hidden_states=True)
        grads.append(torch.autograd.grad(out.logits[0, -1].logsumexp(-1), out.hidden_states[1])[0])
    assert close(grads[1], grads[0], 1e-5)


def test_output_attentions_argument_overrides_the_config():
    """PreTrainedModel forwards: an explicit output_attentions=False wins over config.output_attentions."""
    ref, model = tiny_pair(config=tiny_config(output_attentions=True))
    with torch.no_grad():
        assert close(model(IDS, output_attentions=False).logits, ref(IDS, output_attentions=False).logits)


def test_gradient_checkpointing_training_returns_no_cache():
    """LlamaModel.forward: use_cache is switched off under gradient checkpointing in training."""
    ref, model = tiny_pair()
    for m in (ref, model):
        m.gradient_checkpointing_enable()
        m.train()
    assert getattr(ref(IDS, labels=IDS), CACHE_ARG) is None
    assert getattr(model(IDS, labels=IDS), CACHE_ARG) is None
