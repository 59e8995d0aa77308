"""The engine under many clients (what the server relies on): chunked prefill, in-batch prefix
caching, fair admission, cancellation, a bounded queue, ``n`` forked choices, log-probabilities
of prompt and generated tokens, and an error in one request failing that request only."""

import threading

import pytest
import torch
from transformers.generation.continuous_batching.requests import RequestStatus

from tests.models import tiny_pair
from trellis.cache.block_pool import OutOfBlocksError
from trellis.engine import Engine, QueueFullError, SamplingParams
from trellis.engine.scheduler import LOOKAHEAD

BS = 4  # tiny_pair's block size


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(ref, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kwargs)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_decoding():
    ref, model = tiny_pair()
    engine = Engine(model, max_batch_tokens=16)
    short = engine.add(tokens(1, 6), greedy(30))
    engine.step()
    long = engine.add(tokens(2, 100), greedy(5))
    chunks = []
    while long.status in (RequestStatus.PENDING, RequestStatus.PREFILLING):
        decoded = len(short.generated)
        cached = long.seq.num_cached if long.seq else 0
        engine.step()
        chunks.append(long.seq.num_cached - cached)
        assert len(short.generated) == decoded + 1  # the running session decoded in every step
    assert len(chunks) > 5 and max(chunks) <= 16
    assert all(c % BS == 0 for c in chunks[:-1])  # chunks end on block boundaries
    engine.run()
    assert short.generated == reference(ref, short.prompt, 30)
    assert long.generated == reference(ref, long.prompt, 5)
    model.prefix_cache.check_integrity()


def test_requests_sharing_an_uncached_prefix_compute_it_once():
    _, model = tiny_pair()
    prefix = tokens(3, 40)
    prompts = [prefix + tokens(10 + i, 5) for i in range(4)]
    engine = Engine(model)
    sessions = [engine.add(p, greedy(3)) for p in prompts]
    engine.step()
    assert [s.status for s in sessions] == [RequestStatus.DECODING] + [RequestStatus.PENDING] * 3  # held back
    engine.run()
    assert [s.num_cached_tokens for s in sessions] == [0] + [40] * 3
    tail = -(-(45 + 3 - 1) // BS) - 10  # each session's own blocks past the 10 shared ones
    assert engine.fresh_blocks == 10 + 4 * tail  # the shared prefix was computed once
    model.prefix_cache.check_integrity()


def test_a_waiting_request_is_overtaken_a_bounded_number_of_times():
    _, model = tiny_pair(num_blocks=24)
    engine = Engine(model, max_overtakes=2)
    hog = engine.add(tokens(4, 40), greedy(30))  # 18 blocks
    engine.step()
    big = engine.add(tokens(5, 20), greedy(10))  # 8 blocks: must wait for the hog
    small = [engine.add(tokens(20 + i, 3), greedy(2)) for i in range(6)]  # 1 block each: they fit now
    while big.status == RequestStatus.PENDING:
        engine.step()
    assert hog.status == RequestStatus.FINISHED and big.overtaken == 2
    overtook = [s for s in small if 0 <= s.admitted_time < big.admitted_time]
    assert len(overtook) == 2  # the rest waited behind it, FIFO
    engine.run()
    assert all(s.status == RequestStatus.FINISHED for s in [big, *small])
    model.prefix_cache.check_integrity()


@pytest.mark.parametrize("blocked", [LOOKAHEAD - 1, LOOKAHEAD])
def test_admission_looks_past_a_bounded_number_of_waiting_requests(blocked):
    _, model = tiny_pair(num_blocks=24)
    engine = Engine(model, max_overtakes=100)
    engine.add(tokens(4, 40), greedy(30))  # 18 blocks
    engine.step()
    for i in range(blocked):
        engine.add(tokens(30 + i, 20), greedy(10))  # 8 blocks each: all wait for the first
    small = engine.add(tokens(5, 3), greedy(2))  # 1 block: fits now
    engine.step()
    # Admission passes over at most LOOKAHEAD requests that must wait before it stops looking.
    assert (small.status == RequestStatus.PENDING) == (blocked >= LOOKAHEAD)
    engine.run()
    model.prefix_cache.check_integrity()


def test_cancelling_frees_blocks_at_the_next_step_and_keeps_the_prefix_cached():
    _, model = tiny_pair()
    engine = Engine(model)
    prompt = tokens(6, 22)
    running = engine.add(prompt, greedy(50))
    engine.step()
    engine.step()
    waiting = engine.add(tokens(7, 9), greedy(5))
    engine.cancel(running)
    engine.cancel(waiting)
    ended = engine.step()
    assert set(ended) == {running, waiting} and not engine.has_work
    assert running.finish_reason == waiting.finish_reason == "cancelled"
    assert model.prefix_cache.stats()["live_sessions"] == 0
    # The computed full blocks stay, and the last, partly filled one as a tail: all 22 tokens.
    assert model.prefix_cache.admission_cost(prompt + [9]).cached_tokens == 22
    model.prefix_cache.check_integrity()


def test_a_full_queue_refuses_and_threads_may_add_and_cancel_while_one_steps():
    _, model = tiny_pair()
    engine = Engine(model, max_waiting=2)
    engine.add(tokens(8, 5), greedy(2))
    engine.add(tokens(9, 5), greedy(2))
    with pytest.raises(QueueFullError, match="2 requests are already waiting"):
        engine.add(tokens(10, 5), greedy(2))
    engine.run()
    engine.max_waiting = None
    added = []

    def client(i: int) -> None:
        for j in range(5):
            session = engine.add(tokens(100 * i + j, 7), greedy(4))
            added.append(session)
            if j % 2:
                engine.cancel(session)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or engine.has_work:
        engine.step()
    assert len(added) == 20 and all(s.done for s in added)
    assert {s.finish_reason for s in added} <= {"length", "cancelled"}
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


def test_most_new_tokens_is_what_add_accepts_and_check_queues_nothing():
    """The server cuts a request's default max_tokens to ``most_new_tokens`` and checks every prompt
    of a request before it adds any."""
    _, model = tiny_pair(num_blocks=16)
    engine = Engine(model)
    for length in range(1, 70):
        for n in (1, 2, 3):
            most = engine.most_new_tokens(length, n)
            if most >= 1:
                engine.check(tokens(length, length), greedy(most), n=n)
            with pytest.raises(OutOfBlocksError, match="can never fit"):
                engine.check(tokens(length, length), greedy(max(most, 0) + 1), n=n)
    assert engine.most_new_tokens(64) == 1 and engine.most_new_tokens(65) < 1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.check([5, 999], greedy(1))
    assert not engine.has_work


def test_n_choices_fork_the_computed_prompt():
    ref, model = tiny_pair()
    prompt = tokens(11, 18)
    engine = Engine(model)
    leader = engine.add(prompt, greedy(6), n=3)
    engine.step()
    assert len(engine.running) == 3  # the forks started with the leader's first token
    shared = set(leader.seq.block_ids[:18 // BS])
    assert all(set(f.seq.block_ids[:18 // BS]) == shared for f in leader.forks)
    engine.run()
    want = reference(ref, prompt, 6)
    assert [s.generated for s in [leader, *leader.forks]] == [want] * 3
    sampled = engine.add(prompt, SamplingParams(max_new_tokens=8, do_sample=True, seed=5), n=3)
    engine.run()
    alone = engine.add(prompt, SamplingParams(max_new_tokens=8, do_sample=True, seed=6))
    engine.run()
    assert sampled.forks[0].generated == alone.generated  # fork i samples with seed + i
    assert sampled.generated != sampled.forks[0].generated
    model.prefix_cache.check_integrity()
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_logprobs_of_prompt_and_generated_tokens_match_transformers():
    ref, model = tiny_pair()
    prompt = tokens(12, 37)
    engine = Engine(model, max_batch_tokens=10)  # the prompt is scored over several chunks
    engine.add(prompt[:20], greedy(1))  # cached: a prompt-logprobs session must still compute it
    engine.run()
    session = engine.add(prompt, SamplingParams(max_new_tokens=4, logprobs=3, prompt_logprobs=2))
    engine.run()
    with torch.no_grad():
        full = torch.tensor([prompt + session.generated[:-1]])
        want = ref(full).logits[0].float().log_softmax(-1)  # [L, V]
    assert [e.token for e in session.prompt_logprobs] == prompt[1:]
    assert session.num_cached_tokens == 0
    for position, entry in enumerate(session.prompt_logprobs + session.token_logprobs):
        assert entry.logprob == pytest.approx(want[position, entry.token].item(), abs=1e-4)
        top = want[position].topk(len(entry.top))
        assert [t for t, _ in entry.top] == top.indices.tolist()
    assert all(len(e.top) == 2 for e in session.prompt_logprobs)
    assert all(len(e.top) == 3 and e.top[0][0] == e.token for e in session.token_logprobs)  # greedy: the best
    # n choices: every fork of the request has the prompt's log-probabilities, scored once
    chosen = engine.add(prompt, SamplingParams(max_new_tokens=2, do_sample=True, prompt_logprobs=2), n=3)
    engine.run()
    assert [f.prompt_logprobs for f in chosen.forks] == [chosen.prompt_logprobs] * 2
    assert [e.token for e in chosen.prompt_logprobs] == prompt[1:]
    model.prefix_cache.check_integrity()


def test_a_failing_request_fails_alone():
    ref, model = tiny_pair()
    engine = Engine(model)
    bad_prompt = tokens(13, 9)
    forward = engine.runner.forward

    def failing_forward(manager, seqs, *args, **kwargs):
        if any(seq.token_ids[:9] == bad_prompt for seq in seqs):
            raise RuntimeError("injected failure")
        return forward(manager, seqs, *args, **kwargs)

    engine.runner.forward = failing_forward
    try:
        good = [engine.add(tokens(14 + i, 7), greedy(5)) for i in range(2)]
        bad = engine.add(bad_prompt, greedy(5))
        engine.run()
    finally:
        del engine.runner.forward
    assert bad.status == RequestStatus.FAILED and "injected failure" in bad.error
    for s in good:
        assert s.status == RequestStatus.FINISHED and s.generated == reference(ref, s.prompt, 5)
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()
