"""``generate_batch`` applies the logits processors ``generate()`` applies, per prompt, or refuses the setting."""

import warnings

import pytest
import torch
from transformers import ContinuousBatchingConfig, SynthIDTextWatermarkingConfig, WatermarkingConfig
from transformers.generation import logits_process as lp

from tests.models import tiny_pair
from tests.test_engine import PROMPTS, SYSTEM, reference, tokens

# Shared-prefix prompts of different lengths (cache hits), one unrelated and a single token (forced_bos_token_id).
BATCH = PROMPTS + [tokens(90, 6), [7]]
MAX_NEW = 16


@pytest.fixture(scope="module")
def pair():
    ref, model = tiny_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        greedy = [reference(ref, p, MAX_NEW) for p in BATCH]
    return ref, model, greedy


# Each case's settings, from the plain greedy answers g, chosen so that the setting changes some answer.
GREEDY_CASES = {
    "suppress_tokens": lambda g: {"suppress_tokens": [g[0][0], g[1][0], g[2][1]]},
    "bad_words_ids": lambda g: {"bad_words_ids": [[g[0][1]], g[1][2:4]]},
    "sequence_bias": lambda g: {"sequence_bias": {(g[0][0],): -20.0, tuple(g[1][1:3]): -20.0}},
    "begin_suppress_tokens": lambda g: {"begin_suppress_tokens": [a[0] for a in g]},
    "forced_eos_token_id": lambda g: {"forced_eos_token_id": 5},
    "repetition_penalty": lambda g: {"repetition_penalty": 3.0},
    "no_repeat_ngram_size": lambda g: {"no_repeat_ngram_size": 2},
    "min_new_tokens": lambda g: {"eos_token_id": g[0][2], "min_new_tokens": 6},
    "min_length": lambda g: {"eos_token_id": g[0][2], "min_length": len(BATCH[0]) + 5},  # counts the prompt
    "exponential_decay_length_penalty": lambda g: {"eos_token_id": g[0][6], "exponential_decay_length_penalty": (2, 3.0)},
    "forced_bos_token_id": lambda g: {"forced_bos_token_id": 9},
    "encoder_repetition_penalty": lambda g: {"encoder_repetition_penalty": 0.2},
    "encoder_no_repeat_ngram_size": lambda g: {"encoder_no_repeat_ngram_size": 1},
    # Normalizing changes no argmax: checked here composed with a processor that does.
    "renormalize_logits": lambda g: {"renormalize_logits": True, "repetition_penalty": 2.0},
    "watermarking_config": lambda g: {"watermarking_config": WatermarkingConfig(bias=50.0)},
    "synthid_watermarking_config": lambda g: {"watermarking_config": SynthIDTextWatermarkingConfig(keys=[1, 2, 3, 4],
                                                                                                   ngram_len=3)},
}


@pytest.mark.parametrize("case", GREEDY_CASES)
def test_greedy_processors_give_generates_tokens_per_prompt(pair, case):
    ref, model, greedy = pair
    settings = GREEDY_CASES[case](greedy)
    model.generate_batch([SYSTEM], max_new_tokens=1)  # cached, so the shared-prefix prompts start from a hit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [reference(ref, p, MAX_NEW, **settings) for p in BATCH]
        out = model.generate_batch(BATCH, max_new_tokens=MAX_NEW, do_sample=False, **settings)
    assert want != greedy  # the setting matters here, so ignoring it fails
    assert [r.generated_tokens for r in out.values()] == want
    assert all(r.num_cached_tokens >= len(SYSTEM) // 4 * 4 for r in list(out.values())[:len(PROMPTS)])
    model.prefix_cache.check_integrity()


@pytest.mark.parametrize("settings", [{}, {"max_length": 45}])
def test_lengths_resolve_as_in_generate(pair, settings):
    """No max_new_tokens: 20 new tokens by default, as generate() gives; a max_length that is set counts the prompt."""
    ref, model, _ = pair
    prompts = [p for p in BATCH if len(p) < 45]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [ref.generate(torch.tensor([p]), do_sample=False, **settings)[0, len(p) :].tolist() for p in prompts]
    assert [r.generated_tokens for r in model.generate_batch(prompts, do_sample=False, **settings).values()] == want


# Sampled settings and the distribution generate() draws from, written out with transformers' own classes.
# top_k=0 turns off transformers' default top_k=50, so each case tests its own setting.
SAMPLED_CASES = {
    "temperature_top_k_top_p": ({"temperature": 1.7, "top_k": 50, "top_p": 0.9},
                                lambda: [lp.TemperatureLogitsWarper(1.7), lp.TopKLogitsWarper(50), lp.TopPLogitsWarper(0.9)]),
    "min_p": ({"temperature": 2.5, "top_k": 0, "min_p": 0.05},
              lambda: [lp.TemperatureLogitsWarper(2.5), lp.MinPLogitsWarper(0.05)]),
    "typical_p": ({"temperature": 2.5, "top_k": 0, "typical_p": 0.6},
                  lambda: [lp.TemperatureLogitsWarper(2.5), lp.TypicalLogitsWarper(0.6)]),
    "epsilon_cutoff": ({"temperature": 2.5, "top_k": 0, "epsilon_cutoff": 0.01},
                       lambda: [lp.TemperatureLogitsWarper(2.5), lp.EpsilonLogitsWarper(0.01)]),
    "eta_cutoff": ({"temperature": 2.5, "top_k": 0, "eta_cutoff": 0.01},
                   lambda: [lp.TemperatureLogitsWarper(2.5), lp.EtaLogitsWarper(0.01)]),
    "top_h": ({"temperature": 2.5, "top_k": 0, "top_h": 0.5},
              lambda: [lp.TemperatureLogitsWarper(2.5), lp.TopHLogitsWarper(0.5)]),
    "repetition_penalty": ({"temperature": 2.0, "top_k": 0, "repetition_penalty": 1.5},
                           lambda: [lp.RepetitionPenaltyLogitsProcessor(1.5), lp.TemperatureLogitsWarper(2.0)]),
    "renormalize_logits": ({"temperature": 2.5, "top_k": 0, "min_p": 0.05, "renormalize_logits": True},
                           lambda: [lp.TemperatureLogitsWarper(2.5), lp.MinPLogitsWarper(0.05), lp.LogitNormalization()]),
}


@pytest.mark.parametrize("case", SAMPLED_CASES)
def test_sampled_processors_draw_from_generates_distribution(pair, case):
    """Every sampled token lies in the support of generate()'s distribution at its step, and its reported
    log-probability is that distribution's (the reference model's logits, on the engine's own tokens)."""
    ref, model, _ = pair
    settings, oracle = SAMPLED_CASES[case]
    out = model.generate_batch(BATCH, max_new_tokens=12, do_sample=True, **settings,
                               continuous_batching_config=ContinuousBatchingConfig(seed=5, return_logprobs=True))
    for prompt, result in zip(BATCH, out.values()):
        ids = torch.tensor([prompt + result.generated_tokens])  # [1, L + n]
        with torch.no_grad():
            logits = ref(ids).logits[0, len(prompt) - 1 : -1].float()  # [n, V], the logits each token was drawn from
        warpers = lp.LogitsProcessorList(oracle())
        for step, (token, logprob) in enumerate(zip(result.generated_tokens, result.logprobs)):
            probs = warpers(ids[:, : len(prompt) + step], logits[step : step + 1].clone()).softmax(-1)[0]  # [V]
            assert probs[token] > 0
            assert logprob == pytest.approx(probs[token].log().item(), abs=1e-4)
    model.prefix_cache.check_integrity()


@pytest.mark.parametrize("case", ["min_p", "epsilon_cutoff", "repetition_penalty"])
def test_sampled_request_i_equals_generate_seeded_with_seed_plus_i(pair, case):
    """Exact tokens: both draw one multinomial per step from the same probabilities, with a CPU
    generator seeded alike (the engine's own, generate()'s global one)."""
    ref, model, _ = pair
    settings, _ = SAMPLED_CASES[case]
    out = model.generate_batch(BATCH, max_new_tokens=12, do_sample=True, **settings,
                               continuous_batching_config=ContinuousBatchingConfig(seed=11))
    for i, (prompt, result) in enumerate(zip(BATCH, out.values())):
        torch.manual_seed(11 + i)
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=True, **settings)
        assert result.generated_tokens == want[0, len(prompt) :].tolist()


def test_top_p_zero_keeps_the_most_likely_token_and_text_is_refused_by_name(pair):
    """transformers' top-p warper takes top_p=0 and keeps one token: sampling then decodes greedily."""
    ref, model, _ = pair
    out = model.generate_batch(BATCH, max_new_tokens=6, do_sample=True, top_p=0.0)
    for prompt, result in zip(BATCH, out.values()):
        assert result.generated_tokens == ref.generate(torch.tensor([prompt]), max_new_tokens=6,
                                                       do_sample=False)[0, len(prompt):].tolist()
    with pytest.raises(TypeError, match="prompt must be token ids, not a string"):
        model.generate_batch(["hello world"], max_new_tokens=3)


def test_warper_settings_are_read_as_generate_reads_them(pair):
    """Greedy search ignores the warpers' settings, whatever they are, and a top_p of 1 or more
    cuts nothing: generate() takes both, and so does generate_batch, with generate()'s tokens."""
    ref, model, greedy = pair
    out = model.generate_batch(BATCH, max_new_tokens=MAX_NEW, do_sample=False, temperature=-1.0, top_p=1.5)
    assert [r.generated_tokens for r in out.values()] == greedy
    out = model.generate_batch(BATCH, max_new_tokens=6, do_sample=True, top_p=1.0000001, top_k=0,
                               continuous_batching_config=ContinuousBatchingConfig(seed=3))
    for i, (prompt, result) in enumerate(zip(BATCH, out.values())):
        torch.manual_seed(3 + i)
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=True, top_p=1.0000001, top_k=0)
        assert result.generated_tokens == want[0, len(prompt):].tolist()


@pytest.mark.parametrize("settings, named", [
    ({"num_beams": 2}, "num_beams=2"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha"),
    ({"prompt_lookup_num_tokens": 3}, "prompt_lookup_num_tokens"),
    ({"num_return_sequences": 2, "do_sample": True}, "num_return_sequences"),
    ({"guidance_scale": 1.5}, "guidance_scale"),
    ({"max_time": 10.0}, "max_time"),
    ({"stop_strings": ["stop"]}, "stop_strings"),
    ({"token_healing": True}, "token_healing"),
    ({"logits_processor": lp.LogitsProcessorList([lp.MinPLogitsWarper(0.1)])}, "logits_processor"),
])
def test_unsupported_settings_are_refused_and_nothing_changes(pair, settings, named):
    _, model, _ = pair
    model.generate_batch(BATCH[:1], max_new_tokens=2)
    before = model.prefix_cache.stats()
    with pytest.raises(ValueError, match=named):
        model.generate_batch(BATCH[:2], max_new_tokens=4, **settings)
    assert model.prefix_cache.stats() == before
    model.prefix_cache.check_integrity()


def test_a_processor_not_on_the_allow_list_is_refused(pair, monkeypatch):
    """A processor some setting adds that nobody checked per session (a later transformers' new one) is refused."""
    _, model, _ = pair

    class NewProcessor(lp.LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return scores

    build = model._get_logits_processor
    monkeypatch.setattr(model, "_get_logits_processor",
                        lambda *args, **kwargs: lp.LogitsProcessorList([*build(*args, **kwargs), NewProcessor()]))
    with pytest.raises(ValueError, match="NewProcessor"):
        model.generate_batch(BATCH[:1], max_new_tokens=4)
