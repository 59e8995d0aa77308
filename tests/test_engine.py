"""The continuous-batching engine and ``TrellisLlama.generate_batch`` against per-prompt transformers."""

import gc
import inspect
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from transformers import ContinuousBatchingConfig
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tests.models import smollm2_reference, smollm2_tokenizer, smollm2_trellis, tiny_config, tiny_pair
from trellis.cache.block_pool import OutOfBlocksError
from trellis.engine import sampling
from trellis.engine.engine import Engine
from trellis.engine.sampling import MIN_TEMPERATURE, SamplingParams, filter_logits, sample
from trellis.engine.scheduler import Scheduler
from trellis.engine.session import Session
from trellis.runner import runner as runner_module
from trellis.runner import runner_of

BS = 4  # tiny_pair's block size


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(ref, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


def run_in_threads(calls: list[Callable[[], object]], timeout: float = 300.0) -> list[object]:
    """Run each call in its own thread, all at once; their results, once every one has returned."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 -- reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    assert not errors, errors
    assert sorted(results) == list(range(len(calls)))
    return [results[i] for i in range(len(calls))]


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
        # SYSTEM's whole blocks shared, its last 2 tokens copied from the warm-up's kept tail
        assert result.num_cached_tokens == len(SYSTEM)
        assert 0 < result.ttft and 0 < result.decode_time
    assert model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


def test_sessions_over_a_long_system_prompt_decode_as_transformers_does():
    # 40 shared keys (ten whole blocks), over the C++ kernel's 32: each decode step reads them in
    # one shared-prefix item for all four sessions, merged with each session's own keys (from
    # the 41st on, the system prompt's last 2 tokens copied into each session's own block).
    system = tokens(1, 42)
    prompts = [system + tokens(20 + i, n) for i, n in enumerate((3, 7, 1, 11))]
    ref, model = tiny_pair()
    model.generate_batch([system], max_new_tokens=1)
    out = model.generate_batch(prompts, max_new_tokens=10, do_sample=False)
    for prompt, result in zip(prompts, out.values()):
        assert result.num_cached_tokens == 42
        assert result.generated_tokens == reference(ref, prompt, 10)
    model.prefix_cache.check_integrity()


def test_sessions_over_one_prompt_run_side_by_side_however_they_arrive():
    # Two system prompts, their sessions arriving in turns: each forward orders the sessions by
    # their block ids, so each prompt's sessions are neighbours (and share their keys' reads).
    systems = [tokens(2, 42), tokens(3, 42)]
    prompts = [systems[i % 2] + tokens(30 + i, 3 + i) for i in range(6)]
    ref, model = tiny_pair()
    model.generate_batch(systems, max_new_tokens=1)
    engine = Engine(model)
    orders = []
    forward = engine.runner.forward

    def recording_forward(manager, seqs, *args, **kwargs):
        orders.append([seq.block_ids[0] for seq in seqs])
        return forward(manager, seqs, *args, **kwargs)

    engine.runner.forward = recording_forward
    sessions = [engine.add(p, SamplingParams(max_new_tokens=6, stop_token_ids=(1,))) for p in prompts]  # 1: EOS
    while engine.has_work:
        engine.step()
    assert sum(len(order) == 6 for order in orders) >= 2  # decode steps of all six sessions
    for order in orders:  # each prompt's sessions in one stretch
        assert order == sorted(order)
    for s, prompt in zip(sessions, prompts):
        assert s.generated == reference(ref, prompt, 6)


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
    for i, prompt in enumerate(PROMPTS):  # request i samples with seed + i
        alone = model.generate_batch([prompt], do_sample=True, max_new_tokens=12,
                                     continuous_batching_config=ContinuousBatchingConfig(seed=11 + i))
        assert alone["req_0"].generated_tokens == first[f"req_{i}"].generated_tokens
    model.prefix_cache.check_integrity()


def test_a_model_on_mps_draws_its_tokens_on_the_cpu(monkeypatch):
    """MPS's multinomial returns tokens of probability zero (pytorch/pytorch#192577): an MPS model's
    sessions get CPU generators, seeded as on a CPU model, and sample() draws where they are."""
    mps = torch.device("mps")
    params = SamplingParams(do_sample=True, seed=7)
    generator = params.make_generator(mps)  # no MPS device is needed to make it: it is a CPU one
    assert generator.device == torch.device("cpu")
    assert torch.equal(torch.rand(8, generator=generator), torch.rand(8, generator=params.make_generator(
        torch.device("cpu"))))
    assert sampling.draw_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    generators = [params.make_generator(mps), params.make_generator(mps)]
    asked = []  # sample() draws on draw_device of the logits' device
    monkeypatch.setattr(sampling, "draw_device", lambda device: asked.append(device) or torch.device("cpu"))
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))  # [B, V]
    sample(logits, [params, params], generators)
    assert asked == [logits.device]


def warped_scores(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' warpers as generate() builds them: in its order, each only where it applies."""
    scores = logits.clone()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


def warped_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' sampling distribution: its warpers, then softmax."""
    return warped_scores(logits, temperature, top_k, top_p).softmax(dim=-1)


# (temperature, top_k, top_p) per row: one batch mixes them, so a row must use its own.
WARPS = [(0.5, 5, 1.0), (1.7, 0, 0.7), (0.8, 20, 0.5), (2.0, 1, 1.0), (1.3, 0, 1.0), (3.0, 0, 0.9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_picks_argmax_ties_and_nan_included(dtype):
    logits = torch.randn(4, 49152, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[0, [17, 4000, 40000]] = 50.0  # a tie: the first
    logits[1, [9, 30]] = float("nan")  # a NaN wins, the first of them
    logits[2, -1] = 60.0  # the last column
    tokens, logprobs, errors = sample(logits, [SamplingParams()] * 4, [None] * 4)
    assert tokens == logits.argmax(dim=-1).tolist() == [17, 9, 49151, tokens[3]]
    assert logprobs[0] == logits[0].float().log_softmax(-1)[17].item()
    assert errors == {}


def test_filters_give_transformers_warpers_distribution():
    logits = torch.randn(len(WARPS), 100, generator=torch.Generator().manual_seed(0)) * 3  # [B, V]
    got = filter_logits(logits, *zip(*WARPS)).softmax(dim=-1)  # [B, V]
    for row, warp in enumerate(WARPS):
        torch.testing.assert_close(got[row], warped_probs(logits[row : row + 1], *warp)[0])
    # Ties at the k-th value (bf16 logits have many) stay, as transformers keeps them.
    tied = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, -1.0]])
    for warp in [(1.0, 2, 1.0), (0.7, 4, 1.0), (1.0, 1, 0.99)]:
        got = filter_logits(tied, *([value] * 2 for value in warp)).softmax(dim=-1)
        torch.testing.assert_close(got, warped_probs(tied, *warp))


def test_filters_keep_exactly_the_tokens_transformers_warpers_keep():
    """Bit for bit, row by row in one batch: where top-p cuts between tied logits (bf16 models have
    many) and where float32 rounding decides the cut (a top_p near 1 over a large vocabulary)."""
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(8, 49152, generator=generator) * 3).to(torch.bfloat16).float()  # [B, V]
    logits[0, :4] = logits[0].max() + 1  # four tied top tokens
    logits[1, 7:9] = logits[1].max() + 0.5  # a tied pair on top
    warps = [(1.0, 0, 0.5), (1.0, 0, 0.0), (0.7, 0, 0.99), (1.0, 0, 0.999), (1.3, 0, 0.9999),
             (1.0, 40, 0.95), (0.9, 0, 1.0), (1.0, 5, 1e-9)]
    got = filter_logits(logits, *zip(*warps))  # [B, V]
    for row, warp in enumerate(warps):
        assert torch.equal(got[row], warped_scores(logits[row : row + 1], *warp)[0]), warp


def test_extreme_but_valid_filters_and_seeds_sample_as_transformers_and_torch_take_them():
    """A top_k past the vocabulary (and past int64) keeps every token and a top_p below float32's
    range the most likely one, as transformers' warpers take them; any integer seeds a session,
    modulo 2**64 as torch takes a negative one (a fork's ``seed + i`` may pass 2**64)."""
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(4)) * 3  # [1, V]
    for warp in [(1.0, 2**63, 1.0), (1.0, 2**70, 0.9), (0.7, 0, 1e-300), (1.3, 5, 5e-324), (1.0, 0, 0.0)]:
        params = SamplingParams(do_sample=True, temperature=warp[0], top_k=warp[1], top_p=warp[2])
        token, logprob, errors = sample(logits, [params], [torch.Generator().manual_seed(0)])
        assert errors == {}
        assert abs(logprob[0] - warped_probs(logits, *warp)[0, token[0]].log().item()) < 1e-5, warp
    for seed, same_as in [(-1, 2**64 - 1), (2**64 + 5, 5), (-(2**63), 2**63)]:
        drawn = torch.rand(4, generator=SamplingParams(do_sample=True, seed=seed).make_generator(torch.device("cpu")))
        assert torch.equal(drawn, torch.rand(4, generator=torch.Generator().manual_seed(same_as)))
    with pytest.raises(ValueError, match="top_k must be an integer"):
        SamplingParams(do_sample=True, top_k=2.5)
    with pytest.raises(ValueError, match="seed must be an integer"):
        SamplingParams(do_sample=True, seed="7")
    for do_sample in ("False", 0.5, None, 1):
        with pytest.raises(TypeError, match="do_sample must be True or False"):
            SamplingParams(do_sample=do_sample)
    for temperature in (float("nan"), -1.0):  # refused when greedy too: a mistake either way
        with pytest.raises(ValueError, match="temperature must be a number >= 0"):
            SamplingParams(temperature=temperature)


def test_numpy_integers_count_as_integers():
    """NumPy integers (as a script reading counts from an array passes them, and as transformers takes
    them) are taken as the ints they are, and kept as Python ints: a seed at 2**64 - 1 as a uint64
    seeds as that int does; NumPy's bool is no integer, as Python's is none."""
    params = SamplingParams(max_new_tokens=np.int64(3), do_sample=True, top_k=np.int32(5), seed=np.uint64(2**64 - 1),
                            stop_token_ids=[np.int64(2)], logprobs=np.int8(1), prompt_logprobs=np.int16(0))
    assert params == SamplingParams(max_new_tokens=3, do_sample=True, top_k=5, seed=2**64 - 1, stop_token_ids=(2,),
                                    logprobs=1, prompt_logprobs=0)
    assert all(type(value) is int for value in (params.max_new_tokens, params.top_k, params.seed, *params.stop_token_ids))
    drawn = torch.rand(4, generator=params.make_generator(torch.device("cpu")))
    assert torch.equal(drawn, torch.rand(4, generator=torch.Generator().manual_seed(2**64 - 1)))
    assert Scheduler(max_batch_tokens=np.int64(64), max_running=np.uint8(2)) == Scheduler(64, 2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got np.True_"):
        SamplingParams(max_new_tokens=np.bool_(True))
    ref, model = tiny_pair()
    engine = Engine(model)
    session = engine.add(np.array(PROMPTS[0]), SamplingParams(max_new_tokens=np.int64(3)), n=np.int64(1))
    engine.run()
    assert session.generated == reference(ref, PROMPTS[0], 3)


def test_sampling_draws_from_transformers_warped_distribution():
    """Each draw reports the log-probability transformers' warpers give its token, and the draws'
    frequencies follow that distribution."""
    logits = torch.randn(len(WARPS), 10, generator=torch.Generator().manual_seed(1)) * 2  # [B, V]
    params = [SamplingParams(do_sample=True, temperature=t, top_k=k, top_p=p) for t, k, p in WARPS]
    generators = [torch.Generator().manual_seed(row) for row in range(len(WARPS))]
    want = torch.cat([warped_probs(logits[row : row + 1], *warp) for row, warp in enumerate(WARPS)])  # [B, V]
    want_logprobs = want.log().tolist()
    draws = 1500
    counts = torch.zeros_like(want)
    for _ in range(draws):
        picked, logprobs, _ = sample(logits, params, generators)
        for row, (token, logprob) in enumerate(zip(picked, logprobs)):
            assert abs(logprob - want_logprobs[row][token]) < 1e-5
            counts[row, token] += 1
    assert (counts / draws - want).abs().max() < 0.055  # over 4 standard deviations at p = 0.5


def test_the_smallest_temperature_samples_the_most_likely_token():
    """Large logits over a temperature near float32's smallest normal number overflowed to inf and
    left no distribution (a 500 from the server); shifted by the row's maximum they cannot."""
    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(5)) * 30  # [B, V]
    for temperature in (MIN_TEMPERATURE, 1e-30, 1e-5):
        params = [SamplingParams(do_sample=True, temperature=temperature)] * 3
        picked, _, errors = sample(logits, params, [torch.Generator().manual_seed(r) for r in range(3)])
        assert errors == {} and picked == logits.argmax(dim=-1).tolist(), temperature


def test_a_row_with_no_distribution_fails_alone_and_the_others_draw_as_without_it():
    """Logits with no finite maximum, NaN logits or a failing processor fail their own row, before
    any row draws: the others take the tokens their generators give without the failed rows."""
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(2)) * 20  # [B, V]
    logits[1] = float("-inf")
    logits[3, 7] = float("nan")
    ok = SamplingParams(do_sample=True, temperature=0.9, top_k=10)
    params = [ok] * 5

    def failing(scores: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("processor bug")

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(row) for row in range(5)]

    picked, _, errors = sample(logits, params, generators(), [None, None, None, None, failing])
    assert sorted(errors) == [1, 3, 4]
    assert "no finite maximum" in errors[1]
    assert "NaN" in errors[3] and "processor bug" in errors[4]
    healthy, _, none = sample(logits[[0, 2]], [ok, ok], [generators()[0], generators()[2]])
    assert none == {} and [picked[0], picked[2]] == healthy
    # Scores of another shape than the logits' row (a column dropped; one row as 1-D) fail their row.
    for chosen, failed in ((ok, [1, 3, 4]), (SamplingParams(), [1, 4])):  # (greedy takes a NaN as argmax does)
        picked, _, errors = sample(logits, [chosen] * 5, generators(),
                                   [None, lambda s: s[:, :-1], None, None, lambda s: s[0]])
        assert sorted(errors) == failed and "returned (1, 49), not scores [1, 50]" in errors[1]
        assert "returned (50,)" in errors[4]


def test_a_session_whose_sampling_fails_ends_alone_with_its_error():
    ref, model = tiny_pair()
    want = reference(ref, PROMPTS[0], 6)
    engine = Engine(model)
    good = engine.add(PROMPTS[0], SamplingParams(max_new_tokens=6))

    def failing(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > len(PROMPTS[1]) + 1:
            raise RuntimeError("processor bug")
        return scores

    bad = engine.add(PROMPTS[1], SamplingParams(max_new_tokens=6), logits_processor=failing)
    engine.run()
    assert good.generated == want and good.error is None
    assert bad.finish_reason == "error" and "processor bug" in bad.error and len(bad.generated) == 2
    assert not engine.running and model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()
    # Its scores decide the tokens: warpers in its params would be silently ignored, so they are refused.
    for warper in ({"top_k": 1}, {"top_p": 0.5}, {"temperature": 0.7}):
        with pytest.raises(ValueError, match="put the warpers in the processor"):
            engine.add(PROMPTS[1], SamplingParams(max_new_tokens=6, do_sample=True, **warper), logits_processor=failing)
    for not_callable in ("abc", [failing]):  # refused when added, not at its first step
        with pytest.raises(TypeError, match="logits_processor must be a callable"):
            engine.add(PROMPTS[1], SamplingParams(max_new_tokens=6), logits_processor=not_callable)
    assert not engine.has_work
    # Greedy search ignores the warpers' settings whatever they are, with a processor too.
    engine.add(PROMPTS[1], SamplingParams(max_new_tokens=2, temperature=0.0), logits_processor=lambda ids, s: s)
    engine.run()


def test_a_step_that_fails_after_recording_a_session_fails_that_one_with_its_error(monkeypatch):
    """A batched step whose cache bookkeeping fails part-way, after its forward, has recorded some
    sessions as computed: their outputs went with the step, so they fail with its error; the
    others run again alone and give transformers' answers."""
    ref, model = tiny_pair()
    want = [reference(ref, prompt, 4) for prompt in PROMPTS[:3]]
    failed = []

    def part_way(manager, seqs, hidden, batch):
        if len(seqs) > 1 and not failed:
            failed.append(seqs[0])
            manager.mark_computed(seqs[0])
            raise MemoryError("recording the step")
        real(manager, seqs, hidden, batch)

    real = runner_module.mark_step_computed
    monkeypatch.setattr(runner_module, "mark_step_computed", part_way)
    sessions = Engine(model).generate(PROMPTS[:3], SamplingParams(max_new_tokens=4))
    lost = next(s for s in sessions if s.seq is failed[0])
    assert lost.status == RequestStatus.FAILED and lost.error == "forward failed: MemoryError('recording the step')"
    for session, tokens in zip(sessions, want):
        if session is not lost:
            assert session.status == RequestStatus.FINISHED and session.generated == tokens
    model.prefix_cache.check_integrity()
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_a_runner_that_fails_between_steps_fails_every_session(monkeypatch):
    """A runner whose cache is out of reach (a grid whose stage died) fails the running and the
    waiting sessions at the next step, which raises its error: none is left waiting for ever."""
    _, model = tiny_pair()
    engine = Engine(model)
    running = engine.add(PROMPTS[0], SamplingParams(max_new_tokens=6))
    engine.step()
    waiting = engine.add(PROMPTS[1], SamplingParams(max_new_tokens=6))
    manager = model.prefix_cache

    def failed(runner):
        raise RuntimeError("the grid has failed and serves nothing more")

    monkeypatch.setattr(type(model.runner), "prefix_cache", property(failed))
    with pytest.raises(RuntimeError, match="the grid has failed"):
        engine.step()  # (a runner that has not failed: a passing error, the sessions kept)
    assert engine.has_work and waiting.status != RequestStatus.FAILED
    monkeypatch.setattr(model.runner, "failure", "stage 1: the link failed")
    with pytest.raises(RuntimeError, match="the grid has failed"):
        engine.step()
    assert [s.status for s in (running, waiting)] == [RequestStatus.FAILED] * 2
    assert "the runner failed" in waiting.error and not engine.has_work
    assert manager.stats()["live_sessions"] == 0
    manager.check_integrity()


def test_an_error_while_tokens_are_recorded_fails_the_unfinished_sessions_once(monkeypatch):
    """An error after the forward (here recording B's second token, after A finished with its
    third in the same step) would leave the step half done: every session not yet ended fails,
    and A keeps its finish."""
    ref, model = tiny_pair()
    engine = Engine(model)
    a = engine.add(PROMPTS[0], SamplingParams(max_new_tokens=3))
    b = engine.add(PROMPTS[1], SamplingParams(max_new_tokens=4))
    record = Session.add_token

    def failing(self, token, logprob, now):
        if self is b and len(self.generated) == 1:
            raise RuntimeError("recording failed")
        return record(self, token, logprob, now)

    monkeypatch.setattr(Session, "add_token", failing)
    with pytest.raises(RuntimeError, match="recording failed"):
        engine.run()
    assert a.status == RequestStatus.FINISHED and a.generated == reference(ref, PROMPTS[0], 3)
    assert b.status == RequestStatus.FAILED and "recording failed" in b.error
    assert not engine.has_work and model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()
    monkeypatch.undo()
    assert engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=4))[0].generated == reference(ref, PROMPTS[1], 4)


def test_too_small_a_temperature_float_ids_or_more_choices_than_can_run_are_refused():
    with pytest.raises(ValueError, match="temperature must be at least"):
        SamplingParams(do_sample=True, temperature=1e-300)
    _, model = tiny_pair()
    engine = Engine(model, max_running=2)
    with pytest.raises(ValueError, match="n = 3 choices run at once"):
        engine.add(PROMPTS[0], SamplingParams(max_new_tokens=2), n=3)
    with pytest.raises(TypeError, match="token ids must be integers, got 5.5"):
        engine.add([5.5, 6.0], SamplingParams(max_new_tokens=2))
    for mask in ([5, True], torch.tensor([True, False])):  # bools are ints to Python: a mask passed as ids
        with pytest.raises(TypeError, match="token ids must be integers, got True"):
            engine.add(mask, SamplingParams(max_new_tokens=2))
    assert not engine.has_work
    assert len(engine.add(PROMPTS[0], SamplingParams(max_new_tokens=2, do_sample=True), n=2).forks) == 1
    for stops in (190, None, "2", (1.5,), (-1,)):  # a later membership test would fail mid-step
        with pytest.raises(ValueError, match="stop_token_ids must be a tuple of token ids"):
            SamplingParams(stop_token_ids=stops)
    assert SamplingParams(stop_token_ids=[2, 3]).stop_token_ids == (2, 3)
    for params in ({"max_new_tokens": 3}, 5, "greedy", 0):  # (0 is not None: not the defaults)
        for call in (engine.add, engine.check):
            with pytest.raises(TypeError, match="params must be a SamplingParams"):
                call(PROMPTS[0], params)
    for name in ("temperature", "top_p"):
        for bad in ("0.5", None, True):
            with pytest.raises(TypeError, match=f"{name} must be a number, got {bad!r}"):
                SamplingParams(do_sample=True, **{name: bad})
    for name in ("max_new_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"):  # a bool is no count or seed
        with pytest.raises(ValueError, match=f"{name} must be .*got True"):
            SamplingParams(**{name: True})
    with pytest.raises(ValueError, match="n must be a positive integer, got True"):
        engine.add(PROMPTS[0], SamplingParams(max_new_tokens=2), n=True)


def test_engine_generate_refusing_one_prompt_queues_none():
    _, model = tiny_pair()
    engine = Engine(model)
    with pytest.raises(ValueError, match="token id 999 is outside the vocabulary"):
        engine.generate([PROMPTS[0], PROMPTS[1], [2, 999]], SamplingParams(max_new_tokens=2))
    assert not engine.has_work
    assert [len(s.generated) for s in engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=2))] == [2]
    assert model.prefix_cache.stats()["lookup_tokens"] == len(PROMPTS[2])  # the refused call's prompts never ran


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


def test_a_request_that_cannot_fit_beside_blocks_held_elsewhere_does_not_hold_back_one_that_fits():
    _, model = tiny_pair(num_blocks=16)
    holder = model.prefix_cache.admit(tokens(30, 40))  # 10 of the 16 blocks
    engine = Engine(model)
    big = engine.add(tokens(1, 20), SamplingParams(max_new_tokens=10))  # 8 blocks: waits for the holder
    small = engine.add(tokens(2, 5), SamplingParams(max_new_tokens=3))  # 2 blocks: fits now
    with pytest.raises(OutOfBlocksError, match=f"request {big.request_id} does not fit.*held elsewhere"):
        engine.run()  # the small one runs to its end first; then nothing runs and the big one cannot start
    assert len(small.generated) == 3 and not big.done
    model.prefix_cache.release(holder, commit=False)
    engine.run()
    assert len(big.generated) == 10
    model.prefix_cache.check_integrity()


def _interrupt_at(function, text: str) -> Callable:
    """A trace function that raises KeyboardInterrupt (as a SIGINT handler does, between two
    statements) when ``function`` reaches its line holding ``text``, once."""
    lines, first = inspect.getsourcelines(function)
    target = first + next(i for i, line in enumerate(lines) if text in line)
    armed = [True]

    def local(frame, event, arg):
        if armed[0] and event == "line" and frame.f_lineno == target:
            armed[0] = False
            raise KeyboardInterrupt
        return local

    return lambda frame, event, arg: local if frame.f_code is function.__code__ else None


@pytest.mark.parametrize("where", ["admitted, not yet running", "forked, not yet running"])
def test_an_interrupt_between_taking_a_session_and_running_it_leaves_nothing_held(where):
    _, model = tiny_pair()
    engine = Engine(model)
    session = engine.add(tokens(1, 9), SamplingParams(max_new_tokens=4), n=2)
    trace = (_interrupt_at(Scheduler._admit, "waiting.remove(session)") if where.startswith("admitted")
             else _interrupt_at(Engine._complete_step, "running.append(fork)"))
    sys.settrace(trace)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.run()
    finally:
        sys.settrace(None)
    engine.abort("interrupted")  # what generate_batch does on any exception
    assert all(s.done and s.finish_reason == "error" for s in [session, *session.forks])
    assert not engine.has_work and model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()


def test_an_engine_dropped_with_sessions_running_gives_their_blocks_back():
    """A stepping loop left between two steps (an interrupted notebook cell), the engine dropped:
    its running sessions' blocks and prefix locks return when it is collected, as a dropped
    ``generate()`` cache's do, and a request that needs the whole pool runs next."""
    _, model = tiny_pair(block_size=4, num_blocks=40)
    manager = model.prefix_cache
    engine = Engine(model)
    for seed in (1, 2, 3):
        engine.add(tokens(seed, 9), SamplingParams(max_new_tokens=30))
    engine.step()
    engine.step()
    assert manager.stats()["live_sessions"] == 3
    del engine
    gc.collect()
    whole_pool = tokens(4, 100)  # 25 blocks, + 15 for its new tokens: all 40
    (session,) = Engine(model).generate([whole_pool], SamplingParams(max_new_tokens=60))
    assert session.finish_reason == "length"
    assert manager.stats()["live_sessions"] == 0
    manager.check_integrity()
    assert manager.pool.num_free + manager.radix.evictable_blocks() == manager.pool.num_blocks  # nothing locked


def test_a_session_that_ends_before_a_failure_in_a_pipelined_step_is_returned_by_the_next(monkeypatch):
    _, model = tiny_pair()
    monkeypatch.setattr(runner_of(model), "pipeline_depth", 2)
    engine = Engine(model)
    first = engine.add(tokens(1, 9), SamplingParams(max_new_tokens=1))
    failing = engine.add(tokens(2, 9), SamplingParams(max_new_tokens=4))
    for seed in (3, 4):
        engine.add(tokens(seed, 9), SamplingParams(max_new_tokens=4))
    record = Session.add_token

    def add_token(self, token, logprob, now):
        if self is failing:
            raise RuntimeError("recording failed")
        return record(self, token, logprob, now)

    monkeypatch.setattr(Session, "add_token", add_token)
    returned = []
    with pytest.raises(RuntimeError, match="recording failed"):
        while engine.has_work:
            returned += engine.step()
    monkeypatch.setattr(Session, "add_token", record)
    returned += engine.step()
    assert first in returned and first.finish_reason == "length"
    assert model.prefix_cache.stats()["live_sessions"] == 0


def test_a_session_that_ends_in_a_step_that_raises_is_returned_by_the_next():
    _, model = tiny_pair(num_blocks=8)
    engine = Engine(model)
    running = engine.add(tokens(32, 4), SamplingParams(max_new_tokens=3))  # 2 blocks
    engine.step()
    holder = model.prefix_cache.admit(tokens(30, 17))  # 5 blocks
    waiting = engine.add(tokens(31, 10), SamplingParams(max_new_tokens=4))  # 4 blocks: 3 are free once `running` ends
    engine.cancel(running)
    with pytest.raises(OutOfBlocksError, match="held elsewhere"):
        engine.step()  # ends `running` (cancelled), then cannot admit `waiting`
    model.prefix_cache.release(holder, commit=False)
    assert engine.step() == [running] and running.finish_reason == "cancelled"
    engine.run()
    assert len(waiting.generated) == 4
    model.prefix_cache.check_integrity()


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
    # All the first turn computed (its last token is never fed back): its full blocks shared, its
    # last, partly filled block copied from the tail it left.
    assert second.num_cached_tokens == len(first.prompt_ids) + 9 - 1
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

    def call(i: int) -> Callable[[], list[list[int]]]:
        prompts = [PROMPTS[i], PROMPTS[(i + 1) % 4]]
        return lambda: [r.generated_tokens for r in model.generate_batch(prompts, max_new_tokens=6).values()]

    for i, got in enumerate(run_in_threads([call(i) for i in range(4)])):
        assert got == [reference(ref, PROMPTS[j % 4], 6) for j in (i, i + 1)]
    model.prefix_cache.check_integrity()


def test_an_engine_stepping_in_one_thread_while_generate_runs_in_another():
    ref, model = tiny_pair()
    engine = Engine(model)
    sessions = [engine.add(p, SamplingParams(max_new_tokens=8)) for p in PROMPTS[:3]]

    def step_engine() -> list[list[int]]:
        engine.run()
        return [s.generated for s in sessions]

    def call_generate() -> list[list[int]]:
        return [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p) :].tolist()
                for p in PROMPTS[1:]]

    stepped, generated = run_in_threads([step_engine, call_generate])
    assert stepped == [reference(ref, p, 8) for p in PROMPTS[:3]]
    assert generated == [reference(ref, p, 8) for p in PROMPTS[1:]]
    model.prefix_cache.check_integrity()


def test_abort_from_another_thread_waits_for_the_step_in_progress():
    """``abort`` from a watchdog thread while a step is between its forward and its commit: it waits
    for that step (the runner's lock), so no block it gives back is still being written or committed
    (it gave them back under the step: 'incref of free block', sessions FINISHED with an error)."""
    ref, model = tiny_pair(num_blocks=256)
    engine = Engine(model)
    mid_step, steps = threading.Event(), [0]

    def slow_third_step(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        steps[0] += 1
        if steps[0] == 3:
            mid_step.set()
            time.sleep(0.3)  # the watchdog's abort arrives now
        return scores

    sessions = [engine.add(PROMPTS[0], SamplingParams(max_new_tokens=40), logits_processor=slow_third_step)]
    sessions += [engine.add(p, SamplingParams(max_new_tokens=40)) for p in PROMPTS[1:]]

    def watchdog() -> None:
        assert mid_step.wait(60)
        engine.abort("watchdog")

    run_in_threads([engine.run, watchdog])
    assert all(s.status == RequestStatus.FAILED and s.error == "watchdog" for s in sessions)
    assert not engine.has_work and model.prefix_cache.stats()["live_sessions"] == 0
    model.prefix_cache.check_integrity()
    assert [s.generated for s in Engine(model).generate(PROMPTS, SamplingParams(max_new_tokens=6))] == \
        [reference(ref, p, 6) for p in PROMPTS]


def test_eviction_of_cached_prefixes_while_sessions_decode():
    """A small pool full of cached prefixes: sessions admitted while others decode evict them, and
    every session still gives transformers' greedy tokens."""
    ref, model = tiny_pair(num_blocks=16)
    warm = [tokens(60 + i, 12) for i in range(4)]  # 3 blocks each: 12 of the 16 blocks end up cached
    model.generate_batch(warm, max_new_tokens=1)
    assert model.prefix_cache.stats()["cached_blocks"] == 12
    engine = Engine(model)
    first = [engine.add(warm[3] + tokens(70, 6), SamplingParams(max_new_tokens=12)),  # hits warm[3]: 8 blocks
             engine.add(tokens(71, 5), SamplingParams(max_new_tokens=8))]  # 3 blocks
    engine.step()
    later = [engine.add(tokens(72 + i, 9), SamplingParams(max_new_tokens=6)) for i in range(3)]  # 4 blocks each
    evicted_while_decoding = False
    while engine.has_work:
        decoding = [s for s in engine.running if s.status == RequestStatus.DECODING]
        evicted = model.prefix_cache.stats()["evicted_blocks"]
        engine.step()
        evicted_while_decoding |= bool(decoding) and model.prefix_cache.stats()["evicted_blocks"] > evicted
        model.prefix_cache.check_integrity()
    assert evicted_while_decoding
    assert first[0].num_cached_tokens == 12
    for s in first + later:
        assert s.status == RequestStatus.FINISHED and s.generated == reference(ref, s.prompt, s.params.max_new_tokens)


def test_choices_wait_for_blocks_their_own_cached_prefix_cannot_give():
    """Admission pins the request's cached prefix, so those blocks cannot also pay for its choices:
    an n = 3 request waits for a running session rather than having a choice fail for want of blocks."""
    _, model = tiny_pair(num_blocks=16)
    engine = Engine(model)
    prefix = tokens(40, 16)
    engine.add(prefix + [5], SamplingParams(max_new_tokens=1))
    engine.run()  # the prefix's 4 blocks are cached, unlocked
    running = engine.add(tokens(41, 4), SamplingParams(max_new_tokens=13))
    engine.step()
    choices = engine.add(prefix + [11, 12], SamplingParams(max_new_tokens=9, do_sample=True, seed=3), n=3)
    engine.run()
    for session in (running, choices, *choices.forks):
        assert session.error is None and session.finish_reason == "length" and len(session.generated) > 0
    assert choices.admitted_time >= running.finished_time
    model.prefix_cache.check_integrity()


def test_more_logprobs_than_the_vocabulary_are_refused_at_add():
    _, model = tiny_pair()  # a vocabulary of 256
    engine = Engine(model)
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=f"{name} = 300 alternatives, but the vocabulary has 256 tokens"):
            engine.add(PROMPTS[0], SamplingParams(max_new_tokens=2, **{name: 300}))
    assert not engine.has_work
    ok = engine.add(PROMPTS[0], SamplingParams(max_new_tokens=2, logprobs=256))
    engine.run()
    assert len(ok.generated) == 2


def test_a_chunked_prompt_counts_whole_in_the_hit_rate():
    _, model = tiny_pair()
    prompt = tokens(42, 100)
    engine = Engine(model, max_batch_tokens=16)  # the prompt is admitted in 16-token chunks
    engine.add(prompt, SamplingParams(max_new_tokens=2))
    engine.run()
    stats = model.prefix_cache.stats()
    assert (stats["lookup_tokens"], stats["hit_tokens"]) == (100, 0)
    engine.add(prompt + [5, 6], SamplingParams(max_new_tokens=2))
    engine.run()
    stats = model.prefix_cache.stats()
    assert (stats["lookup_tokens"], stats["hit_tokens"]) == (202, 100)


def test_generate_batch_refuses_a_max_length_the_prompt_already_reaches():
    _, model = tiny_pair()
    with pytest.raises(ValueError, match="a prompt of 5 tokens leaves nothing to generate under max_length=5"):
        model.generate_batch([PROMPTS[0][:5]], max_length=5)
    out = model.generate_batch([PROMPTS[0][:5]], max_length=7)
    assert len(next(iter(out.values())).generated_tokens) == 2


@pytest.mark.parametrize(("setting", "message"), [
    ({"max_batch_tokens": 0}, "max_batch_tokens must be a positive integer, got 0"),
    ({"max_running": 2.5}, "max_running must be a positive integer, got 2.5"),
    ({"max_overtakes": -1}, "max_overtakes must be a non-negative integer, got -1"),
    ({"max_running": True}, "max_running must be a positive integer, got True"),
])
def test_scheduler_limits_are_refused_by_name(setting, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(**setting)


def test_k_v_a_nan_reached_are_never_reused():
    """With rms_norm_eps=0, the pad id's zero embedding row turns NaN, and attention carries the
    NaN to every K/V of its forward, the earlier positions' too (a masked-out probability of 0
    times a NaN value is NaN), in transformers as in Trellis: that session's blocks serve no
    other prompt, through the model or the engine."""
    ref, model = tiny_pair(config=tiny_config(rms_norm_eps=0.0))
    assert not ref.model.embed_tokens.weight[0].any()
    poisoned, clean = [5, 6, 7, 8, 0, 9], [5, 6, 7, 8, 10, 11, 12]  # the first block full: shareable
    with torch.no_grad():
        assert model(torch.tensor([poisoned])).logits[0, -1].isnan().all()
        torch.testing.assert_close(model(torch.tensor([clean])).logits, ref(torch.tensor([clean])).logits)
    assert model.prefix_cache.stats()["hit_tokens"] == 0
    model.prefix_cache.reset()
    engine = Engine(model)
    engine.generate([poisoned], SamplingParams(max_new_tokens=2))
    [session] = engine.generate([clean], SamplingParams(max_new_tokens=4))
    assert session.generated == ref.generate(torch.tensor([clean]), max_new_tokens=4, do_sample=False)[0, 7:].tolist()
    assert model.prefix_cache.stats()["hit_tokens"] == 0
    model.prefix_cache.check_integrity()

