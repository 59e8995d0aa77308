"""The continuous-batching engine and ``TrellisLlama.generate_batch`` against per-prompt transformers."""

import threading

import pytest
import torch
from transformers import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from tests.models import smollm2_reference, smollm2_tokenizer, smollm2_trellis, tiny_pair
from trellis.cache.block_pool import OutOfBlocksError
from trellis.engine.engine import Engine
from trellis.engine.sampling import SamplingParams, filter_logits, sample

BS = 4  # tiny_pair's block size


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(ref, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


SYSTEM = tokens(0, 30)
PROMPTS = [SYSTEM + tokens(10 + i, n) for i, n in enumerate((5, 9, 2, 13))]


def test_greedy_generate_batch_matches_per_prompt_generate_and_reuses_the_prefix():
    ref, model = tiny_pair()
    model.generate_batch([SYSTEM], max_new_tokens=1)  # warm the shared system prompt
    out = model.generate_batch(PROMPTS, max_new_tokens=10, do_sample=False)
    assert list(out) == [f"req_{i}" for i in range(len(PROMPTS))]
    for prompt, result in zip(PROMPTS, out.values()):
        assert isinstance(result, GenerationOutput) and result.status == RequestStatus.FINISHED
        assert result.prompt_ids == prompt and result.error is None
        assert result.generated_tokens == reference(ref, prompt, 10)
        assert result.num_cached_tokens == len(SYSTEM) // BS * BS
        assert 0 < result.ttft and 0 < result.decode_time
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


def test_sessions_join_and_leave_while_others_decode():
    ref, model = tiny_pair()
    engine = Engine(model, max_running=2)
    budgets = [3, 9, 4, 6, 2]
    sessions = [engine.add(p, SamplingParams(max_new_tokens=n)) for p, n in zip(PROMPTS + [tokens(5, 7)], budgets)]
    joined_mid_decode = False
    while engine.has_work:
        decoding = {s.request_id for s in engine.running}
        engine.step()
        joined = {s.request_id for s in engine.running} - decoding
        joined_mid_decode |= bool(joined and decoding & {s.request_id for s in engine.running})
        assert len(engine.running) <= 2
    assert joined_mid_decode
    for s, n in zip(sessions, budgets):
        assert s.status == RequestStatus.FINISHED and s.generated == reference(ref, s.prompt, n)
    model.prefix_cache.check_integrity()


def test_stop_tokens_end_a_session_and_are_kept():
    ref, model = tiny_pair()
    want = reference(ref, PROMPTS[0], 12)
    stop = want[4]
    cut = want.index(stop) + 1
    out = model.generate_batch(PROMPTS[:1], max_new_tokens=12, eos_token_id=[250, stop])
    assert out["req_0"].generated_tokens == want[:cut]
    assert reference(ref, PROMPTS[0], 12, eos_token_id=stop)[:cut] == want[:cut]
    model.prefix_cache.check_integrity()


def test_max_new_tokens_and_a_single_token():
    _, model = tiny_pair()
    out = model.generate_batch(PROMPTS, max_new_tokens=1)
    assert all(len(r.generated_tokens) == 1 and r.decode_time == 0 for r in out.values())
    out = model.generate_batch(PROMPTS, max_new_tokens=7)
    assert all(len(r.generated_tokens) == 7 for r in out.values())
    model.prefix_cache.check_integrity()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    _, model = tiny_pair()
    params = SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=40, top_p=0.95, seed=3)
    alone = Engine(model).generate([PROMPTS[1]], params)[0].generated
    crowd = Engine(model).generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], params)
    assert crowd[1].generated == alone
    cb = ContinuousBatchingConfig(seed=11)
    first = model.generate_batch(PROMPTS, do_sample=True, max_new_tokens=12, continuous_batching_config=cb)
    second = model.generate_batch(PROMPTS, do_sample=True, max_new_tokens=12, continuous_batching_config=cb)
    assert [r.generated_tokens for r in first.values()] == [r.generated_tokens for r in second.values()]
    other = model.generate_batch(PROMPTS, do_sample=True, max_new_tokens=12,
                                 continuous_batching_config=ContinuousBatchingConfig(seed=12))
    assert [r.generated_tokens for r in first.values()] != [r.generated_tokens for r in other.values()]
    model.prefix_cache.check_integrity()


def test_filters_match_transformers_warpers():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(0)) * 3
    for top_k, top_p in ((5, 1.0), (0, 0.7), (20, 0.5), (1, 1.0), (0, 1.0)):
        want = logits.clone()
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1:
            want = TopPLogitsWarper(top_p)(None, want)
        got = filter_logits(logits, torch.ones(6), torch.full((6,), top_k), torch.full((6,), top_p))
        assert torch.equal(got.isinf(), want.isinf())


def test_top_k_and_top_p_restrict_the_support():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()[None].repeat(2, 1)  # [2, 4]
    params = [SamplingParams(do_sample=True, top_k=2), SamplingParams(do_sample=True, top_p=0.6)]
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    seen = [set(), set()]
    for _ in range(200):
        picked, logprobs = sample(logits, params, generators)
        for row, token in enumerate(picked):
            seen[row].add(token)
        assert logprobs[0] == pytest.approx(torch.log(probs[picked[0]] / 0.7).item(), abs=1e-5)
    assert seen == [{0, 1}, {0, 1}]


def test_admission_waits_for_blocks_and_completes():
    ref, model = tiny_pair(num_blocks=10)
    prompts = [tokens(20 + i, 10) for i in range(3)]  # 10 + 7 - 1 tokens of K/V: 4 blocks each
    engine = Engine(model)
    sessions = [engine.add(p, SamplingParams(max_new_tokens=7)) for p in prompts]
    engine.step()
    assert len(engine.running) == 2 and sessions[2].status == RequestStatus.PENDING
    engine.run()
    for s in sessions:
        assert s.generated == reference(ref, s.prompt, 7)
    assert sessions[2].admitted_time >= sessions[0].finished_time
    model.prefix_cache.check_integrity()


def test_a_session_that_can_never_fit_is_refused_and_nothing_changes():
    _, model = tiny_pair(num_blocks=8)
    model.generate_batch([PROMPTS[2][:12]], max_new_tokens=2)
    before = model.prefix_cache.stats()
    with pytest.raises(OutOfBlocksError, match="can never fit"):
        model.generate_batch([PROMPTS[0]], max_new_tokens=10)
    assert model.prefix_cache.stats() == before
    model.prefix_cache.check_integrity()


@pytest.mark.parametrize("bad_id", [-1, 256])
def test_a_prompt_with_a_token_outside_the_vocabulary_is_refused_and_nothing_changes(bad_id):
    _, model = tiny_pair()
    model.generate_batch([PROMPTS[0]], max_new_tokens=2)
    before = model.prefix_cache.stats()
    with pytest.raises(ValueError, match=f"token id {bad_id} is outside the vocabulary"):
        model.generate_batch([PROMPTS[1], [5, bad_id, 7]], max_new_tokens=2)
    assert model.prefix_cache.stats() == before
    model.prefix_cache.check_integrity()


def test_blocks_held_outside_the_engine_give_a_clear_error_not_a_hang():
    _, model = tiny_pair(num_blocks=8)
    holder = model.prefix_cache.admit(tokens(30, 25))  # 7 of the 8 blocks
    with pytest.raises(OutOfBlocksError, match="held elsewhere"):
        model.generate_batch([tokens(31, 6)], max_new_tokens=4)
    model.prefix_cache.check_integrity()
    model.prefix_cache.release(holder, commit=False)
    assert len(model.generate_batch([tokens(31, 6)], max_new_tokens=4)["req_0"].generated_tokens) == 4


def test_shared_prefix_blocks_are_held_once_plus_each_sessions_tail():
    _, model = tiny_pair(block_size=4)
    prefix, n_new = tokens(40, 12), 5  # 3 shared blocks
    prompts = [prefix + tokens(41 + i, n) for i, n in enumerate((6, 3, 9))]
    engine = Engine(model)
    engine.generate([prefix], SamplingParams(max_new_tokens=1))
    engine.generate(prompts, SamplingParams(max_new_tokens=n_new))
    tails = [-(-(len(p) + n_new - 1) // BS) - 3 for p in prompts]
    assert engine.peak_live_blocks == 3 + sum(tails)
    assert engine.fresh_blocks == 3 + sum(tails)  # the warm-up's 3, then only the tails
    model.prefix_cache.check_integrity()


def test_finished_sessions_cache_prompt_and_answer_for_the_next_turn():
    _, model = tiny_pair()
    first = model.generate_batch([PROMPTS[3]], max_new_tokens=9)["req_0"]
    turn = first.prompt_ids + first.generated_tokens + tokens(50, 4)
    second = model.generate_batch([turn], max_new_tokens=3)["req_0"]
    assert second.num_cached_tokens == (len(first.prompt_ids) + 9 - 1) // BS * BS
    model.prefix_cache.check_integrity()


def test_timestamps_logprobs_and_unsupported_settings():
    _, model = tiny_pair()
    out = model.generate_batch(PROMPTS[:2], max_new_tokens=4, record_timestamps=True,
                               continuous_batching_config=ContinuousBatchingConfig(return_logprobs=True))
    for r in out.values():
        assert len(r.timestamps) == 4 and len(r.logprobs) == 4 and all(lp <= 0 for lp in r.logprobs)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate_batch(PROMPTS[:1], num_beams=2)
    with pytest.raises(TypeError, match="unexpected"):
        model.generate_batch(PROMPTS[:1], not_a_setting=1)
    model.prefix_cache.check_integrity()


def test_smollm2_generate_batch_matches_generate():
    ref, model = smollm2_reference(), smollm2_trellis(num_blocks=64)
    tok = smollm2_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"]
               for q in ("What is the capital of France?", "Name a colour.")]
    out = model.generate_batch(prompts, max_new_tokens=6, do_sample=False)
    for prompt, result in zip(prompts, out.values()):
        assert result.generated_tokens == reference(ref, prompt, 6)
    model.prefix_cache.check_integrity()


def test_a_cache_rebuilt_under_running_sessions_fails_them_cleanly():
    _, model = tiny_pair()
    engine = Engine(model)
    session = engine.add(PROMPTS[0], SamplingParams(max_new_tokens=5))
    engine.step()
    old = model.prefix_cache
    model.configure_cache(block_size=BS, num_blocks=64)
    with pytest.raises(RuntimeError, match="rebuilt"):
        engine.step()
    assert session.status == RequestStatus.FAILED and not engine.has_work
    old.check_integrity()
    assert old.stats()["live_sessions"] == 0


def test_concurrent_calls_from_threads_match_sequential_ones():
    ref, model = tiny_pair()
    results = {}

    def call(i: int) -> None:
        results[i] = model.generate_batch([PROMPTS[i], PROMPTS[(i + 1) % 4]], max_new_tokens=6)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, out in results.items():
        assert [r.generated_tokens for r in out.values()] == [reference(ref, PROMPTS[j % 4], 6) for j in (i, i + 1)]
    model.prefix_cache.check_integrity()
