"""The grid: stages in separate processes over loopback (gloo, one thread each) compute what one
process does — the same greedy tokens, scores and prefix hits — and fail cleanly when a stage
dies, hangs or differs. Tests of what a grid computes run its stages as threads of the test
process (``grid_in_process``), over the same loopback; those of the stage processes, their
commands and their failures start them (``LocalGrid``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx2 as httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, LlamaModel

from tests.models import smollm2_dir, smollm2_tokenizer, tiny_config
from tests.test_quantized_linear import write_tiny_gguf
from trellis import Engine, SamplingParams, cli
from trellis.cache.manager import KVCacheManager
from trellis.cli import SYSTEM_PROMPT
from trellis.eval.scoring import score_continuations
from trellis.grid import (
    GridError,
    GridOptions,
    GridRunner,
    LocalGrid,
    devices,
    launch,
    parse_layers,
    shared_host_environment,
    split_by_memory,
)
from trellis.grid import local as local_grid
from trellis.grid import stage as stage_module
from trellis.grid.launch import StageIdentity, identity, plan_grid, start_coordinator, start_stage
from trellis.grid.rendezvous import Endpoint, connect, free_port
from trellis.grid.shared_host import SHARED_HOST_SPIN_COUNT
from trellis.grid.stage import load_stage_model, run_stage, stage_state_dict
from trellis.grid.transport import StepPlan
from trellis.models.embedded import embedded_gguf_path
from trellis.models.llama import TrellisLlama
from trellis.models.loading import DtypeChoice, preferred_dtype

BLOCK = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(tiny_config(num_hidden_layers=6)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def other_tiny_dir(tmp_path_factory) -> str:
    torch.manual_seed(1)  # same shapes, other weights
    path = tmp_path_factory.mktemp("other")
    LlamaForCausalLM(tiny_config(num_hidden_layers=6)).save_pretrained(path)
    return str(path)


def shared_prefix_prompts(n: int, prefix_len: int, suffix_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (prefix_len,), generator=g).tolist()
    return [prefix + torch.randint(3, vocab, (suffix_len,), generator=g).tolist() for _ in range(n)]


def run_engine(runner_or_model, prompts, max_new_tokens: int) -> tuple[list[list[int]], dict]:
    engine = Engine(runner_or_model, max_batch_tokens=64)  # small: chunked prefill crosses the grid too
    sessions = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
    assert all(s.error is None for s in sessions), [s.error for s in sessions]
    return [s.generated for s in sessions], engine


def options(path: str, **overrides) -> GridOptions:
    settings = {"block_size": BLOCK, "num_blocks": 256, "threads": 1, "step_timeout": 20, "start_timeout": 120}
    return GridOptions(model=path, **{**settings, **overrides})


@contextlib.contextmanager
def grid_in_process(options: GridOptions, stages: int) -> Iterator[GridRunner]:
    """A grid whose stages are threads of this process, over loopback as a ``LocalGrid``'s: for the
    tests of what a grid computes, without a stage process's start-up (~5 s of imports each). The
    stage processes themselves are tested with ``LocalGrid``."""
    endpoint, threads, failures = Endpoint(0, stages, "127.0.0.1", free_port()), torch.get_num_threads(), []
    # One stage loads at a time: transformers' from_pretrained is not thread-safe (it patches how
    # every module is built, process-wide, to build on the meta device while it loads).
    load, loading = launch.load_stage_model, threading.Lock()

    def load_alone(*args, **kwargs) -> TrellisLlama:
        with loading:
            return load(*args, **kwargs)

    def serve(rank: int) -> None:
        try:
            code = run_stage(start_stage(options, Endpoint(rank, stages, "127.0.0.1", endpoint.master_port)))
        except Exception as exc:  # noqa: BLE001 -- reported by the test, not lost in a thread
            failures.append(f"stage {rank}: {type(exc).__name__}: {exc}")
        else:
            if code != 0:
                failures.append(f"stage {rank} stopped with status {code}")

    workers = [threading.Thread(target=serve, args=(rank,), daemon=True) for rank in range(1, stages)]
    launch.load_stage_model = load_alone
    for worker in workers:
        worker.start()
    runner = None
    try:
        runner = start_coordinator(options, endpoint)
        yield runner
    finally:
        if runner is not None:
            runner.close()
        for worker in workers:
            worker.join(30)
        torch.set_num_threads(threads)  # (--threads set it for every stage)
        launch.load_stage_model = load
    assert not failures and not any(worker.is_alive() for worker in workers), failures


# --- placement and messages ------------------------------------------------------------------

def test_parse_layers():
    assert [list(r) for r in parse_layers("0-1,2-5", 6, 2).ranges] == [[0, 1], [2, 3, 4, 5]]
    assert parse_layers("0,1-5", 6, 2).spec() == "0-0,1-5"
    for spec, error in [("0-2,3-4", "covers layers 0-4"), ("0-2,4-5", "starting at layer 3"), ("0-5", "names 1"),
                        ("0-x,3-5", "not a range"), ("3-2,3-5", "non-empty"),
                        ("0-6,6-5", "stage 0's '0-6' goes past the model's last layer, 5")]:
        with pytest.raises(ValueError, match=error):
            parse_layers(spec, 6, 2)


def test_split_by_memory_weighs_the_embedding_and_the_memory():
    # SmolLM2 in fp32: 14 MB a layer, 113 MB of tied embedding on stage 0.
    assert split_by_memory(30, 14_000_000, 113_000_000, [1, 1]).spec() == "0-10,11-29"
    assert split_by_memory(8, 10, 0, [1, 1]).spec() == "0-3,4-7"
    assert split_by_memory(8, 10, 0, [3, 1]).spec() == "0-5,6-7"
    assert split_by_memory(3, 10, 10_000, [1, 1, 1]).spec() == "0-0,1-1,2-2"  # every stage keeps a layer
    with pytest.raises(ValueError, match="each stage needs a layer"):
        split_by_memory(2, 10, 0, [1, 1, 1])


def test_a_stage_running_other_trellis_sources_is_named():
    """Checkouts at other commits share a version string: the stages compare their sources' digest."""
    mine = identity(GridOptions(block_size=BLOCK, num_blocks=64), torch.device("cpu"), 2)
    assert mine.code_digest == identity(GridOptions(block_size=BLOCK, num_blocks=64), torch.device("cpu"), 2).code_digest
    other = dataclasses.replace(mine, code_digest="0" * 32)
    (difference,) = mine.differences(other)
    assert difference.startswith(f"code_digest: {mine.code_digest} on the coordinator, {'0' * 32} here (the stages "
                                 "run other Trellis sources")


def test_a_cuda_stage_pool_leaves_room_for_the_stage_weights():
    """A stage reports its free memory before it loads its layers; on CUDA the default KV budget is
    half of what is free once the weights are in (as in one process), so the plan takes each
    stage's weights off first (it sized the pools from the memory before loading: a pool and the
    weights could exceed the GPU)."""
    config = tiny_config(num_hidden_layers=6)
    options = GridOptions(block_size=BLOCK, device="cpu")  # (the options' device is not what is planned)
    dtype_bytes = 4
    free = 4 << 20

    def stage(host: str, device_type: str) -> StageIdentity:
        return StageIdentity("t", "c", "t", "t", "d", "float32", BLOCK, device_type, world_size=2, linear_kernel=None,
                             layers=None, num_blocks=None, free_memory=free, kv_budget=free // 2, host=host)

    placement, num_blocks = plan_grid(options, config, [stage("a", "cuda"), stage("b", "cuda")])
    per_block = [launch.kv_bytes_per_block(config, BLOCK, len(r), torch.float32) for r in placement.ranges]
    stage0 = sum(p.numel() for n, p in LlamaForCausalLM(config).named_parameters()
                 if n.startswith(("model.embed_tokens", "lm_head")) or any(f"layers.{i}." in n for i in placement.ranges[0]))
    assert stage0 * dtype_bytes + num_blocks * per_block[0] <= free
    assert num_blocks * per_block[0] <= (free - stage0 * dtype_bytes) // 2 + per_block[0]  # half of what is left
    # On the CPU the reported budget stands (its default is capped and read as one process reads it).
    assert plan_grid(options, config, [stage("a", "cpu"), stage("b", "cpu")])[1] == (free // 2) // max(per_block)


def test_stages_on_one_machine_split_the_layers_alike_whenever_they_read_its_memory():
    """Each stage process reads free memory at its own moment; on one machine they share it, so
    the split takes one reading for all of them and does not change from launch to launch."""
    config = tiny_config(num_hidden_layers=6)
    options = GridOptions(block_size=BLOCK, num_blocks=64)

    def stage(host: str, free: int) -> StageIdentity:
        return StageIdentity("t", "c", "t", "t", "d", "float32", BLOCK, "cpu", world_size=2, linear_kernel=None, layers=None, num_blocks=None,
                             free_memory=free, kv_budget=1 << 30, host=host)

    alike = plan_grid(options, config, [stage("a", 1000), stage("a", 1000)])[0]
    assert plan_grid(options, config, [stage("a", 1000), stage("a", 1900)])[0] == alike
    assert plan_grid(options, config, [stage("a", 1000), stage("a", 400)])[0] == alike
    assert plan_grid(options, config, [stage("a", 1000), stage("b", 4000)])[0] != alike  # other machines: by memory


def test_step_plan_round_trip():
    plan = StepPlan(torch.tensor([5, 6, 7]), torch.tensor([0, 1, 9]), torch.tensor([0, 1, 13]),
                    torch.tensor([[0, 0, 0], [1, 2, 3]], dtype=torch.int32), [2, 10], [0, 2, 3], [(3, 4), (7, 9)])
    header, payload = plan.encode()
    assert StepPlan.payload_size(header) == payload.numel()
    back = StepPlan.decode(header, payload, torch.device("cpu"))
    for name in ("input_ids", "positions", "slot_mapping", "block_table"):
        assert torch.equal(getattr(back, name), getattr(plan, name)), name
    assert (back.seq_lens, back.cu_seqlens_q, back.copies) == (plan.seq_lens, plan.cu_seqlens_q, plan.copies)
    assert back.block_table.dtype == torch.int32


# --- the same answers as one process -----------------------------------------------------------

@pytest.mark.parametrize("stages", [2, 3])
def test_tiny_grid_matches_one_process(tiny_dir, stages):
    prompts = shared_prefix_prompts(4, 22, 5, 256)
    single = TrellisLlama.from_pretrained(tiny_dir, device="cpu", block_size=BLOCK, num_blocks=256)
    want, _ = run_engine(single, prompts, 10)
    want_again, _ = run_engine(single, prompts, 10)  # the second round hits the cache
    hits = single.prefix_cache.stats()["hit_tokens"]
    requests = [(p[:20], p[20:]) for p in prompts]
    want_scores = score_continuations(single, requests)
    reference = LlamaForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    want_hf = reference.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False)

    with LocalGrid(options(tiny_dir), stages=stages) as runner:
        assert len(runner.placement.ranges) == stages
        got, engine = run_engine(runner, prompts, 10)
        assert got == want
        got_again, _ = run_engine(runner, prompts, 10)
        assert got_again == want_again == want
        assert runner.prefix_cache.stats()["hit_tokens"] == hits  # with micro-batches, as in one process
        got_scores = score_continuations(runner.model, requests)
        assert [g for _, g in got_scores] == [g for _, g in want_scores]
        assert [s for s, _ in got_scores] == pytest.approx([s for s, _ in want_scores], abs=1e-4)
        # transformers' generate() on the coordinator's model runs on the grid too.
        out = runner.model.generate(torch.tensor([prompts[0]]), max_new_tokens=6, do_sample=False)
        assert torch.equal(out, want_hf)
        assert engine.peak_live_blocks > 0
        runner.prefix_cache.pool.check_integrity()


def test_prefix_hits_count_as_in_one_process(tiny_dir):
    prompts = shared_prefix_prompts(4, 30, 3, 256, seed=3)
    single = TrellisLlama.from_pretrained(tiny_dir, device="cpu", block_size=BLOCK, num_blocks=256)
    run_engine(single, prompts, 4)
    run_engine(single, prompts[:2], 4)
    with grid_in_process(options(tiny_dir, micro_batches=1), stages=2) as runner:
        run_engine(runner, prompts, 4)
        run_engine(runner, prompts[:2], 4)
        grid, one = runner.prefix_cache.stats(), single.prefix_cache.stats()
        assert {k: grid[k] for k in ("lookup_tokens", "hit_tokens", "cached_blocks")} == \
            {k: one[k] for k in ("lookup_tokens", "hit_tokens", "cached_blocks")}


def test_more_steps_than_stages_wait_their_turn_and_prefix_files_are_refused(tiny_dir, tmp_path):
    """Three lanes on two stages, and a forward while the engine's lanes are in flight: the
    coordinator takes the oldest step's output before sending one more than there are stages
    (which would deadlock the ring), and the answers are one process's. Prefix cache files, which
    would hold only the coordinator's layers, are refused by name."""
    prompts = shared_prefix_prompts(4, 22, 5, 256, seed=5)
    single = TrellisLlama.from_pretrained(tiny_dir, device="cpu", block_size=BLOCK, num_blocks=256)
    want, _ = run_engine(single, prompts, 8)
    with torch.no_grad():
        want_logits = single(torch.tensor([[5, 6, 7]])).logits
    with grid_in_process(options(tiny_dir, micro_batches=3, step_timeout=10), stages=2) as runner:
        got, _ = run_engine(runner, prompts, 8)
        assert got == want
        engine = Engine(runner)
        for prompt in prompts:
            engine.add(prompt, SamplingParams(max_new_tokens=8))
        for _ in range(4):
            engine.step()
        assert len(runner._in_flight) == 2  # as many as there are stages
        with torch.no_grad():
            logits = runner.model(torch.tensor([[5, 6, 7]])).logits
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
        while engine.has_work:
            engine.step()
        for method in (runner.model.save_prefix_cache, runner.model.load_prefix_cache):
            with pytest.raises(ValueError, match="not served by a grid"):
                method(tmp_path / "prefixes.safetensors")
        assert runner.failure is None


@pytest.fixture(scope="module")
def smollm2_answers() -> tuple[list[list[int]], list[list[int]], int]:
    """Chat prompts sharing a system prompt of about 90 tokens (whole blocks to share), and one
    process's greedy answers and prefix hits."""
    tokenizer = smollm2_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                              {"role": "user", "content": q}], add_generation_prompt=True,
                                             return_dict=False)
               for q in ("What is a radix tree?", "Name a prime number.", "Why is the sky blue?")]
    single = TrellisLlama.from_pretrained(smollm2_dir(), dtype=torch.float32, device="cpu", num_blocks=64)
    want, _ = run_engine(single, prompts, 12)
    hits = single.prefix_cache.stats()["hit_tokens"]
    assert hits > 0
    return prompts, want, hits


@pytest.mark.parametrize("stages", [2, 3])
def test_smollm2_grid_matches_one_process(smollm2_answers, stages):
    prompts, want, hits = smollm2_answers
    with grid_in_process(GridOptions(num_blocks=64, threads=1, step_timeout=60), stages=stages) as runner:
        got, _ = run_engine(runner, prompts, 12)
        assert got == want
        assert runner.prefix_cache.stats()["hit_tokens"] == hits


# --- failures --------------------------------------------------------------------------------

def manager_is_clean(manager: KVCacheManager) -> None:
    manager.pool.check_integrity()
    assert manager.stats()["live_sessions"] == 0
    stats = manager.stats()
    held = stats["cached_blocks"] + stats["tail_blocks"]
    assert manager.pool.num_free == manager.pool.num_blocks - held  # only the radix tree holds blocks


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_lost_stage_fails_the_requests_in_time_and_a_new_grid_serves(tiny_dir, how):
    prompts = shared_prefix_prompts(3, 14, 3, 256, seed=5)
    grid = LocalGrid(options(tiny_dir, step_timeout=3), stages=2)
    runner = grid.__enter__()
    try:
        engine = Engine(runner)
        sessions = [engine.add(p, SamplingParams(max_new_tokens=200)) for p in prompts]
        for _ in range(6):
            engine.step()
        cached_before = runner.prefix_cache.stats()["cached_blocks"]
        manager = runner.prefix_cache
        stage = grid.processes[0]
        os.kill(stage.pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        with contextlib.suppress(GridError):  # the engine raises it, or fails each session with it
            while engine.has_work:
                engine.step()
        assert time.monotonic() - started < 3 + 5
        assert all(s.error and "GridError" in s.error and "stage 1" in s.error for s in sessions), \
            [s.error for s in sessions]
        manager_is_clean(manager)
        assert manager.stats()["cached_blocks"] <= cached_before + len(prompts) * 2  # nothing past the lost step
        assert runner.failure is not None
        with pytest.raises(GridError, match="restart"):
            engine.add(prompts[0], SamplingParams(max_new_tokens=2))
    finally:
        started = time.monotonic()
        codes = grid.stop()  # the lost stage is not waited for the full 30 s
        stop_seconds = time.monotonic() - started
    assert stop_seconds < local_grid.FAILED_GRID_GRACE + 3 and codes == [-signal.SIGKILL]
    with LocalGrid(options(tiny_dir), stages=2) as runner:  # a restarted grid serves again
        single = TrellisLlama.from_pretrained(tiny_dir, device="cpu", block_size=BLOCK, num_blocks=256)
        assert run_engine(runner, prompts, 5)[0] == run_engine(single, prompts, 5)[0]


def test_lost_step_caches_nothing(tiny_dir):
    """The blocks of a step that never came back are neither cached nor leaked."""
    grid = LocalGrid(options(tiny_dir, step_timeout=3), stages=2)
    runner = grid.__enter__()
    try:
        manager = runner.prefix_cache
        prompt = shared_prefix_prompts(1, 16, 0, 256, seed=9)[0]
        os.kill(grid.processes[0].pid, signal.SIGKILL)
        grid.processes[0].wait()
        with pytest.raises(GridError):
            runner.forward_rows(manager, [], [prompt])
        assert manager.stats()["cached_blocks"] == 0
        manager_is_clean(manager)
    finally:
        grid.stop(timeout=10)


def test_dtype_auto_is_what_each_stage_runs_fastest(tiny_dir, tmp_path, monkeypatch):
    """--dtype auto: on the CPU preferred_dtype's choice, on a GPU the checkpoint's dtype (its weights'
    where its config names none), resolved when the options are made; a grid in it serves what one
    model does."""
    here = str(preferred_dtype("cpu").dtype).removeprefix("torch.")
    assert options(tiny_dir, dtype="auto", device="cpu").dtype == here
    monkeypatch.setattr(launch, "preferred_dtype", lambda device: DtypeChoice("auto", "a GPU"))
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(num_hidden_layers=2)).to(torch.bfloat16).save_pretrained(tmp_path)
    assert options(str(tmp_path), dtype="auto").dtype == "bfloat16"
    config = json.loads((tmp_path / "config.json").read_text())
    del config["dtype"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert options(str(tmp_path), dtype="auto").dtype == "bfloat16"  # named by none: its weights', as transformers'
    assert LlamaForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    monkeypatch.undo()
    prompts = shared_prefix_prompts(2, 40, 5, 256, seed=3)
    single = TrellisLlama.from_pretrained(tiny_dir, dtype=getattr(torch, here), device="cpu", block_size=BLOCK,
                                          num_blocks=256)
    with grid_in_process(options(tiny_dir, dtype="auto", device="cpu"), stages=2) as runner:
        assert runner.model.dtype == getattr(torch, here)
        assert run_engine(runner, prompts, 6)[0] == run_engine(single, prompts, 6)[0]


DTYPE_REFUSAL = ("dtype: float32 on the coordinator, bfloat16 here (--dtype auto chooses for each machine: give "
                 "every stage one --dtype)")


@pytest.mark.parametrize("field,value,named", [
    ("dtype", "bfloat16", DTYPE_REFUSAL), ("block_size", 8, "block_size"),
    ("linear_kernel", "blas", "linear_kernel: None on the coordinator, blas here"),
    ("layers", "0-1,2-5", "layers: None on the coordinator, 0-1,2-5 here (the coordinator places the layers"),
    ("num_blocks", 8, "num_blocks: 256 on the coordinator, 8 here (the coordinator sizes every stage's pool"),
])
def test_a_mismatched_stage_is_refused(tiny_dir, field, value, named):
    stage_options = dataclasses.replace(options(tiny_dir), **{field: value})
    if field != "dtype":  # the coordinator and the stage in this process: the handshake is what is tested
        refusal, stage_refusal = refused_in_process(options(tiny_dir), stage_options)
        assert named in refusal and stage_refusal == f"the coordinator refused this grid: {refusal}"
        return
    grid = LocalGrid(options(tiny_dir), stages=2, stage_options=stage_options)
    with pytest.raises(GridError, match=re.escape(named)):
        grid.__enter__()
    assert grid.stop(timeout=30) == [2]  # the stage command refused too (its usage-error status)


def refused_in_process(coordinator: GridOptions, stage: GridOptions) -> tuple[str, str]:
    """The refusals of a two-stage grid by its coordinator and by its stage, both started in this
    process (the stage in a thread): the handshake without a stage process's start-up."""
    endpoint, threads, refusals = Endpoint(0, 2, "127.0.0.1", free_port()), torch.get_num_threads(), []

    def join() -> None:
        try:
            start_stage(stage, Endpoint(1, 2, "127.0.0.1", endpoint.master_port))
        except GridError as exc:
            refusals.append(str(exc))

    thread = threading.Thread(target=join)
    thread.start()
    try:
        with pytest.raises(GridError) as refused:
            start_coordinator(coordinator, endpoint)
    finally:
        thread.join(60)
        torch.set_num_threads(threads)  # (--threads set it for both)
    assert not thread.is_alive() and len(refusals) == 1, refusals
    return str(refused.value), refusals[0]


def test_a_stage_of_another_grid_size_is_named_and_a_restarted_stage_joins(tiny_dir):
    """A stage started for another world size is named by the coordinator's handshake (the stage
    would otherwise fail on its own, leaving the coordinator to wait). A stage started again with
    the rank of one that left before the plan came (a wrong option fixed) joins in its place, and
    reads the plan. A stage without --layers takes the coordinator's placement."""
    mine = identity(options(tiny_dir, layers="0-2, 3-5"), torch.device("cpu"), 2)
    assert mine.layers == "0-2,3-5"
    theirs = dataclasses.replace(mine, world_size=3, layers=None)
    assert mine.differences(theirs) == ["world_size: 2 on the coordinator, 3 here"]
    endpoint = Endpoint(0, 2, "127.0.0.1", free_port())
    hosted = connect(endpoint, 30)  # the coordinator's rendezvous
    stage = Endpoint(1, 2, "127.0.0.1", endpoint.master_port)
    refusals = []

    def join() -> None:
        try:
            start_stage(options(tiny_dir, threads=None), stage)
        except GridError as exc:
            refusals.append(str(exc))

    stages = [threading.Thread(target=join) for _ in range(2)]  # the same rank, one after the other
    for number, thread in enumerate(stages, 1):
        hosted.delete_key("identity/1")
        thread.start()  # joins, then waits for the plan
        deadline = time.monotonic() + 60
        while not hosted.check(["identity/1"]):
            assert time.monotonic() < deadline, f"stage {number} never joined"
            time.sleep(0.05)
    hosted.set("plan", json.dumps({"error": "refused for the test"}))
    for thread in stages:
        thread.join(60)
    assert refusals == ["the coordinator refused this grid: refused for the test"] * 2 and hosted.check(["plan_read/1"])


def test_a_stage_that_exits_while_the_grid_starts_fails_the_start_at_once(tiny_dir, tmp_path):
    """A LocalGrid watches its stage processes while it waits for them to join and load: one that
    exits (here refused at once: its --model holds no model) fails the start within seconds, not
    after start_timeout."""
    grid = LocalGrid(options(tiny_dir, start_timeout=300), stages=2, stage_options=options(str(tmp_path)))
    started = time.monotonic()
    with pytest.raises(GridError, match="stage 1 exited with status 2 before the grid started"):
        grid.__enter__()
    assert time.monotonic() - started < 100
    assert grid.stop(timeout=30) == [2]


def test_a_checkpoint_missing_a_weight_is_refused_by_the_stage_that_holds_it(tiny_dir, tmp_path):
    """As one process refuses it, a stage refuses a checkpoint that lacks a weight of its own
    layers (it would run them randomly initialised): the coordinator by name, another stage by
    exiting before the grid starts."""
    path = tmp_path / "missing"
    shutil.copytree(tiny_dir, path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.4.mlp.down_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    named = r"lacks 1 weights of the model \(e\.g\. model\.layers\.4\.mlp\.down_proj\.weight\)"
    with pytest.raises(ValueError, match=named):
        TrellisLlama.from_pretrained(str(path), device="cpu")
    for layers, error, message in [("0-4,5-5", ValueError, named), ("0-2,3-5", GridError, "stage 1 exited")]:
        grid = LocalGrid(options(str(path), layers=layers), stages=2)
        with pytest.raises(error, match=message):
            grid.__enter__()
        grid.stop(timeout=30)


def test_the_coordinator_reads_the_checkpoints_generation_config(tiny_dir, tmp_path):
    """Stop tokens and sampling defaults from generation_config.json, as one process reads them."""
    path = tmp_path / "genconf"
    shutil.copytree(tiny_dir, path)
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 175],
                                                             "pad_token_id": 0, "temperature": 0.7}))
    single = TrellisLlama.from_pretrained(str(path), device="cpu")
    assert single.generation_config.eos_token_id == [1, 175]
    with grid_in_process(options(str(path)), stages=2) as runner:
        got = runner.model.generation_config
        assert (got.eos_token_id, got.temperature) == ([1, 175], 0.7) == \
            (single.generation_config.eos_token_id, single.generation_config.temperature)


def test_a_checkpoint_saved_from_the_base_model_gives_each_stage_its_own_layers(tmp_path):
    """Tensor names without the ``model.`` prefix (a ``LlamaModel``'s, the LM head tied), which
    transformers prefixes as it loads: each stage still takes its own layers."""
    torch.manual_seed(2)
    LlamaModel(tiny_config(num_hidden_layers=6, tie_word_embeddings=True)).save_pretrained(tmp_path)
    prompts = shared_prefix_prompts(2, 12, 5, 256, seed=4)
    single = TrellisLlama.from_pretrained(str(tmp_path), device="cpu", block_size=BLOCK, num_blocks=256)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        want = single(ids).logits
    with grid_in_process(options(str(tmp_path)), stages=2) as runner:
        with torch.no_grad():
            torch.testing.assert_close(runner.model(ids).logits, want, rtol=1e-5, atol=1e-5)
        assert run_engine(runner, prompts, 6)[0] == run_engine(single, prompts, 6)[0]


def test_a_gguf_grid_serves_what_one_process_does_and_reads_no_generation_config(tmp_path, monkeypatch):
    """A GGUF's stages cut the whole model down; stop tokens and sampling defaults come from its
    metadata alone, as transformers reads them (no generation_config.json beside it). Each stage
    parses the file once, for the config and its layers' weights."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 50], "temperature": 0.7}))
    single = TrellisLlama.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", device="cpu", block_size=BLOCK,
                                          num_blocks=256)
    prompts = shared_prefix_prompts(2, 12, 5, 96, seed=5)
    parsed, parse = [], gguf.GGUFReader.__init__
    monkeypatch.setattr(gguf.GGUFReader, "__init__", lambda self, path, *args: parsed.append(path) or
                        parse(self, path, *args))
    with grid_in_process(options(str(tmp_path), gguf_file="tiny.gguf"), stages=2) as runner:
        assert len(parsed) == 2  # one for each stage (here both in this process)
        got, want = runner.model.generation_config, single.generation_config
        assert (got.eos_token_id, got.temperature) == (want.eos_token_id, want.temperature) != ([2, 50], 0.7)
        assert run_engine(runner, prompts, 6)[0] == run_engine(single, prompts, 6)[0]


def test_a_stage_loads_extra_tensors_of_its_layers_as_one_process_and_refuses_misread_names(tiny_dir, tmp_path,
                                                                                           monkeypatch):
    path = tmp_path / "extra"
    shutil.copytree(tiny_dir, path)
    weights = load_file(path / "model.safetensors")
    save_file({**weights, "model.layers.4.self_attn.q_proj.bias": torch.zeros(64)}, path / "model.safetensors",
              metadata={"format": "pt"})
    TrellisLlama.from_pretrained(str(path), device="cpu")  # one process: loads, transformers reports the extra
    load_stage_model(str(path), range(3, 6), first=False, last=True, dtype=torch.float32, device=torch.device("cpu"))
    base = tmp_path / "base"
    LlamaModel(tiny_config(num_hidden_layers=6, tie_word_embeddings=True)).save_pretrained(base)
    monkeypatch.setattr(stage_module, "missing_base_prefix", lambda names: "")  # names read without transformers' prefix
    with pytest.raises(ValueError, match=r"tensors for layers outside the stage's 3 reached it as it loaded layers "
                                         r"3-5 \(e.g. '(model.)?layers.[345]"):
        load_stage_model(str(base), range(3, 6), first=False, last=True, dtype=torch.float32,
                         device=torch.device("cpu"))


def test_a_gguf_stage_keeps_no_whole_model_alive(tmp_path, monkeypatch):
    """A GGUF is loaded whole and cut down: the whole model is gone once the stage has its tensors
    (it and its runner refer to each other, so only a collection frees it)."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    wholes = []
    load = TrellisLlama.from_pretrained.__func__

    def remembered(cls, *args, **kwargs):
        model = load(cls, *args, **kwargs)
        if kwargs.get("gguf_file"):
            wholes.append(weakref.ref(model))
        return model

    monkeypatch.setattr(TrellisLlama, "from_pretrained", classmethod(remembered))
    state = stage_state_dict(str(tmp_path), range(1, 2), first=False, last=True, load_kwargs={"gguf_file": "tiny.gguf"})
    assert len(wholes) == 1 and wholes[0]() is None
    assert sorted({name.split(".")[2] for name in state if name.startswith("model.layers.")}) == ["0"]


def test_a_stage_rank_of_grid_serve_does_not_check_the_http_port(tiny_dir, capfd):
    """torchrun runs one command line on every machine: on a stage's rank, `trellis grid serve`
    serves no HTTP, so a --port in use there is no reason to refuse (here it goes on to the
    rendezvous, which no coordinator hosts, and says so in one line, with no C++ stack trace)."""
    with socket.socket() as held, socket.socket() as free:
        held.bind(("127.0.0.1", 0))
        held.listen()
        free.bind(("127.0.0.1", 0))
        busy, master = held.getsockname()[1], free.getsockname()[1]
        free.close()
        with pytest.raises(SystemExit) as exited:
            cli.main(["grid", "serve", "--rank", "1", "--world-size", "2", "--master-port", str(master), "--port",
                      str(busy), "--model", tiny_dir, "--start-timeout", "2"])
    assert exited.value.code == 2
    err = capfd.readouterr().err
    assert "cannot serve on" not in err and "cannot open the rendezvous" in err
    assert "is the coordinator, rank 0, started?" in err and "frame #" not in err and "[c10d]" not in err


def test_a_stage_started_before_the_coordinator_waits_for_its_store():
    """A stage may start first: it waits for the store, then joins it."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    hosted = []
    timer = threading.Timer(1.0, lambda: hosted.append(connect(Endpoint(0, 2, master_port=port), 30)))
    timer.start()
    try:
        store = connect(Endpoint(1, 2, master_port=port), 30)
        store.set("joined", "1")
        timer.join()
        assert hosted[0].get("joined") == b"1"
    finally:
        timer.cancel()


def test_a_stage_whose_rendezvous_port_holds_another_program_gives_up_in_time():
    """Something that accepts connections but is no store (another program on the port): the stage
    gives up within its start timeout, where TCPStore's client waited for an answer forever."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        started = time.monotonic()
        with pytest.raises(GridError, match="no Trellis rendezvous answered .* something else accepts connections"):
            connect(Endpoint(1, 2, master_port=other.getsockname()[1]), 2)
        assert time.monotonic() - started < 10


def test_a_grid_whose_port_another_program_holds_fails_to_start_in_time(tiny_dir):
    """The coordinator cannot host its store; its stage processes, which found something accepting
    connections there, are not waited for 30 s."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        grid = LocalGrid(options(tiny_dir), stages=2, port=other.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(torch.distributed.DistNetworkError, match="EADDRINUSE"):  # (the command says it in a line)
            grid.__enter__()
        assert time.monotonic() - started < local_grid.FAILED_GRID_GRACE + 10
        assert all(p.poll() is not None for p in grid.processes)


def test_a_stage_that_raises_says_so_in_one_line_and_exits_1(caplog):
    class Raising:  # a StageWorker whose step raised: its exception ended the stage with a traceback
        steps = 0

        def serve(self) -> None:
            raise RuntimeError("a step's input did not fit")

    with caplog.at_level("INFO", logger="trellis.grid"):
        assert run_stage(Raising()) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "this stage failed: RuntimeError: a step's input did not fit; it exits, and the grid with it (restart the grid)"]


def test_an_interrupted_step_fails_the_grid_at_once(tiny_dir):
    """Ctrl-C lands as a receive returns (it waits with the GIL released): the step's output is lost
    and the ring out of step, so the grid fails at once and stops without waiting step_timeout."""
    grid = LocalGrid(options(tiny_dir, step_timeout=30), stages=2)
    runner = grid.__enter__()
    receive = runner.link.recv_hidden

    def interrupted(*args, **kwargs):
        receive(*args, **kwargs)
        raise KeyboardInterrupt

    runner.link.recv_hidden = interrupted
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        runner.model(torch.tensor([[5, 6, 7]]))
    assert "interrupted" in runner.failure
    started = time.monotonic()
    grid.stop(timeout=30)
    assert time.monotonic() - started < 15


def test_a_stage_with_other_weights_is_refused(tiny_dir, other_tiny_dir):
    refusal, _ = refused_in_process(options(tiny_dir), options(other_tiny_dir))
    assert re.search(r"stage 1 \(.*\): model_digest: \w+ on the coordinator, \w+ here", refusal), refusal


@pytest.mark.parametrize(("override", "message"), [
    ({"block_size": 0}, "block_size must be a power of two"), ({"micro_batches": -1}, "micro_batches"),
    ({"micro_batches": 0}, "micro_batches"), ({"threads": 0}, "threads"), ({"step_timeout": -5}, "step_timeout"),
    ({"num_blocks": 0}, "num_blocks"),
    ({"step_timeout": float("inf")}, "step_timeout.*finite"), ({"start_timeout": float("nan")}, "start_timeout"), ({"device": "mps"}, "cannot run on MPS.*gloo"),
    ({"device": "gpu"}, "--device 'gpu' names no device"), ({"dtype": "fp16"}, "unknown dtype 'fp16'"),
    ({"dtype": "int8"}, "unknown dtype 'int8'")])
def test_bad_options_are_refused_before_any_stage_starts(tiny_dir, override, message):
    with pytest.raises(ValueError, match=message):
        options(tiny_dir, **override)


@pytest.mark.parametrize(("stages", "layers", "message"), [
    (7, None, "7 stages for a model of 6 layers"), (2, "0-2,3-4", "covers layers 0-4; the model has 6"),
    (2, "0-5", "names 1 stages, the grid has 2"), (2, "0-2,x", "'x' is not a range")])
def test_more_stages_than_layers_or_bad_layers_are_refused_before_any_stage_starts(tiny_dir, stages, layers, message):
    grid = LocalGrid(options(tiny_dir, layers=layers), stages=stages)
    with pytest.raises(ValueError, match=message):
        grid.__enter__()
    assert grid.processes == []


@pytest.fixture
def two_gpus(monkeypatch) -> list[torch.device]:
    """A pretend machine with two CUDA devices; the devices made current, in order."""
    made_current = []
    monkeypatch.setattr(devices, "resolve_device", torch.device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    return made_current


def test_a_cuda_stage_runs_on_its_own_gpu(two_gpus, monkeypatch):
    """LOCAL_RANK picks the GPU of a plain --device cuda; a named one is made current too; one that
    is not there is refused by name."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.stage_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert devices.stage_device("cuda") == torch.device("cuda", 1)
    assert devices.stage_device("cuda:0") == torch.device("cuda", 0)
    assert two_gpus == [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 0)]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="would run on cuda:2 .*this machine has 2 CUDA devices"):
        devices.stage_device("cuda")
    assert devices.stage_device("cpu") == torch.device("cpu") and len(two_gpus) == 3


@pytest.mark.parametrize(("device", "stages", "message"), [
    ("cuda", 3, "3 stages on CUDA need a GPU each, and this machine has 2"),
    ("cuda:1", 2, "would put all 2 stages on one GPU")])
def test_local_cuda_stages_without_a_gpu_each_are_refused_before_any_stage_starts(
        tiny_dir, two_gpus, device, stages, message):
    grid = LocalGrid(options(tiny_dir, device=device), stages=stages)
    with pytest.raises(ValueError, match=message):
        grid.__enter__()
    assert grid.processes == [] and two_gpus == []


def test_grid_refuses_what_it_cannot_compute(tiny_dir):
    with grid_in_process(options(tiny_dir, linear_kernel="blas"), stages=2) as runner:  # a kernel chosen, not the default
        with pytest.raises(ValueError, match="fixed when the grid starts"):
            runner.configure(runner.settings)
        with pytest.raises(ValueError, match="output_hidden_states"):
            runner.model(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
        runner.model.requires_grad_(True)
        with pytest.raises(ValueError, match="inference only"):
            runner.model(torch.tensor([[5, 6, 7]]))
        runner.model.requires_grad_(False)
        runner.model.model.layers[0].self_attn.attention_dropout = 0.1
        runner.model.train()
        with pytest.raises(ValueError, match="inference only: call model.eval"):
            runner.model(torch.tensor([[5, 6, 7]]))
        runner.model.eval()
        with pytest.raises(ValueError, match="every layer"):  # its drafts would run the other stages' layers
            runner.model.generate(torch.tensor([[5, 6, 7, 5, 6]]), max_new_tokens=4, assistant_early_exit=1)
        for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.double(), lambda m: m.to("meta")):
            with pytest.raises(ValueError, match="dtype and device are fixed when it starts"):
                convert(runner.model)  # the stages would keep theirs
        assert runner.model.dtype == torch.float32 and runner.model.lm_head.weight.device.type == "cpu"
        for unchanged in (lambda m: m.float(), lambda m: m.cpu(), lambda m: m.to(torch.float32)):
            unchanged(runner.model)  # no change: nothing to refuse, and the kernel stays the one chosen
        assert runner.linear_kernel == "blas" and runner.model.set_linear_kernel("blas") == 0
        with pytest.raises(ValueError, match="linear kernel is fixed when it starts"):
            runner.model.set_linear_kernel("packed")  # stage 0's layers alone would change
        out = runner.model(torch.tensor([[5, 6, 7]]))  # and still serves
        assert out.logits.shape == (1, 3, 256)


def test_a_longrope_grid_shares_no_long_frequency_forward_and_keeps_every_buffer_as_started(tmp_path):
    """Prompt-lookup drafts past LongRoPE's original length run the forward at the long frequencies
    on every stage, as in transformers: nothing of it is shared. And a bf16 grid's fp32 RoPE buffer
    is part of its dtype: .to(torch.bfloat16) would change it on the coordinator's stage alone."""
    config = tiny_config(num_hidden_layers=4)
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 24,
                              "short_factor": [1.0 + 0.1 * i for i in range(8)],
                              "long_factor": [2.0 + 0.5 * i for i in range(8)], "factor": 4.0}
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    ref = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    prompt = torch.tensor([[5, 9, 13, 17, 21, 25] * 3])
    drafted = {"max_new_tokens": 7, "do_sample": False, "prompt_lookup_num_tokens": 10}
    with grid_in_process(options(str(tmp_path)), stages=2) as runner, torch.no_grad():
        assert torch.equal(runner.model.generate(prompt, **drafted), ref.generate(prompt, **drafted))
        assert runner.prefix_cache.stats()["cached_blocks"] == 0
        torch.testing.assert_close(runner.model(prompt, logits_to_keep=1).logits, ref(prompt).logits[:, -1:],
                                   rtol=1e-5, atol=1e-5)
    with grid_in_process(options(str(tmp_path), dtype="bfloat16"), stages=2) as runner:
        assert runner.model.model.rotary_emb.inv_freq.dtype == torch.float32
        with pytest.raises(ValueError, match="dtype and device are fixed when it starts"):
            runner.model.to(torch.bfloat16)
        assert runner.model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_stages_sharing_the_machine_spin_briefly(tiny_dir, monkeypatch):
    """A stage that handed its step on must not keep a core spinning while the next one computes."""
    assert shared_host_environment({})["GOMP_SPINCOUNT"] == SHARED_HOST_SPIN_COUNT
    assert shared_host_environment({"OMP_WAIT_POLICY": "active"}) == {"OMP_WAIT_POLICY": "active"}  # the user's choice
    assert shared_host_environment({"GOMP_SPINCOUNT": "7"}) == {"GOMP_SPINCOUNT": "7"}
    grid = LocalGrid(options(tiny_dir), stages=2)
    with grid, open(f"/proc/{grid.processes[0].pid}/environ", "rb") as environ:
        stage_env = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    assert stage_env[b"GOMP_SPINCOUNT"] == os.environ.get("GOMP_SPINCOUNT", SHARED_HOST_SPIN_COUNT).encode()
    assert stage_env[b"LOCAL_RANK"] == b"1"  # its GPU under --device cuda: cuda:1
    # `trellis grid ... --stages N` starts again with the short spin (libgomp read the setting at load).
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["trellis", "grid", "serve", "--stages", "2"])
    cli.restart_with_short_spin()
    ((argv, env),) = calls
    assert argv == local_grid.trellis_command("grid", "serve", "--stages", "2")
    assert env["GOMP_SPINCOUNT"] == SHARED_HOST_SPIN_COUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "5")
    cli.restart_with_short_spin()
    assert len(calls) == 1  # set already: no restart


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P (the working directory off sys.path) is 3.11's")
def test_child_processes_run_this_trellis_not_one_in_their_working_directory(tmp_path, monkeypatch):
    """Stages and a grid's restart run ``python -m trellis``, which would import a ``trellis`` lying in
    the working directory (a checkout beside an installed copy) before this process's."""
    (tmp_path / "trellis").mkdir()
    (tmp_path / "trellis" / "__init__.py").write_text("raise SystemExit('the wrong trellis')\n")
    monkeypatch.chdir(tmp_path)
    run = subprocess.run(local_grid.trellis_command("--help"), env=local_grid.trellis_environment(os.environ),
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0 and "usage: trellis" in run.stdout, run.stderr[-2000:]
    # Run from the folder this trellis came from (a checkout, maybe not installed), the child finds it there.
    root = Path(local_grid.__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    assert local_grid.trellis_environment({"PYTHONPATH": "/elsewhere"})["PYTHONPATH"] == f"{root}{os.pathsep}/elsewhere"


def test_grid_cli_under_torchrun(tmp_path):
    """``torchrun ... -m trellis grid generate``: rank 1 becomes a stage, rank 0 answers as one process does,
    here from a directory holding only the embedded model's GGUF (weights and tokenizer read from it)."""
    question = "What is 2 + 2?"
    (tmp_path / "model.gguf").symlink_to(embedded_gguf_path())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trellis",
               "grid", "generate", "--max-new-tokens", "8", "--threads", "1", "--questions", question,
               "--model", str(tmp_path), "--gguf-file", "model.gguf"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    tokenizer = smollm2_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                            {"role": "user", "content": question}], add_generation_prompt=True, return_dict=False)
    single = TrellisLlama.from_pretrained(smollm2_dir(), dtype=torch.float32, device="cpu", num_blocks=64)
    want = tokenizer.decode(run_engine(single, [prompt], 8)[0][0], skip_special_tokens=True).strip()
    assert f"assistant: {want}\n" in result.stdout
    assert "stage 1: layers" in result.stdout


def test_the_server_on_a_grid_answers_and_reports_a_lost_stage(tiny_dir):
    from tests.test_serve import Server, char_tokenizer
    from trellis.serve import ServeConfig, create_app

    tok = char_tokenizer()
    question = [{"role": "user", "content": "What is a radix tree?"}]
    single = TrellisLlama.from_pretrained(tiny_dir, device="cpu", block_size=BLOCK, num_blocks=256)
    prompt = tok.apply_chat_template(question, add_generation_prompt=True, return_dict=False)
    want = tok.decode(run_engine(single, [prompt], 8)[0][0], skip_special_tokens=True)
    grid = LocalGrid(options(tiny_dir, step_timeout=3), stages=2)
    runner = grid.__enter__()
    server = Server(create_app(runner.model, tok, ServeConfig(model_name="tiny")))
    try:
        client = server.client()
        answer = client.chat.completions.create(model="tiny", messages=question, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == want
        assert httpx.get(f"{server.url}/health").status_code == 200
        os.kill(grid.processes[0].pid, signal.SIGKILL)
        grid.processes[0].wait()
        with pytest.raises(openai.APIError):
            client.chat.completions.create(model="tiny", messages=question, max_tokens=8, temperature=0)
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{server.url}/health")).status_code == 200:
            assert time.monotonic() < deadline, "/health did not report the lost stage"
            time.sleep(0.1)
        assert health.status_code == 503 and "stage" in health.json()["error"]
        manager_is_clean(runner._manager)  # its prefix_cache property refuses a failed grid
    finally:
        server.stop()
        grid.stop(timeout=10)
