"""Continuous batching of many sessions over one model's block pool and radix cache."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import torch
from transformers.generation.continuous_batching.requests import RequestStatus

from trellis.cache.block_pool import OutOfBlocksError
from trellis.cache.manager import KVCacheManager
from trellis.engine.sampling import LogitsProcessor, SamplingParams, sample
from trellis.engine.session import Session
from trellis.runner import PagedModelRunner, runner_of
from trellis.utils import cdiv


class Engine:
    """Serves sessions of one model together, one packed forward per step.

    ``model`` is a ``TrellisLlama`` or its ``PagedModelRunner``; the engine runs it through the runner.

    A step admits waiting sessions (FIFO) and runs one forward over the prompt suffixes of the
    newly admitted (their cached prefixes are skipped) and the last token of every running
    session, then samples a token for each. Sessions join as soon as blocks allow and leave as
    soon as they finish, releasing their blocks; their full blocks (prompt and answer) stay in
    the radix cache for the next turn.

    Admission takes the session's cached prefix and reserves blocks for every token it may
    compute (prompt + ``max_new_tokens - 1``), evicting unused cached prefixes if needed. So a
    running session never runs out of blocks and is never preempted: a session that does not fit
    waits for running ones to finish. One that could never fit is refused when it is added.
    """

    def __init__(self, model: object, max_batch_tokens: int = 4096, max_running: int = 256) -> None:
        if max_batch_tokens < 1 or max_running < 1:
            raise ValueError("max_batch_tokens and max_running must be positive")
        self.runner: PagedModelRunner = runner_of(model)
        self.max_batch_tokens = max_batch_tokens  # prefill tokens admitted per step (one prompt always fits)
        self.max_running = max_running
        self.waiting: deque[Session] = deque()
        self.running: list[Session] = []
        self._ids = itertools.count()
        self._manager: KVCacheManager | None = None  # the cache the running sessions live in
        self.fresh_blocks = 0  # blocks admissions took from the pool rather than from the cache
        self.peak_live_blocks = 0  # most distinct blocks held by running sessions at once

    # --- requests ----------------------------------------------------------------------------

    def add(self, prompt: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None,
            logits_processor: LogitsProcessor | None = None) -> Session:
        """Queue a session; raises ``OutOfBlocksError`` if the pool could never hold it.

        ``logits_processor`` (one per session: it may keep state) turns the session's logits into the
        scores its tokens are chosen from, warpers included (see ``sample``)."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("cannot generate from an empty prompt")
        self.runner.check_token_ids([prompt])
        session = Session(request_id or f"req_{next(self._ids)}", prompt, params, logits_processor=logits_processor)
        self.runner.check_positions(session.kv_tokens)
        manager = self.runner.prefix_cache
        if not manager.can_ever_hold(session.kv_tokens):
            raise OutOfBlocksError(
                f"request {session.request_id} can never fit: {len(prompt)} prompt tokens + {params.max_new_tokens} "
                f"new tokens need {cdiv(session.kv_tokens, manager.block_size)} blocks of {manager.block_size}, the "
                f"pool has {manager.stats()['total_blocks']}; raise num_blocks / kv_cache_memory or lower max_new_tokens"
            )
        session.generator = params.make_generator(self.runner.device)
        self.waiting.append(session)
        return session

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self, on_finish: Callable[[Session], None] | None = None) -> None:
        """Step until every queued session has finished."""
        while self.has_work:
            for session in self.step():
                if on_finish is not None:
                    on_finish(session)

    def generate(self, prompts: Iterable[Sequence[int]], params: SamplingParams | None = None) -> list[Session]:
        """Run ``prompts`` to completion together; the sessions, in order."""
        sessions = [self.add(p, params) for p in prompts]
        self.run()
        return sessions

    # --- one step ----------------------------------------------------------------------------

    def step(self) -> list[Session]:
        """Admit what fits, run one forward, sample; returns the sessions that finished."""
        with self.runner.lock, torch.no_grad():  # one forward at a time on the shared pool
            manager = self.runner.prefix_cache
            if self.running and manager is not self._manager:
                reason = "the model's KV cache was rebuilt (new weights, dtype, device or cache settings)"
                self.abort(reason)
                raise RuntimeError(f"{reason} while sessions were running; they were failed")
            self._manager = manager
            self._admit(manager)
            if not self.running:
                return []
            sessions = list(self.running)
            try:
                step = self.runner.forward(manager, [s.seq for s in sessions])
            except BaseException as exc:
                self.abort(f"forward failed: {exc!r}")
                raise
            logits = self.runner.logits(step.hidden[step.batch.last_token_index])  # [B, V]
            row_scores = [s.process_logits if s.logits_processor else None for s in sessions]
            tokens, logprobs = sample(logits, [s.params for s in sessions], [s.generator for s in sessions], row_scores)
            now = time.perf_counter()
            finished = []
            for session, token, logprob in zip(sessions, tokens, logprobs):
                if session.add_token(token, logprob, now):
                    manager.release(session.seq)  # full blocks, prompt and answer, go to the radix cache
                    session.status, session.finished_time = RequestStatus.FINISHED, now
                    finished.append(session)
                else:
                    manager.append(session.seq, [token])  # blocks reserved at admission: allocates nothing
                    session.status = RequestStatus.DECODING
            self.running = [s for s in self.running if s.status != RequestStatus.FINISHED]
            return finished

    def _admit(self, manager: KVCacheManager) -> None:
        budget = self.max_batch_tokens - len(self.running)  # each running session adds one token
        admitted = 0
        with manager.lock:
            while self.waiting and len(self.running) < self.max_running:
                session = self.waiting[0]
                extra = session.kv_tokens - len(session.prompt)  # room for its answer, reserved up front
                cost = manager.admission_cost(session.prompt, extra_tokens=extra)
                if len(session.prompt) - cost.cached_tokens > budget and (admitted or self.running):
                    break  # next step: this forward is full
                if not (cost.fits and self._try_admit(manager, session, extra)):
                    if self.running:
                        break  # wait: running sessions will free blocks as they finish
                    stats = manager.stats()
                    raise OutOfBlocksError(
                        f"request {session.request_id} does not fit in the KV pool even after eviction, and this "
                        f"engine runs nothing that could free blocks ({stats['live_sessions']} sessions held "
                        f"elsewhere, {stats['free_blocks']} of {stats['total_blocks']} blocks free)"
                    )
                self.waiting.popleft()
                self.running.append(session)
                budget -= session.seq.num_new
                admitted += 1
            live = {b for s in self.running for b in s.seq.block_ids}
            self.peak_live_blocks = max(self.peak_live_blocks, len(live))

    def _try_admit(self, manager: KVCacheManager, session: Session, extra_tokens: int) -> bool:
        """Take the session's cached prefix and reserve all its blocks, or change nothing."""
        try:
            seq = manager.admit(session.prompt, extra_tokens=extra_tokens)
        except OutOfBlocksError:
            return False
        session.seq, session.num_cached_tokens = seq, seq.num_prefix_hit
        session.status, session.admitted_time = RequestStatus.PREFILLING, time.perf_counter()
        self.fresh_blocks += len(seq.block_ids) - seq.num_prefix_hit // manager.block_size
        return True

    def abort(self, reason: str) -> None:
        """Fail every session not yet finished and give its blocks back, committing nothing."""
        for session in self.running:
            self._manager.release(session.seq, commit=False)
        for session in [*self.running, *self.waiting]:
            session.status, session.error = RequestStatus.FAILED, reason
            self.running, self.waiting = [], deque()
