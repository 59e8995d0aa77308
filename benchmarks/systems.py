"""The systems measured side by side on the same weights, and how an op is timed and its
allocations counted: Trellis' engine, transformers' continuous batching (``generate_batch``'s
manager), per-session ``generate()`` and one batched ``generate()`` call.

Every system is timed over the same work: from a fresh pipeline to the last session's last token
(Trellis: a new engine over an emptied prefix cache, its KV pool kept from op to op as a server keeps it).
The peers run transformers' own ``LlamaForCausalLM`` over the same weight tensors
(``common.attention``), made before the timed region, as Trellis' kernels are built before it;
tearing a pipeline down (transformers' manager stop, its ``gc.collect()``) happens after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import common
import torch
from common import SEED_BLOCK, Workload, attention
from torch.profiler import ProfilerActivity, profile
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaForCausalLM

# transformers' continuous-batching internals move between releases (5.17 has no cache_allocators):
# imported for that peer only, so the other systems run on any release the library supports.
try:
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.cache_allocators.cache_pool import CachePool
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
    from transformers.generation.continuous_batching.requests import GenerationOutput
    from transformers.generation.continuous_batching.utils import WorkloadHints
except ImportError as error:
    MISSING_INTERNALS: ImportError | None = error
else:
    MISSING_INTERNALS = None

from trellis.engine.engine import Engine
from trellis.engine.sampling import SamplingParams
from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG
from trellis.runner.runner import CacheSettings

MAX_BATCH_TOKENS = 4096  # per forward, for both continuous-batching systems


def engine_over_empty_cache(model: TrellisLlama, block_size: int, num_blocks: int) -> Engine:
    """A new engine over an empty prefix cache of ``num_blocks`` blocks of ``block_size`` tokens.
    The pool is configured where that geometry is new and kept otherwise, its cached prefixes
    cleared (``prefix_cache.clear()``), as a server keeps its pool between requests and vLLM's
    ``reset_prefix_cache`` its KV memory: a pool made per op can time the kernel faulting its pages
    in (20-35 ms of a cold 512-token prompt on the 2-core AMX Xeon where other allocations came
    between pools; a few ms where malloc hands the last pool's memory back)."""
    backend = model.runner.settings.backend
    if model.runner.settings != CacheSettings(block_size, num_blocks, None, backend):
        model.configure_cache(block_size=block_size, num_blocks=num_blocks, backend=backend)
    else:
        model.prefix_cache.clear()
    return Engine(model, max_batch_tokens=MAX_BATCH_TOKENS)


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
    probes_ttft = True  # False where a one-request probe would be another system's call

    def __init__(self, model: TrellisLlama) -> None:
        self.model = model

    def op(self, w: Workload, block_size: int = SEED_BLOCK) -> OpResult:
        raise NotImplementedError

    def ttft(self, w: Workload, block_size: int = SEED_BLOCK) -> Probe:
        """Warm one prompt, then time a request sharing its first ``w.shared`` tokens that decodes one
        token: wall clock around the call that serves it, for every system."""
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
        return engine_over_empty_cache(self.model, block_size, w.pool_blocks(block_size))

    def op(self, w: Workload, block_size: int = SEED_BLOCK) -> OpResult:
        prefix, prompts = w.prefix(), [w.prompt(i) for i in range(w.N)]
        start = common.clock()
        engine = self._engine(w, block_size)
        if prefix:
            engine.generate([prefix], SamplingParams(max_new_tokens=1))
        warm = common.clock()
        sessions = engine.generate(prompts, SamplingParams(max_new_tokens=w.D))
        end = common.clock()
        return OpResult(end - start, end - warm, sum(len(s.generated) for s in sessions),
                        fresh_blocks=engine.fresh_blocks,
                        live_blocks=engine.peak_live_blocks, leaves=self.model.prefix_cache.stats()["leaves"])

    def ttft(self, w: Workload, block_size: int = SEED_BLOCK) -> Probe:
        engine = self._engine(w, block_size)
        engine.generate([w.prompt(0)], SamplingParams(max_new_tokens=1))
        start = common.clock()
        probe = engine.generate([w.prompt(1)], SamplingParams(max_new_tokens=1))[0]
        return Probe(common.clock() - start, probe.num_cached_tokens / len(probe.prompt))


def cache_bytes(out) -> int:
    """Bytes of the K and V tensors of the DynamicCache a ``generate()`` call returned."""
    return sum(t.nbytes for layer in out[CACHE_ARG].layers for t in (layer.keys, layer.values))


class HFGenerate(System):
    """transformers ``generate()``, one call per session (its default cache: no reuse)."""

    name = "hf_generate"

    def op(self, w: Workload, block_size: int = SEED_BLOCK) -> OpResult:
        prompts = [torch.tensor([w.prompt(i)], device=self.model.device) for i in range(w.N)]  # nothing to warm
        generated = kv_bytes = 0
        with attention(self.model, "sdpa") as model:
            start = common.clock()
            for ids in prompts:
                out = model.generate(ids, max_new_tokens=w.D, do_sample=False, return_dict_in_generate=True)
                generated += out.sequences.shape[1] - ids.shape[1]
                kv_bytes += cache_bytes(out)
            seconds = common.clock() - start
        return OpResult(seconds, seconds, generated, kv_bytes=kv_bytes)

    def ttft(self, w: Workload, block_size: int = SEED_BLOCK) -> Probe:
        ids = torch.tensor([w.prompt(1)], device=self.model.device)
        with attention(self.model, "sdpa") as model:
            start = common.clock()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            return Probe(common.clock() - start, 0.0)


class HFGenerateBatched(HFGenerate):
    """transformers ``generate()``, one call over the N prompts: what a user with N prompts at hand
    writes. The seed's prompts all have L tokens, so the batch needs no padding. Its TTFT probe
    (one request) is ``HFGenerate``'s call, so it is not probed again."""

    name = "hf_generate_batched"
    probes_ttft = False

    def op(self, w: Workload, block_size: int = SEED_BLOCK) -> OpResult:
        ids = torch.tensor([w.prompt(i) for i in range(w.N)], device=self.model.device)  # [N, L]
        with attention(self.model, "sdpa") as model:
            start = common.clock()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=w.D, do_sample=False,
                                      return_dict_in_generate=True)
            seconds = common.clock() - start
        generated = out.sequences[:, ids.shape[1]:].numel()
        return OpResult(seconds, seconds, generated, kv_bytes=cache_bytes(out))

    def ttft(self, w: Workload, block_size: int = SEED_BLOCK) -> Probe:
        raise NotImplementedError("one request: the same call as HFGenerate.ttft")


class HFGenerateBatch(System):
    """transformers' continuous batching: paged cache, hash-based sharing of full pages (its default
    page is 256 tokens; here it gets the same block size as Trellis, its best case for sharing).

    A request that finishes in its prefill step never registers its pages for sharing (transformers
    5.23 and 5.24 mark completed pages only for requests still running), so its warm-up request
    decodes two tokens where Trellis' decodes one.
    """

    name = "hf_generate_batch"

    def __init__(self, model: TrellisLlama) -> None:
        if MISSING_INTERNALS is not None:
            raise RuntimeError(f"this transformers release lacks what the generate_batch peer uses: {MISSING_INTERNALS}")
        super().__init__(model)

    @contextlib.contextmanager
    def _manager(self, model: LlamaForCausalLM, w: Workload, block_size: int) -> Iterator[ContinuousBatchingManager]:
        """A fresh, started manager (``generate_batch``'s, with the same configuration), kept running
        across the warm-up and the sessions so the warmed pages stay shared. Its stop, which waits
        for the generation thread and runs ``gc.collect()``, is on the way out: callers read the
        clock before it, as they do before a Trellis engine is dropped."""
        config = ContinuousBatchingConfig(page_size=block_size, num_blocks=w.pool_blocks(block_size),
                                          max_batch_tokens=MAX_BATCH_TOKENS, max_requests_per_batch=256)
        generation = GenerationConfig(do_sample=False, eos_token_id=None)
        hints = WorkloadHints(max_prompt_length=w.L, max_generated_length=w.D, num_requests=w.N)
        manager = model.init_continuous_batching(generation, config, hints)
        manager.start()
        try:
            yield manager
        finally:
            manager.stop(block=True)
            manager.destroy()

    @staticmethod
    def _run(manager: ContinuousBatchingManager, prompts: list[list[int]], max_new_tokens: int) -> list[GenerationOutput]:
        """Submit ``prompts`` and wait for all of them to finish, as ``generate_batch`` does."""
        ids = manager.add_requests(prompts, max_new_tokens=max_new_tokens)
        done: dict[str, GenerationOutput] = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"transformers' continuous batching failed a request: {result.error}")
                done[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' generation thread stopped before the requests finished")
        return [done[i] for i in ids]

    def op(self, w: Workload, block_size: int = SEED_BLOCK) -> OpResult:
        prefix, prompts = w.prefix(), [w.prompt(i) for i in range(w.N)]
        with attention(self.model, "sdpa") as model, cache_counters() as counts:
            start = common.clock()
            with self._manager(model, w, block_size) as manager:
                if prefix:
                    self._run(manager, [prefix], 2)
                warm = common.clock()
                out = self._run(manager, prompts, w.D)
                end = common.clock()
        return OpResult(end - start, end - warm, sum(len(r.generated_tokens) for r in out),
                        fresh_blocks=counts["fresh_blocks"])

    def ttft(self, w: Workload, block_size: int = SEED_BLOCK) -> Probe:
        with attention(self.model, "sdpa") as model, cache_counters() as counts, \
                self._manager(model, w, block_size) as manager:
            self._run(manager, [w.prompt(0)], 2)
            start = common.clock()
            self._run(manager, [w.prompt(1)], 1)
            seconds = common.clock() - start
        return Probe(seconds, counts["hit_tokens"] / w.L)

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


def systems(model: TrellisLlama, ttft: bool = False) -> list[System]:
    """Every system, or (``ttft``) those with a TTFT probe of their own."""
    every = [Trellis(model), HFGenerateBatch(model), HFGenerate(model), HFGenerateBatched(model)]
    return [s for s in every if s.probes_ttft or not ttft]


def warm_up(all_systems: list[System]) -> None:
    """One small untimed op each: the first op of a process pays one-time costs (threads, kernels)."""
    for system in all_systems:
        system.op(Workload(L=64, D=2, N=2, phi=0.5))


