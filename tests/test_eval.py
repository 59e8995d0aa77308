"""trellis.eval against plain transformers: the token-level scorer on tiny random Llamas, the
string-level API and the lm-eval adapter on the embedded SmolLM2."""

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import installed
from tests.models import smollm2_dir, smollm2_reference, smollm2_tokenizer, smollm2_trellis, tiny_pair
from trellis.cache.block_pool import OutOfBlocksError
from trellis.eval import (
    generate_until,
    loglikelihood,
    loglikelihood_rolling,
    rolling_loglikelihood,
    score_continuations,
    scoring,
)
from trellis.eval.requests import encode, encode_pair, rolling_windows
from trellis.models.loading import resolve_device
from trellis.runner.quantized_linear import QuantizedLinear

ATOL = 1e-4


def plain_scores(ref, requests, max_length=None):
    """Per-request scoring with plain transformers, truncated on the left as lm-eval does."""
    max_length = max_length or ref.config.max_position_embeddings
    scores = []
    for context, continuation in requests:
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        with torch.no_grad():
            logits = ref(torch.tensor([whole[:-1]])).logits[0, -len(continuation):]  # [C, V]
        target = torch.tensor(continuation)
        logprobs = torch.log_softmax(logits, -1).gather(1, target[:, None])  # [C, 1]
        scores.append((logprobs.sum().item(), bool((logits.argmax(-1) == target).all())))
    return scores


def assert_scores_match(got, want):
    assert len(got) == len(want)
    for (logprob, greedy), (want_logprob, want_greedy) in zip(got, want):
        assert abs(logprob - want_logprob) <= ATOL, (logprob, want_logprob)
        assert greedy == want_greedy


def tokens(rng, n):
    return [rng.randrange(3, 256) for _ in range(n)]


def multiple_choice(ref, seed=0):
    """Documents sharing a preamble, 4 answers each (1 to 5 tokens), and a greedy answer."""
    rng = random.Random(seed)
    preamble = tokens(rng, 37)
    requests = []
    for _ in range(4):
        context = preamble + tokens(rng, rng.randrange(1, 12))
        requests += [(context, tokens(rng, rng.randrange(1, 6))) for _ in range(4)]
    with torch.no_grad():
        greedy = ref.generate(torch.tensor([preamble]), max_new_tokens=4, do_sample=False)[0, len(preamble):]
    return requests + [(preamble, greedy.tolist()), ([5], [7])]


# --- the token-level scorer on tiny random Llamas --------------------------------------------


@pytest.mark.parametrize("max_batch_tokens", [8, 2048])
def test_scores_match_plain_transformers_cold_and_warm(max_batch_tokens):
    ref, model = tiny_pair()
    requests = multiple_choice(ref)
    want = plain_scores(ref, requests)
    assert want[-2][1]  # the greedy answer is recognised as such
    for scored in (model, model, model.runner):  # the second pass finds every context cached; a runner scores too
        assert_scores_match(score_continuations(scored, requests, max_batch_tokens=max_batch_tokens), want)
        model.prefix_cache.check_integrity()
    stats = model.prefix_cache.stats()
    assert stats["live_sessions"] == 0 and stats["hit_tokens"] > 0


def test_threads_scoring_at_once_get_the_sequential_scores():
    ref, model = tiny_pair()
    batches = [multiple_choice(ref, seed) for seed in range(4)]
    want = [plain_scores(ref, requests) for requests in batches]
    got: dict[int, list] = {}

    def worker(i: int) -> None:
        got[i] = score_continuations(model, batches[i], max_batch_tokens=16)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert_scores_match(got[i], want[i])
    model.prefix_cache.check_integrity()
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_weights_changed_between_chunks_score_the_later_chunks_on_the_new_weights(monkeypatch):
    """Between two chunks another thread may change the weights, which rebuilds the cache: the later
    chunks run on the cache as it is then (they ran on the old one: scores 0.5 off the new weights')."""
    ref, model = tiny_pair()
    requests = multiple_choice(ref, seed=2)
    before = plain_scores(ref, requests)
    score_chunk, first_chunk = scoring._score_chunk, []

    def edit_after_the_first(runner, manager, chunk, *args) -> None:
        score_chunk(runner, manager, chunk, *args)
        if not first_chunk:
            first_chunk.extend(i for group in chunk for i in group.members)
            with torch.no_grad():
                for m in (ref, model):
                    m.model.layers[0].mlp.down_proj.weight.mul_(2.0)

    monkeypatch.setattr(scoring, "_score_chunk", edit_after_the_first)
    got = score_continuations(model, requests, max_batch_tokens=12)
    after = plain_scores(ref, requests)
    later = [i for i in range(len(requests)) if i not in first_chunk]
    assert first_chunk and later
    assert_scores_match([got[i] for i in first_chunk], [before[i] for i in first_chunk])
    assert_scores_match([got[i] for i in later], [after[i] for i in later])


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_long_requests_lose_context_on_the_left(block_size):
    ref, model = tiny_pair(block_size=block_size)
    requests = multiple_choice(ref, seed=1)
    assert_scores_match(score_continuations(model, requests, max_length=20), plain_scores(ref, requests, 20))
    model.prefix_cache.check_integrity()


def test_shared_preamble_is_computed_once():
    ref, model = tiny_pair()
    rng = random.Random(2)
    preamble = tokens(rng, 64)  # 16 blocks of 4
    documents = [preamble + tokens(rng, 6) for _ in range(5)]
    requests = [(document, tokens(rng, 3)) for document in documents for _ in range(4)]
    computed = []
    forward = model.runner.forward
    model.runner.forward = lambda manager, seqs: computed.append(sum(s.num_new for s in seqs)) or forward(manager, seqs)
    assert_scores_match(score_continuations(model, requests), plain_scores(ref, requests))
    # The preamble once, then each document's own 6 tokens and each answer's 2 tokens past its context.
    assert sum(computed) == 64 + 5 * 6 + 20 * 2
    stats = model.prefix_cache.stats()
    assert stats["hit_tokens"] == 4 * 64
    model.prefix_cache.check_integrity()


def test_rejects_empty_parts_and_overlong_continuations():
    _, model = tiny_pair()
    with pytest.raises(ValueError, match="request 0: the continuation has no tokens"):
        score_continuations(model, [([3, 4], [])])
    with pytest.raises(ValueError, match="request 0: the context has no tokens"):
        score_continuations(model, [([], [3])])
    with pytest.raises(ValueError, match="exceeds max_length"):
        score_continuations(model, [([3], [4] * 9)], max_length=8)
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_token_ids_become_plain_ints_and_bad_ones_are_refused():
    """Tensor elements score as the ints they hold (and key the cache as ints, so the same
    context hits it again); floats, strings and ids outside the vocabulary are refused."""
    _, model = tiny_pair()
    context, continuation = list(range(3, 23)), [8, 9]
    want = score_continuations(model, [(context, continuation)])
    model.prefix_cache.reset()
    as_tensors = [(torch.tensor(context), [torch.tensor(t) for t in continuation])]
    assert score_continuations(model, as_tensors) == want
    hits = model.prefix_cache.stats()["hit_tokens"]
    # (the 2-token suffix after the hit streams its matmuls: fp32 reassociation only)
    assert score_continuations(model, as_tensors) == [(pytest.approx(want[0][0], abs=1e-5), want[0][1])]
    assert model.prefix_cache.stats()["hit_tokens"] == hits + 19  # all of the context but its last token
    for bad, error, message in [([5.5] * 20, TypeError, "request 0: context: token ids must be integers, got 5.5"),
                                ("some text", TypeError, "not a string"),
                                ([3, 256], ValueError, "request 0: token id 256 is outside the vocabulary")]:
        with pytest.raises(error, match=message):
            score_continuations(model, [(bad, [8])])
    for bad in (None, [context], (context, continuation, [1])):  # not a pair
        with pytest.raises(TypeError, match=r"request 1 must be a \(context, continuation\) pair, got"):
            score_continuations(model, [(context, continuation), bad])
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="max_length must be a positive integer"):
            score_continuations(model, [(context, continuation)], max_length=bad)
    for bad in (0, -5, 1.5, None, "10", True):
        with pytest.raises(ValueError, match=f"max_batch_tokens must be a positive integer, got {bad!r}"):
            score_continuations(model, [(context, continuation)], max_batch_tokens=bad)
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


def test_a_full_pool_raises_and_leaves_the_cache_intact():
    ref, model = tiny_pair(num_blocks=12)
    small = [([3, 4, 5, 6, 7], [8, 9])]
    assert_scores_match(score_continuations(model, small), plain_scores(ref, small))
    before = model.prefix_cache.stats()
    computed = []
    forward = model.runner.forward
    model.runner.forward = lambda manager, seqs: computed.append(seqs) or forward(manager, seqs)
    # Refused before anything runs: 57 + 2 tokens, all but the last in the model, fill 15 blocks of 4.
    with pytest.raises(OutOfBlocksError, match="request 1: 58 tokens need 15 blocks of 4, the KV pool has 12"):
        score_continuations(model, [small[0], (list(range(3, 60)), [8, 9])])
    assert not computed
    model.runner.forward = forward
    after = model.prefix_cache.stats()
    assert after["live_sessions"] == 0 and after["cached_blocks"] <= before["cached_blocks"]
    model.prefix_cache.check_integrity()
    assert_scores_match(score_continuations(model, small), plain_scores(ref, small))


@pytest.mark.parametrize("shape", ["forks", "contexts", "both", "exact"])
def test_a_small_pool_scores_every_request_that_fits_it_alone(shape):
    """Forwards are planned against the blocks the pool can give (contexts, then forks a few at a
    time); a context whose fork does not fit beside it scores each request in one sequence."""
    rng = random.Random(3)
    num_blocks = 16  # 64 tokens
    if shape == "forks":  # one context, more continuations than the pool holds forks of at once
        context = tokens(rng, 12)
        requests = [(context, tokens(rng, 8)) for _ in range(10)]
    elif shape == "contexts":  # more contexts than the pool holds at once
        requests = [(tokens(rng, 20), tokens(rng, 3)) for _ in range(6)]
    elif shape == "both":
        requests = [(context, tokens(rng, 3)) for context in [tokens(rng, 20) for _ in range(4)] for _ in range(3)]
    else:  # 13 + 3 - 1 tokens fill the 4 blocks; the context (4 blocks) and a fork (1 more) do not fit
        num_blocks = 4
        context = tokens(rng, 13)
        requests = [(context, tokens(rng, 3)) for _ in range(3)]
    ref, model = tiny_pair(num_blocks=num_blocks)
    want = plain_scores(ref, requests)
    for _ in range(2):  # cold, then with what the first pass left cached
        assert_scores_match(score_continuations(model, requests), want)
        assert model.prefix_cache.stats()["live_sessions"] == 0
        model.prefix_cache.check_integrity()


def test_a_small_pool_scores_rolling_windows_one_forward_each():
    ref, model = tiny_pair(num_blocks=9)  # 36 tokens: one 32-token window at a time
    text = tokens(random.Random(4), 100)
    want = sum(lp for lp, _ in plain_scores(ref, rolling_windows(text, 1, 32)))
    (got,) = rolling_loglikelihood(model, [text], 1, max_length=32)
    assert abs(got - want) <= ATOL
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


def test_rolling_windows_score_every_token_once():
    for n in (0, 1, 5, 16, 17, 40):
        for max_length in (1, 4, 16):
            seq = list(range(100, 100 + n))
            start = 0
            for i, (context, cont) in enumerate(rolling_windows(seq, 1, max_length)):
                assert cont == seq[start:start + len(cont)]
                assert context == ([1] if i == 0 else seq[start - len(context):start])
                # The model sees context + cont but the last: max_length tokens once past the first window.
                assert len(context) + len(cont) - 1 == (max_length if i else len(cont))
                start += len(cont)
            assert start == n


def test_rolling_windows_are_lm_evals():
    utils = installed("lm_eval.utils")
    for n in (0, 1, 63, 64, 65, 200):
        for max_length in (1, 7, 64):
            seq = list(range(100, 100 + n))
            want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(seq, 1, max_length, 1)]
            assert rolling_windows(seq, 1, max_length) == [(list(c), list(x)) for c, x in want]


# --- the string-level API on the embedded SmolLM2 ----------------------------------------------

PASSAGE = ("The lighthouse on Gull Point was built in 1871 from granite quarried on the island itself. "
           "Its lamp burned whale oil until 1890, then kerosene, and since 1931 it has run on electricity. "
           "The last keeper, Ada Moreau, left in 1957, when the light was automated.\n")
QUESTION = "Question: What fuel did the lamp burn before kerosene?\nAnswer:"
ANSWERS = [" whale oil", " coal", " electricity", " natural gas"]


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_trellis(num_blocks=128), smollm2_tokenizer(), smollm2_reference()


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    tok = smollm2_tokenizer()
    context, continuation = encode_pair(tok, "Answer: ", "Paris")
    assert (context, continuation) == encode_pair(tok, "Answer:", " Paris")
    assert context + continuation == tok.encode("Answer: Paris")
    assert encode_pair(tok, "", "Paris") == ([tok.bos_token_id], tok.encode("Paris"))
    assert encode_pair(tok, "Answer: ", "") == encode_pair(tok, "Answer:", " ")  # lm-eval scores the space


def bos_adding_tokenizer():
    """SmolLM2's tokenizer made to put BOS (<|im_start|>) in front of every text, as Llama's does."""
    from tokenizers.processors import TemplateProcessing

    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B",
                                                       special_tokens=[(tok.bos_token, bos)])
    return tok


def test_text_that_starts_with_bos_gets_no_second_one(smollm2):
    """As lm-eval's HFLM.tok_encode: no special tokens for a text that starts with BOS's text."""
    model, plain, _ = smollm2
    tok = bos_adding_tokenizer()
    bos = tok.bos_token_id
    chat = f"{tok.bos_token}user\nWhat is the capital of France?{tok.eos_token}\n{tok.bos_token}assistant\n"
    assert tok.encode("Hi") == [bos, *plain.encode("Hi")]  # other texts still get BOS
    assert encode(tok, "Hi") == tok.encode("Hi")
    assert encode(tok, chat) == plain.encode(chat) and plain.encode(chat)[:2] == [bos, plain.encode("user")[0]]
    assert encode_pair(tok, chat, "Paris") == encode_pair(plain, chat, "Paris")
    assert loglikelihood_rolling(model, tok, [chat]) == loglikelihood_rolling(model, plain, [chat])
    prompts = []
    generate = model.generate
    model.generate = lambda input_ids, **kwargs: prompts.append(input_ids[0].tolist()) or generate(input_ids=input_ids,
                                                                                                    **kwargs)
    try:
        generate_until(model, tok, [(chat, {"max_gen_toks": 1})])
    finally:
        del model.generate
    assert prompts == [plain.encode(chat)]
    for bad in (0, -1, 1.5, "2"):  # (-1 returned empty strings; the others failed inside range())
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {bad!r}"):
            generate_until(model, tok, [(chat, {"max_gen_toks": 1})], batch_size=bad)


def test_smollm2_loglikelihood_matches_plain_transformers(smollm2):
    model, tok, ref = smollm2
    requests = [(PASSAGE + QUESTION, answer) for answer in ANSWERS]
    requests += [(PASSAGE + "Question: Who was the last keeper?\nAnswer: ", "Ada Moreau"), ("", "Gull Point"),
                 (PASSAGE + "The light was automated in", " 1957")]
    want = plain_scores(ref, [encode_pair(tok, *r) for r in requests])
    for _ in range(2):  # cold, then with every context cached
        assert_scores_match(loglikelihood(model, tok, requests), want)
    model.prefix_cache.check_integrity()


def test_smollm2_rolling_loglikelihood_matches_plain_transformers(smollm2):
    model, tok, ref = smollm2
    texts = [PASSAGE, "", "Short text."]
    want = [sum(lp for lp, _ in plain_scores(ref, rolling_windows(tok.encode(t), tok.bos_token_id, 32)))
            for t in texts]
    got = loglikelihood_rolling(model, tok, texts, max_length=32)
    assert got[1] == 0.0
    for g, w in zip(got, want):
        assert abs(g - w) <= ATOL
    model.prefix_cache.check_integrity()


def test_smollm2_generate_until_matches_plain_greedy(smollm2):
    model, tok, ref = smollm2
    prompts = [PASSAGE + "Question: Who was the last keeper?\nAnswer:", "The capital of France is"]
    got = generate_until(model, tok, [(p, {"until": ["\n", "."], "max_gen_toks": 10}) for p in prompts])
    for prompt, completion in zip(prompts, got):
        ids = torch.tensor([tok.encode(prompt)])
        full = tok.decode(ref.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True)
        assert completion == full.split("\n")[0].split(".")[0]
    assert got[1] == " Paris" and got[0]
    # lm-eval's other names for the limit, first given first (a YAML float too), as its HF backend takes them.
    limited = {n: generate_until(model, tok, [(prompts[0], {"until": [], "max_gen_toks": n})]) for n in (2, 6)}
    assert limited[2] != limited[6]
    for kwargs, n in (({"max_new_tokens": 6}, 6), ({"max_tokens": 6.0}, 6), ({"max_completion_tokens": 6, "max_tokens": 2}, 2),
                      ({"max_gen_toks": 6, "max_new_tokens": 2}, 6)):
        assert generate_until(model, tok, [(prompts[0], {"until": [], **kwargs})]) == limited[n], kwargs
    # Stop strings are looked for in the generated text alone, as lm-eval does: a context ending in
    # "\n" does not make the first "\n" generated complete a "\n\n".
    few_shot = "Q: What is 2+2?\nA: 4\n\nQ: What is 3+3?\nA: 6\n"
    (whole,) = generate_until(model, tok, [(few_shot, {"until": [], "max_gen_toks": 12})])
    assert whole.startswith("\n") and "\n\n" in whole[1:]
    assert generate_until(model, tok, [(few_shot, {"until": ["\n\n"], "max_gen_toks": 12})]) == [whole.split("\n\n")[0]]


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda m, t: generate_until(m, t, [("", {"max_gen_toks": 3})]), ValueError, "request 0: the context is empty"),
    (lambda m, t: generate_until(m, t, [("Hi", {"until": [None]})]), TypeError, "until must be a string or a list"),
    (lambda m, t: generate_until(m, t, [("Hi", {"temperature": "0.5"})]), TypeError, "temperature must be a number"),
    (lambda m, t: generate_until(m, t, [("Hi", {"max_gen_toks": 0})]), ValueError, "max_gen_toks must be a positive"),
    (lambda m, t: generate_until(m, t, [("Hi", {"max_gen_toks": True})]), ValueError,
     "max_gen_toks must be a positive integer, got True"),
    (lambda m, t: generate_until(m, t, [("Hi", {"max_tokens": 2.5})]), ValueError,
     "max_tokens must be a positive integer, got 2.5"),
    (lambda m, t: loglikelihood(m, t, [(None, " x")]), TypeError, "pair of strings"),
    (lambda m, t: loglikelihood_rolling(m, t, ["some text"], max_length=0), ValueError,
     "max_length must be a positive"),
    (lambda m, t: loglikelihood_rolling(m, t, ["some text"], max_batch_tokens=None), ValueError,
     "max_batch_tokens must be a positive integer, got None"),
    # One request or text without its list would be scored string by string, or character by character.
    (lambda m, t: loglikelihood_rolling(m, t, "Hello"), TypeError, "texts must be a list of strings"),
    (lambda m, t: loglikelihood(m, t, ("Hi", "yo")), TypeError,
     r"request 0 must be a \(context, continuation\) pair, got 'Hi'"),
    (lambda m, t: generate_until(m, t, ("Hi", {"max_gen_toks": 3})), TypeError,
     r"request 0 must be a \(context, gen_kwargs\) pair"),
    (lambda m, t: generate_until(m, t, [("Hi", None)]), TypeError, "request 0's gen_kwargs must be a dict"),
    # The continuation merges into the context's last token: "a" + "a" is the one token "aa".
    (lambda m, t: loglikelihood(m, t, [("Hi", " x"), ("a", "a")]), ValueError,
     "request 1: the continuation 'a' tokenizes to nothing after the context"),
    (lambda m, t: loglikelihood(m, t, [("Hello wor", "ld")]), ValueError,
     "request 0: the continuation 'ld' tokenizes to nothing after the context"),
    (lambda m, t: loglikelihood(m, t, [("Answer:", "")]), ValueError, "request 0: the continuation is empty"),
])
def test_string_level_bad_input_is_refused_by_name(smollm2, call, error, message):
    model, tok, _ = smollm2
    with pytest.raises(error, match=message):
        call(model, tok)
    assert model.prefix_cache.stats()["live_sessions"] == 0


# --- the lm-eval adapter -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(smollm2):
    installed("lm_eval")
    from lm_eval.api.registry import get_model

    import trellis.eval.lm_eval_adapter  # noqa: F401  (registers the model)

    model, tok, ref = smollm2
    ours = get_model("trellis")(pretrained=model, tokenizer=tok)
    theirs = get_model("hf")(pretrained=ref, tokenizer=tok, batch_size=1)
    return ours, theirs


def instances(request_type, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type, {}, args, i) for i, args in enumerate(arguments)]


def test_trellis_is_registered_with_lm_eval():
    installed("lm_eval")
    from lm_eval.api.registry import get_model

    from trellis.eval.lm_eval_adapter import TrellisLM

    assert get_model("trellis") is TrellisLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models stay reachable


def test_adapter_loglikelihood_matches_lm_evals_hf_backend(harness):
    ours, theirs = harness
    requests = instances("loglikelihood", [(PASSAGE + QUESTION, a) for a in ANSWERS] + [("", "Gull Point")])
    assert_scores_match(ours.loglikelihood(requests), theirs.loglikelihood(requests))


def test_adapter_rolling_and_generation_match_lm_evals_hf_backend(harness):
    ours, theirs = harness
    rolling = instances("loglikelihood_rolling", [(PASSAGE,), ("Short text.",)])
    # A rolling score sums a log-probability per token: its rounding error grows with the text.
    for g, w in zip(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)):
        assert g == pytest.approx(w, rel=1e-6, abs=ATOL)
    gen = instances("generate_until", [(PASSAGE + "Question: Who was the last keeper?\nAnswer:",
                                        {"until": ["\n"], "max_gen_toks": 8})])
    assert ours.generate_until(gen) == theirs.generate_until(gen)


def test_adapter_sizes_an_auto_batch_from_the_kv_pool():
    """batch_size="auto" (lm-eval's --batch_size auto) batches generate_until as the pool allows:
    HFLM's probe would try 64 rows of max_length and take the pool's refusal for a real error."""
    installed("lm_eval")
    from trellis.eval.lm_eval_adapter import TrellisLM

    model, tok = smollm2_trellis(num_blocks=64), smollm2_tokenizer()
    auto = TrellisLM(pretrained=model, tokenizer=tok, batch_size="auto", max_length=96)
    assert auto._detect_batch_size() == 21  # rows of 96 tokens: 3 blocks of 32 each
    gen = instances("generate_until", [("The capital of France is", {"until": ["\n"], "max_gen_toks": 5}),
                                       ("Hi there", {"until": ["\n"], "max_gen_toks": 5})])
    got = auto.generate_until(gen)
    assert got == TrellisLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=96).generate_until(gen)
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_adapter_loads_from_a_path_with_cache_settings():
    installed("lm_eval")
    from lm_eval.api.registry import get_model

    import trellis.eval.lm_eval_adapter  # noqa: F401

    lm = get_model("trellis").create_from_arg_string(
        f"pretrained={smollm2_dir()},block_size=16,num_blocks=64,linear_kernel=packed", {"device": "cpu"})
    assert lm.trellis_model.prefix_cache.block_size == 16 and lm.trellis_model.prefix_cache.pool.num_blocks == 64
    assert lm.trellis_model.device.type == "cpu"
    assert lm.trellis_model.linear_kernel == "packed" == lm.trellis_model.lm_head.kind


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_adapter_falls_back_to_auto_from_a_device_this_machine_lacks(caplog):
    """lm-eval's command line passes device cuda:0 unless --device says otherwise; its HF backend,
    and so the adapter, then run where they can, with a warning."""
    installed("lm_eval")
    from lm_eval.api.registry import get_model

    import trellis.eval.lm_eval_adapter  # noqa: F401

    lm = get_model("trellis").create_from_arg_string(f"pretrained={smollm2_dir()}", {"device": "cuda:0"})
    assert lm.trellis_model.device == resolve_device("auto")
    assert "device 'cuda:0' is not available here" in caplog.text


def test_adapter_refuses_cache_settings_for_a_model_object_and_bad_sizes(smollm2):
    installed("lm_eval")
    from lm_eval.api.registry import get_model

    import trellis.eval.lm_eval_adapter  # noqa: F401

    model, tok, _ = smollm2
    trellis_lm = get_model("trellis")
    # They would configure nothing: the model object keeps its own cache.
    with pytest.raises(ValueError, match=r"block_size=16, kernel_backend='reference': the KV cache settings apply "
                                         "only when the adapter loads the model from a path"):
        trellis_lm(pretrained=model, tokenizer=tok, block_size=16, kernel_backend="reference")
    for bad, message in [({"max_batch_tokens": 0}, "max_batch_tokens must be a positive integer, got 0"),
                         ({"max_batch_tokens": "10"}, "max_batch_tokens must be a positive integer, got '10'"),
                         ({"max_length": True}, "max_length must be a positive integer, got True"),
                         ({"kv_cache_memory": 1e8 + 0.5}, "kv_cache_memory must be a whole number of bytes")]:
        with pytest.raises(ValueError, match=message):
            trellis_lm(pretrained=model, tokenizer=tok, **bad)
    assert model.prefix_cache.block_size == 32


def test_adapter_keeps_the_embedded_gguf_quantized_and_refuses_autocast():
    installed("lm_eval")
    from lm_eval.api.registry import get_model

    import trellis.eval.lm_eval_adapter  # noqa: F401

    trellis_lm = get_model("trellis")
    lm = trellis_lm.create_from_arg_string("keep_quantized=True", {"device": "cpu"})  # no pretrained: the embedded
    assert any(isinstance(m, QuantizedLinear) for m in lm.trellis_model.modules())
    with pytest.raises(ValueError, match=r"mixed_precision_dtype='bfloat16' \(autocast\) is not served"):
        trellis_lm.create_from_arg_string(f"pretrained={smollm2_dir()},mixed_precision_dtype=bfloat16",
                                          {"device": "cpu"})


def test_adapter_takes_a_whole_float_kv_cache_memory():
    """lm-eval parses ``kv_cache_memory=1e7`` as a float."""
    installed("lm_eval")
    from lm_eval.api.registry import get_model

    import trellis.eval.lm_eval_adapter  # noqa: F401

    lm = get_model("trellis").create_from_arg_string(f"pretrained={smollm2_dir()},kv_cache_memory=1e7",
                                                     {"device": "cpu"})
    pool = lm.trellis_model.prefix_cache.pool
    assert pool.num_blocks == 10**7 // pool.kv[:, :, 0].nbytes  # the bytes of one block in every layer


@pytest.mark.slow
def test_lm_eval_command_line_runs_a_local_task():
    """``trellis-lm-eval`` (``lm_eval`` with the model registered) on the sample reading set."""
    installed("lm_eval")
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "trellis.eval.lm_eval_adapter", "--model", "trellis", "--model_args",
               f"pretrained={smollm2_dir()},dtype=float32", "--tasks", "trellis_reading_mc",
               "--include_path", "scripts/data/lm_eval", "--limit", "2"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trellis_reading_mc" in done.stdout and "acc_norm" in done.stdout
