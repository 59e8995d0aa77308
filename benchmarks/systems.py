"""The three systems measured side by side on the same weights, and how an op is timed and its
allocations counted: Trellis' engine, transformers' ``generate_batch`` and per-session ``generate()``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from common import SEED_BLOCK, Workload
from torch.profiler import ProfilerActivity, profile
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators.cache_pool import CachePool
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

from trellis.engine.engine import Engine
from trellis.engine.sampling import SamplingParams
from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG

MAX_BATCH_TOKENS = 4096  # per forward, for both continuous-batching systems


@contextlib.contextmanager
def attention(model: TrellisLlama, implementation: str) -> Iterator[TrellisLlama]:
    """The same weights under another attention implementation (TrellisLlama then behaves as a
    plain ``LlamaForCausalLM``: ``generate`` and ``generate_batch`` are transformers' own), and
    for the peers with transformers' own linear layers ("blas"), whatever Trellis' are."""
    previous, kernel = model.config._attn_implementation, model.linear_kernel
    if implementation != "trellis":
        model.set_linear_kernel("blas")
    model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
        model.set_linear_kernel(kernel)


@dataclass
class OpResult:
    seconds: float  # the whole op
    session_seconds: float  # the N sessions alone, after the warm-up: the steady state of a warm cache
    generated: int
    fresh_blocks: int | None = None  # KV blocks taken from the pool (not served by a prefix cache)
    live_blocks: int | None = None  # Trellis: most distinct blocks held by running sessions at once
    kv_bytes: int | None = None  # transformers generate(): bytes of the sessions' DynamicCaches, summed
    leaves: int | None = None  # Trellis: leaves of the radix tree after the op

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.seconds

    @property
    def session_tokens_per_s(self) -> float:
        return self.generated / self.session_seconds


@dataclass
class Probe:
    ttft: float
    hit_rate: float  # prompt tokens served from the cache / prompt tokens


# --- measurement ----------------------------------------------------------------------------------


@dataclass
class Allocations:
    """Tensor allocations by PyTorch's CPU allocator, as its profiler reports them."""

    count: int = 0
    bytes: int = 0

    def add(self, prof: profile) -> None:
        for event in prof.profiler.kineto_results.events():
            if event.name() == "[memory]" and event.nbytes() > 0:
                self.count += 1
                self.bytes += event.nbytes()


@contextlib.contextmanager
def profiled(tally: Allocations) -> Iterator[None]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield
    tally.add(prof)


# --- the three systems ----------------------------------------------------------------------------


class System:
    """One way of serving the workload; each ``op`` starts from a fresh pipeline."""

    name: str

    def __init__(self, model: TrellisLlama) -> None:
        self.model = model

    def op(self, w: Workload, block_size: int = SEED_BLOCK) -> OpResult:
        raise NotImplementedError

    def ttft(self, w: Workload, block_size: int = SEED_BLOCK) -> Probe:
        """Warm one prompt, then time a request sharing its first ``w.shared`` tokens that decodes one token."""
        raise NotImplementedError

    def allocations(self, w: Workload, block_size: int = SEED_BLOCK) -> Allocations:
        """Allocations of one (untimed) op."""
        tally = Allocations()
        with profiled(tally):
            self.op(w, block_size)
        return tally


class Trellis(System):
    name = "trellis"

    def _engine(self, w: Workload, block_size: int) -> Engine:
        self.model.configure_cache(block_size=block_size, num_blocks=w.pool_blocks(block_size),
                                   backend=self.model.runner.settings.backend)  # a fresh, empty pool
        return Engine(self.model, max_batch_tokens=MAX_BATCH_TOKENS)

    def op(self, w: Workload, block_size: int = SEED_BLOCK) -> OpResult:
        prefix, prompts = w.prefix(), [w.prompt(i) for i in range(w.N)]
        start = time.perf_counter()
        engine = self._engine(w, block_size)
        if prefix:
            engine.generate([prefix], SamplingParams(max_new_tokens=1))
        warm = time.perf_counter()
        sessions = engine.generate(prompts, SamplingParams(max_new_tokens=w.D))
        end = time.perf_counter()
        return OpResult(end - start, end - warm, sum(len(s.generated) for s in sessions),
                        fresh_blocks=engine.fresh_blocks,
                        live_blocks=engine.peak_live_blocks, leaves=self.model.prefix_cache.stats()["leaves"])

    def ttft(self, w: Workload, block_size: int = SEED_BLOCK) -> Probe:
        engine = self._engine(w, block_size)
        engine.generate([w.prompt(0)], SamplingParams(max_new_tokens=1))
        probe = engine.generate([w.prompt(1)], SamplingParams(max_new_tokens=1))[0]
        return Probe(probe.ttft, probe.num_cached_tokens / len(probe.prompt))


class HFGenerate(System):
    name = "hf_generate"

    def op(self, w: Workload, block_size: int = SEED_BLOCK) -> OpResult:
        prompts = [torch.tensor([w.prompt(i)]) for i in range(w.N)]  # no reuse: nothing to warm
        generated = kv_bytes = 0
        with attention(self.model, "sdpa"):
            start = time.perf_counter()
            for ids in prompts:
                out = self.model.generate(ids, max_new_tokens=w.D, do_sample=False, return_dict_in_generate=True)
                generated += out.sequences.shape[1] - ids.shape[1]
                kv_bytes += sum(t.nbytes for layer in out[CACHE_ARG].layers for t in (layer.keys, layer.values))
            seconds = time.perf_counter() - start
        return OpResult(seconds, seconds, generated, kv_bytes=kv_bytes)

    def ttft(self, w: Workload, block_size: int = SEED_BLOCK) -> Probe:
        ids = torch.tensor([w.prompt(1)])
        with attention(self.model, "sdpa"):
            start = time.perf_counter()
            self.model.generate(ids, max_new_tokens=1, do_sample=False)
            return Probe(time.perf_counter() - start, 0.0)


class HFGenerateBatch(System):
    """transformers' continuous batching: paged cache, hash-based sharing of full pages (its default
    page is 256 tokens; here it gets the same block size as Trellis, its best case for sharing).

    A request that finishes in its prefill step never registers its pages for sharing (transformers
    5.23 and 5.24 mark completed pages only for requests still running), so its warm-up request
    decodes two tokens where Trellis' decodes one.
    """

    name = "hf_generate_batch"

    @contextlib.contextmanager
    def _pipeline(self, w: Workload, block_size: int) -> Iterator[Callable[..., dict]]:
        """A fresh manager kept alive across calls, so the warmed prefix stays in its cache."""
        config = ContinuousBatchingConfig(page_size=block_size, num_blocks=w.pool_blocks(block_size),
                                          max_batch_tokens=MAX_BATCH_TOKENS, max_requests_per_batch=256)

        def run(prompts: list[list[int]], max_new_tokens: int, **kwargs) -> dict:
            generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
            return self.model.generate_batch(prompts, generation, config, persistent_manager=True, warmup=False,
                                             **kwargs)

        with attention(self.model, "sdpa"):
            try:
                yield run
            finally:
                self.model.destroy_cached_continuous_batching_manager()

    def op(self, w: Workload, block_size: int = SEED_BLOCK) -> OpResult:
        prefix, prompts = w.prefix(), [w.prompt(i) for i in range(w.N)]
        with cache_counters() as counts:
            start = time.perf_counter()
            with self._pipeline(w, block_size) as run:
                if prefix:
                    run([prefix], 2)
                warm = time.perf_counter()
                out = run(prompts, w.D)
                end = time.perf_counter()
        return OpResult(end - start, end - warm, sum(len(r.generated_tokens) for r in out.values()),
                        fresh_blocks=counts["fresh_blocks"])

    def ttft(self, w: Workload, block_size: int = SEED_BLOCK) -> Probe:
        with cache_counters() as counts, self._pipeline(w, block_size) as run:
            run([w.prompt(0)], 2)
            (result,) = run([w.prompt(1)], 1, record_timestamps=True).values()
        return Probe(result.timestamps[0] - result.created_time, counts["hit_tokens"] / w.L)

    def allocations(self, w: Workload, block_size: int = SEED_BLOCK) -> Allocations:
        # Its model runs in a background thread, which the profiler of the calling thread does not
        # see: profile inside that thread (with warmup=False the cache is also created there).
        tally = Allocations()
        loop = ContinuousBatchingManager._run_generation_loop

        def profiled_loop(manager: ContinuousBatchingManager, *args, **kwargs) -> None:
            with profiled(tally):
                loop(manager, *args, **kwargs)

        ContinuousBatchingManager._run_generation_loop = profiled_loop
        try:
            self.op(w, block_size)
        finally:
            ContinuousBatchingManager._run_generation_loop = loop
        if not tally.count:  # the loop failed in its thread, unseen here
            raise RuntimeError("no allocations seen in transformers' generation thread")
        return tally


@contextlib.contextmanager
def cache_counters() -> Iterator[dict[str, int]]:
    """Count the blocks transformers' paged cache takes from its pool and the prompt tokens its
    prefix matching serves (instrumentation only: the calls are passed through unchanged)."""
    counts = {"fresh_blocks": 0, "hit_tokens": 0}
    get_free_blocks, search_prefix_match = CachePool.get_free_blocks, PagedAttentionCache.search_prefix_match

    def counted_get_free_blocks(pool: CachePool, index: int, num_blocks: int) -> list[int]:
        counts["fresh_blocks"] += num_blocks
        return get_free_blocks(pool, index, num_blocks)

    def counted_search_prefix_match(cache: PagedAttentionCache, request_id: str, prompt_ids: list[int]) -> int:
        hit = search_prefix_match(cache, request_id, prompt_ids)
        counts["hit_tokens"] += hit
        return hit

    CachePool.get_free_blocks, PagedAttentionCache.search_prefix_match = (
        counted_get_free_blocks, counted_search_prefix_match)
    try:
        yield counts
    finally:
        CachePool.get_free_blocks, PagedAttentionCache.search_prefix_match = get_free_blocks, search_prefix_match


def systems(model: TrellisLlama) -> list[System]:
    return [Trellis(model), HFGenerateBatch(model), HFGenerate(model)]


def warm_up(all_systems: list[System]) -> None:
    """One small untimed op each: the first op of a process pays one-time costs (threads, kernels)."""
    for system in all_systems:
        system.op(Workload(L=64, D=2, N=2, phi=0.5))


