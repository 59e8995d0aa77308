"""Continuous batching of many sessions over one model's block pool and radix cache."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace

import torch
from transformers.generation.continuous_batching.requests import RequestStatus

from trellis.cache.block_pool import OutOfBlocksError
from trellis.cache.interrupts import InterruptDeferringLock
from trellis.cache.manager import KVCacheManager
from trellis.engine.sampling import NO_WARPERS, LogitsProcessor, SamplingParams, sample
from trellis.engine.scheduler import Scheduler, fork_blocks
from trellis.engine.session import Session, TokenLogprobs
from trellis.runner import PagedModelRunner, runner_of
from trellis.runner.runner import PendingStep, StepOutput
from trellis.utils import cdiv, is_positive_int, token_ids

log = logging.getLogger("trellis.engine")


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; the request was not queued."""


class Engine:
    """Serves sessions of one model together, one packed forward per step.

    ``model`` is a ``TrellisLlama`` or its ``PagedModelRunner``; the engine runs it through the runner.

    A step admits waiting sessions and runs one forward over a token budget: the next token of every
    decoding session and prompt chunks of the sessions being prefilled, their cached prefixes
    skipped (see ``Scheduler`` for chunked prefill, in-batch prefix caching and fair admission).
    Then each session whose prompt is complete samples a token. Sessions join as soon as blocks
    allow and leave as soon as they finish, releasing their blocks; their full blocks (prompt and
    answer) stay in the radix cache for the next turn.

    Admission takes the session's cached prefix and reserves blocks for every token it may
    compute (prompt + ``max_new_tokens - 1``), evicting unused cached prefixes if needed. So a
    running session never runs out of blocks and is never preempted: a session that does not fit
    waits for running ones to finish. One that could never fit is refused when it is added.

    Pipelining: a runner whose ``pipeline_depth`` is above one (a grid of stages) gets that many
    lanes: disjoint groups of running sessions, each with one forward in flight. A step finishes
    its lane's previous forward (samples its tokens), schedules the lane again and submits it, then
    the next step turns to the next lane, so every stage of the grid has a micro-batch to work on.
    New sessions spread over the lanes evenly. With depth one, a step runs its forward to the end.

    Threads: ``add`` and ``cancel`` may be called from any thread while another one steps; every
    other method belongs to the stepping thread. ``max_waiting`` bounds the sessions queued and
    not yet running (``add`` raises ``QueueFullError`` beyond it).
    """

    def __init__(self, model: object, max_batch_tokens: int = 4096, max_running: int = 256,
                 max_waiting: int | None = None, max_overtakes: int = 16) -> None:
        if max_waiting is not None and max_waiting < 1:
            raise ValueError("max_waiting must be positive (or None: unbounded)")
        self.runner: PagedModelRunner = runner_of(model)
        self.scheduler = Scheduler(max_batch_tokens, max_running, max_overtakes)
        self.max_waiting = max_waiting
        self.waiting: deque[Session] = deque()
        depth = self.runner.pipeline_depth
        self.lanes: list[list[Session]] = [[] for _ in range(depth)]  # running sessions, by lane
        self._in_flight: list[tuple[list[Session], PendingStep] | None] = [None] * depth  # each lane's forward
        self._next_lane = 0
        self._unreported: list[Session] = []  # ended in a step that then raised: the next step returns them
        self._inbox: deque[Session] = deque()  # added by any thread, moved to ``waiting`` by the stepping one
        self._inbox_lock = InterruptDeferringLock()  # (Ctrl-C waits for a hold: see interrupts.py)
        self._ids = itertools.count()
        self._manager: KVCacheManager | None = None  # the cache the running sessions live in
        self.fresh_blocks = 0  # blocks admissions took from the pool rather than from the cache
        self.peak_live_blocks = 0  # most distinct blocks held by running sessions at once
        # An engine dropped between steps with sessions running (a stepping loop interrupted) gives
        # their blocks back when it is collected; the finalizer holds the lanes, not the engine.
        finalizer = weakref.finalize(self, release_dropped, self.runner, self.lanes)
        finalizer.atexit = False

    @property
    def max_batch_tokens(self) -> int:
        return self.scheduler.max_batch_tokens

    @property
    def max_running(self) -> int:
        return self.scheduler.max_running

    @property
    def running(self) -> list[Session]:
        """The sessions admitted and not yet ended, of every lane."""
        return [s for lane in self.lanes for s in lane]

    # --- requests ----------------------------------------------------------------------------

    def add(self, prompt: Sequence[int], params: SamplingParams | None = None, request_id: str | None = None,
            logits_processor: LogitsProcessor | None = None, n: int = 1) -> Session:
        """Queue a session; raises ``OutOfBlocksError`` if the pool could never hold it, ``QueueFullError``
        if ``max_waiting`` sessions already wait, ``ValueError`` for what ``check`` refuses.

        ``logits_processor`` (one per session: it may keep state) turns the session's logits into the
        scores its tokens are chosen from, warpers included (see ``sample``): a sampled session's
        ``params`` keep the default ``temperature``, ``top_k`` and ``top_p``. ``n > 1`` asks for more
        choices: the returned session's ``forks``, which start from its computed prompt (sharing its
        blocks) and sample with seeds ``seed + 1``, ``seed + 2``, ... when ``seed`` is set."""
        session = self._session(prompt, _params(params), request_id or f"req_{next(self._ids)}", logits_processor, n)
        for s in [session, *session.forks]:
            s.generator = s.params.make_generator(self.runner.device)
        with self._inbox_lock:
            if self.max_waiting is not None and len(self._inbox) + len(self.waiting) >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting; try again shortly")
            self._inbox.append(session)
        return session

    def check(self, prompt: Sequence[int], params: SamplingParams | None = None,
              logits_processor: LogitsProcessor | None = None, n: int = 1) -> None:
        """Raise what ``add`` would raise for this request, but for a full queue, and queue nothing:
        a caller with several requests checks them all before adding any."""
        self._session(prompt, _params(params), "check", logits_processor, n)

    def most_new_tokens(self, prompt_length: int, n: int = 1) -> int:
        """The largest ``max_new_tokens`` the pool could ever hold after a prompt of ``prompt_length``
        tokens in ``n`` choices (below 1: not even the prompt). The inverse of ``add``'s check: a session
        needs ``cdiv(kv_tokens, block_size)`` blocks and each fork those past the prompt's full blocks."""
        manager = self.runner.prefix_cache
        full = prompt_length // manager.block_size
        blocks_per_choice = (manager.pool.num_blocks + (n - 1) * full) // n
        return blocks_per_choice * manager.block_size - prompt_length + 1

    def _session(self, prompt: Sequence[int], params: SamplingParams, request_id: str,
                 logits_processor: LogitsProcessor | None, n: int) -> Session:
        """A checked session and its forks, not yet queued (see ``add``)."""
        prompt = token_ids(prompt)
        if not prompt:
            raise ValueError("cannot generate from an empty prompt")
        if not is_positive_int(n):
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if logits_processor is not None and not callable(logits_processor):
            raise TypeError(f"logits_processor must be a callable (input_ids, scores) -> scores, "
                            f"got {type(logits_processor).__name__} {logits_processor!r}")
        n = int(n)
        if n > 1 and logits_processor is not None:
            raise ValueError("a logits processor may keep state per session: it cannot serve n > 1 choices")
        warpers = {name: getattr(params, name) for name in NO_WARPERS}
        if logits_processor is not None and params.do_sample and warpers != NO_WARPERS:
            raise ValueError(f"a session with a logits processor samples from its scores, warpers included: "
                             f"put the warpers in the processor, not in its params ({warpers})")
        if n > self.max_running:  # the choices run together: they would wait for ever
            raise ValueError(f"n = {n} choices run at once, and this engine runs at most {self.max_running} "
                             "sessions (max_running)")
        self.runner.check_token_ids([prompt])
        vocab = self.runner.config.vocab_size
        for name in ("logprobs", "prompt_logprobs"):  # top-k past the vocabulary would fail mid-step
            if (getattr(params, name) or 0) > vocab:
                raise ValueError(f"{name} = {getattr(params, name)} alternatives, but the vocabulary has {vocab} tokens")
        session = Session(request_id, prompt, params, logits_processor=logits_processor)
        self.runner.check_positions(session.kv_tokens)
        session.forks = [Session(f"{request_id}_{i}", prompt, params if params.seed is None
                                 else replace(params, seed=params.seed + i), created_time=session.created_time)
                         for i in range(1, n)]
        manager = self.runner.prefix_cache
        needed = cdiv(session.kv_tokens, manager.block_size) + fork_blocks(session, manager.block_size)
        if needed > manager.pool.num_blocks:
            raise OutOfBlocksError(
                f"the request can never fit: {len(prompt)} prompt tokens + {params.max_new_tokens} "
                f"new tokens{f' in {n} choices' if n > 1 else ''} need {needed} blocks of {manager.block_size}, "
                f"the pool has {manager.pool.num_blocks}; raise num_blocks / kv_cache_memory or lower max_new_tokens"
            )
        return session

    def cancel(self, session: Session) -> None:
        """Stop a session at the next step, from any thread; its forks end with it unless they have
        started. A running session's blocks return to the pool; its computed full blocks stay in the
        radix cache."""
        session.cancel_requested = True

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or any(self.lanes) or any(self._in_flight))

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self.waiting)

    def run(self, on_finish: Callable[[Session], None] | None = None) -> None:
        """Step until every queued session has finished."""
        while self.has_work:
            for session in self.step():
                if on_finish is not None:
                    on_finish(session)

    def generate(self, prompts: Iterable[Sequence[int]], params: SamplingParams | None = None) -> list[Session]:
        """Run ``prompts`` to completion together; the sessions, in order. A prompt refused by
        ``add`` refuses them all: those queued before it are withdrawn."""
        sessions: list[Session] = []
        try:
            for prompt in prompts:
                sessions.append(self.add(prompt, params))
        except BaseException:
            with self._inbox_lock:
                queued = {id(s) for s in sessions}
                self._inbox = deque(s for s in self._inbox if id(s) not in queued)
            raise
        self.run()
        return sessions

    # --- one step ----------------------------------------------------------------------------

    def step(self) -> list[Session]:
        """Admit what fits, run one forward, sample; returns the sessions that ended in this step
        (finished, cancelled or failed), forks included. (Pipelined: finish this lane's forward,
        then schedule and submit its next one.)"""
        with self.runner.lock, torch.no_grad():  # one forward at a time on the shared pool
            try:
                manager = self.runner.prefix_cache
            except Exception as exc:
                if self.runner.failure is not None:  # a grid that lost a stage: no session here would ever end
                    self.abort(f"the runner failed: {exc!r}")
                raise
            if self.running and manager is not self._manager:
                reason = "the model's KV cache was rebuilt (new weights, dtype, device or cache settings)"
                self.abort(reason)
                raise RuntimeError(f"{reason} while sessions were running; they were failed")
            self._manager = manager
            with self._inbox_lock:
                inbox, self._inbox = self._inbox, deque()  # (an interrupt cannot leave a session in both)
                self.waiting.extend(inbox)
            lane = self._next_lane
            self._next_lane = (lane + 1) % len(self.lanes)
            ended, self._unreported = self._unreported, []
            try:
                return self._step(manager, lane, ended)
            except BaseException:
                self._unreported = ended
                raise

    def _step(self, manager: KVCacheManager, lane: int, ended: list[Session]) -> list[Session]:
        """``step`` for ``lane``; appends the sessions that end to ``ended`` as they end."""
        self._finish(manager, lane, ended)
        ended += self._drop_cancelled(manager, lane)
        running = self.lanes[lane]
        others = [s for other in self.lanes if other is not running for s in other]
        # An even share of the sessions for each lane, so that every stage gets work.
        share = cdiv(len(running) + len(others) + len(self.waiting), len(self.lanes)) - len(running)
        before = {id(s) for s in running}
        try:
            sessions = self.scheduler.schedule(self.waiting, running, manager, others, max_admit=max(share, 0))
        finally:
            self._record_admissions(manager, running, before)
        if not sessions:
            return ended
        if len(self.lanes) > 1:
            with self._aborting_on_failure():
                self._in_flight[lane] = (sessions, self.runner.submit(manager, [s.seq for s in sessions]))
            return ended
        with self._aborting_on_failure():
            steps = self._forward(manager, sessions, ended)
        for part, step in steps:
            self._complete(manager, part, step, running, ended)
        _drop_done(running)
        return ended

    @contextlib.contextmanager
    def _aborting_on_failure(self) -> Iterator[None]:
        """A forward, whose failure (an interrupt included) fails every unfinished session (``abort``)
        before it propagates."""
        try:
            yield
        except BaseException as exc:
            self.abort(f"forward failed: {exc!r}")
            raise

    def _finish(self, manager: KVCacheManager, lane: int, ended: list[Session]) -> None:
        """Wait for the lane's forward in flight, if any, and sample its sessions' tokens; appends
        the sessions that end to ``ended`` as they end."""
        flight, self._in_flight[lane] = self._in_flight[lane], None
        if flight is None:
            return
        sessions, pending = flight
        with self._aborting_on_failure():
            step = pending.result()
        running = self.lanes[lane]
        self._complete(manager, sessions, step, running, ended)
        _drop_done(running)

    def _record_admissions(self, manager: KVCacheManager, running: list[Session], before: set[int]) -> None:
        """Stamp the sessions admitted since ``before`` (ids of those running then), count the blocks
        they took fresh, and the peak of blocks the running sessions hold."""
        now = time.perf_counter()
        for session in running:
            if id(session) not in before:
                session.admitted_time = now
                self.fresh_blocks += len(session.seq.block_ids) - session.seq.num_prefix_hit // manager.block_size
        live = {b for s in self.running for b in s.seq.block_ids}
        self.peak_live_blocks = max(self.peak_live_blocks, len(live))

    def _drop_cancelled(self, manager: KVCacheManager, lane: int) -> list[Session]:
        """End the cancelled sessions that wait, and those of ``lane`` (which has no forward in flight)."""
        ended = []
        for session in [s for s in self.waiting if s.cancel_requested]:
            self.waiting.remove(session)
            ended += self._end(session, "cancelled")
        running = self.lanes[lane]
        for session in [s for s in running if s.cancel_requested]:
            manager.release(session.seq)  # its computed full blocks stay cached
            ended += self._end(session, "cancelled")
        _drop_done(running)
        return ended

    def _end(self, session: Session, reason: str, error: str | None = None) -> list[Session]:
        """Mark a session (and its forks that have not started) ended; their blocks are already released."""
        ended = [session, *(f for f in session.forks if f.seq is None and not f.done)]
        for s in ended:
            s.status = RequestStatus.FAILED if error else RequestStatus.FINISHED
            s.finish_reason, s.error, s.finished_time = reason, error, time.perf_counter()
        return ended

    def _forward(self, manager: KVCacheManager, sessions: list[Session],
                 ended: list[Session]) -> list[tuple[list[Session], StepOutput]]:
        """One forward over ``sessions``. If it fails, each session runs alone, so an error that one
        request causes fails that request only. A session the failed step had already recorded as
        computed (it failed in the cache's bookkeeping, after the forward) cannot run again: its
        outputs went with the step, and it fails with the step's error."""
        try:
            return [(sessions, self.runner.forward(manager, [s.seq for s in sessions]))]
        except Exception as exc:  # noqa: BLE001 -- isolated below; a second failure fails its session
            if len(sessions) == 1:
                manager.release(sessions[0].seq, commit=False)
                ended += self._end(sessions[0], "error", f"forward failed: {exc!r}")
                return []
            failure = exc
            log.warning("a forward of %d sessions failed (%r): each runs again alone", len(sessions), exc)
        steps = []
        for session in sessions:
            if session.seq.num_new == 0:  # every session of a step has a token to compute, until it is marked
                manager.release(session.seq, commit=False)
                ended += self._end(session, "error", f"forward failed: {failure!r}")
                continue
            try:
                steps.append(([session], self.runner.forward(manager, [session.seq])))
            except Exception as exc:  # noqa: BLE001 -- this session's own failure
                manager.release(session.seq, commit=False)
                ended += self._end(session, "error", f"forward failed: {exc!r}")
        return steps

    def _complete(self, manager: KVCacheManager, sessions: list[Session], step: StepOutput,
                  running: list[Session], ended: list[Session]) -> None:
        """Score prompt tokens, start forks (into ``running``, the sessions' lane), sample a token for
        each session whose prompt is computed; appends the sessions that end to ``ended`` as they end.
        An error here would leave the step half done: every session not yet ended fails first."""
        try:
            self._complete_step(manager, sessions, step, running, ended)
        except BaseException as exc:
            self.abort(f"choosing the next tokens failed: {exc!r}")
            raise

    def _complete_step(self, manager: KVCacheManager, sessions: list[Session], step: StepOutput,
                       running: list[Session], ended: list[Session]) -> None:
        cu = step.batch.host_cu_seqlens_q
        rows, owners = [], []
        for i, session in enumerate(sessions):
            if session.params.prompt_logprobs is not None and session.status == RequestStatus.PREFILLING:
                self._score_prompt(session, step.hidden[cu[i]:cu[i + 1]])
            if len(session.seq.token_ids) < len(session.prompt):
                continue  # a prompt chunk: no token to sample yet
            rows.append(cu[i + 1] - 1)
            owners.append(session)
            if session.status == RequestStatus.PREFILLING:
                for fork in session.forks:
                    if fork.cancel_requested and not fork.done:
                        ended += self._end(fork, "cancelled")
                    if fork.done:
                        continue
                    try:
                        fork.seq = manager.fork(session.seq)  # full blocks shared, the rest copied
                    except OutOfBlocksError as exc:  # only if blocks were taken outside this engine
                        ended += self._end(fork, "error", str(exc))
                        continue
                    fork.num_cached_tokens, fork.admitted_time = session.num_cached_tokens, session.admitted_time
                    fork.prompt_logprobs = list(session.prompt_logprobs)  # the same prompt's, scored once
                    fork.status = RequestStatus.PREFILLING
                    running.append(fork)
                    rows.append(cu[i + 1] - 1)
                    owners.append(fork)
        if not owners:
            return
        logits = self.runner.logits(step.hidden[rows])  # [B, V]
        row_scores = [s.process_logits if s.logits_processor else None for s in owners]
        tokens, logprobs, errors = sample(logits, [s.params for s in owners], [s.generator for s in owners],
                                          row_scores)
        now = time.perf_counter()
        for row, (session, token, logprob) in enumerate(zip(owners, tokens, logprobs)):
            if row in errors:  # this session's own failure: the others take their tokens
                manager.release(session.seq, commit=False)
                ended += self._end(session, "error", errors[row])
                continue
            if session.params.logprobs is not None:
                session.token_logprobs += token_logprobs(logits[row : row + 1], [token], session.params.logprobs)
            if session.add_token(token, logprob, now):
                manager.release(session.seq)  # full blocks, prompt and answer, go to the radix cache
                session.status, session.finished_time = RequestStatus.FINISHED, now
                ended.append(session)
            else:
                manager.append(session.seq, [token])  # blocks reserved at admission: allocates nothing
                session.status = RequestStatus.DECODING

    def _score_prompt(self, session: Session, hidden: torch.Tensor) -> None:
        """Log-probabilities of the prompt tokens this chunk's positions predict (``hidden`` [C, H])."""
        end = len(session.seq.token_ids)
        start = end - hidden.shape[0]
        targets = session.prompt[start + 1 : end + 1]  # the last prompt position predicts no prompt token
        for offset, logits in self.runner.chunked_logits(hidden[: len(targets)]):
            chunk = targets[offset : offset + logits.shape[0]]
            session.prompt_logprobs += token_logprobs(logits, chunk, session.params.prompt_logprobs)

    def abort(self, reason: str) -> None:
        """Fail every session not yet finished and give its blocks back, committing nothing. From
        another thread it waits for the step in progress (under the runner's lock, as ``step``), so
        that no forward still writes into the blocks it gives back."""
        with self.runner.lock:
            self._abort(reason)

    def _abort(self, reason: str) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, deque()  # (an interrupt cannot leave a session in both)
            self.waiting.extend(inbox)
        for lane, flight in enumerate(self._in_flight):
            if flight is not None:
                self._in_flight[lane] = None
                try:  # a forward still in flight must land before its blocks are handed out again
                    flight[1].result()
                except Exception:  # noqa: BLE001, S110 -- its sessions fail below either way
                    pass
        # Sessions that ended in a step cut short are still in their lanes, their blocks released. A
        # step cut short may also have left a waiting session admitted, or a fork made but in no lane.
        unfinished = {id(s): s for s in [*self.running, *self.waiting] if not s.done}
        unfinished.update({id(f): f for s in list(unfinished.values()) for f in s.forks if not f.done})
        for session in unfinished.values():
            if session.seq is not None:
                self._manager.release(session.seq, commit=False)  # (nothing where released already)
            if not session.done:  # (a leader's _end ends its unstarted forks)
                self._end(session, "error", reason)
        for lane in self.lanes:
            lane.clear()
        self.waiting = deque()


def _drop_done(running: list[Session]) -> None:
    """Keep the sessions of a lane that have not ended."""
    running[:] = [s for s in running if not s.done]


def release_dropped(runner: PagedModelRunner, lanes: list[list[Session]]) -> None:
    """Queue the running sessions of a collected engine for release, committing nothing (as
    ``abort``); only those of the runner's current cache (a rebuilt cache's sessions died with it)."""
    manager = runner.built_cache
    if manager is not None:
        manager.release_later([s.seq for lane in lanes for s in lane if s.seq is not None and s.seq in manager.live],
                              commit=False)


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprobs]:
    """Row ``r``'s log-probability of ``tokens[r]`` and its ``top`` most likely tokens (``logits`` [R, V])."""
    logprobs = logits.float().log_softmax(dim=-1)  # [R, V]; fp32, as transformers and lm-eval score
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()  # [R]
    best = logprobs.topk(top, dim=-1) if top else None
    out = []
    for r, (token, logprob) in enumerate(zip(tokens, chosen)):
        alternatives = () if best is None else tuple(zip(best.indices[r].tolist(), best.values[r].tolist()))
        out.append(TokenLogprobs(int(token), logprob, alternatives))
    return out


def _params(params: SamplingParams | None) -> SamplingParams:
    """A request's sampling parameters: the defaults for None, else a ``SamplingParams``."""
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams (or None for the defaults), got {type(params).__name__}: "
                        f"{params!r}")
    return params
