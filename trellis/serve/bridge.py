"""The engine in one background thread, and the asyncio side that talks to it.

HTTP handlers run on the event loop and never wait for a forward: ``EngineBridge.submit`` queues
a request with the engine (validation only, no model work) and returns a ``RequestHandle``,
whose asyncio queue receives ``ChoiceEvent``s. The engine thread steps the engine while it has
work and after each step hands every request its new tokens with ``loop.call_soon_threadsafe``.
``cancel`` flags the request's sessions; the engine drops them at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from trellis.engine import Engine, QueueFullError, SamplingParams, Session, TokenLogprobs
from trellis.serve.metrics import ServerMetrics

log = logging.getLogger("trellis.serve")


@dataclass(frozen=True)
class ChoiceEvent:
    """New tokens of one choice of a request; the choice's last event carries ``finish_reason``
    (``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``, with ``error``)."""

    choice: int  # index among the HTTP request's choices
    tokens: list[int]
    logprobs: list[TokenLogprobs]  # of ``tokens``, when the request asked for them
    cached_tokens: int  # prompt tokens served by the radix cache
    prompt_logprobs: list[TokenLogprobs] | None = None  # on a choice's first event, when asked for
    finish_reason: str | None = None
    error: str | None = None


@dataclass(eq=False)
class RequestHandle:
    """One prompt's choices as the engine runs them: ``sessions[0]`` and its forks."""

    sessions: list[Session]
    queue: asyncio.Queue[ChoiceEvent]
    first_choice: int  # the HTTP request's index of ``sessions[0]``
    loop: asyncio.AbstractEventLoop
    # Engine thread only: tokens already sent per session, and whether its last event went out.
    sent: list[int] = field(default_factory=list)
    closed: list[bool] = field(default_factory=list)
    counted_prompt: bool = False

    def __post_init__(self) -> None:
        self.sent = [0] * len(self.sessions)
        self.closed = [False] * len(self.sessions)

    def deliver(self, events: list[ChoiceEvent]) -> None:
        for event in events:
            self.queue.put_nowait(event)


class EngineBridge:
    """Steps ``engine`` in one background thread while it has work; see the module docstring."""

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._wake = threading.Condition()
        self._handles: list[RequestHandle] = []
        self._closing = False
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="trellis-engine", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Stop after the current step; every unfinished request fails with a shutdown error."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompts: Sequence[tuple[Sequence[int], SamplingParams]], n: int,
               queue: asyncio.Queue[ChoiceEvent]) -> list[RequestHandle]:
        """Queue each prompt's ``n`` choices with its params (on the event loop), prompt ``p``'s first
        choice numbered ``p * n``; raises what ``Engine.add`` raises, having queued none of them."""
        loop = asyncio.get_running_loop()
        with self._wake:  # registered before the engine can step it, so no event is missed
            if not self.ready:  # (under the lock: once closing, the engine thread's last abort may have run)
                raise RuntimeError("the engine is not running")
            # All checked first: a refused prompt must not leave the ones before it computing.
            for prompt, params in prompts:
                self.engine.check(prompt, params, n=n)
            limit = self.engine.max_waiting  # the engine thread only ever shortens the queue meanwhile
            if limit is not None and self.engine.num_waiting + len(prompts) > limit:
                raise QueueFullError(f"{self.engine.num_waiting} requests are waiting, and {len(prompts)} more "
                                     f"would pass the limit of {limit}; try again shortly")
            handles = []
            for p, (prompt, params) in enumerate(prompts):
                leader = self.engine.add(prompt, params, n=n)
                handles.append(RequestHandle([leader, *leader.forks], queue, p * n, loop))
            self._handles += handles
            self._wake.notify()
        return handles

    def cancel(self, handle: RequestHandle, choice: int | None = None) -> None:
        """Cancel one choice (an index into ``handle.sessions``) or all of them, from the event loop."""
        for i, session in enumerate(handle.sessions):
            if choice is None or i == choice:
                self.engine.cancel(session)
        with self._wake:
            self._wake.notify()

    # --- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closing and not self.engine.has_work:
                        self._wake.wait()
                    if self._closing:
                        return
                try:
                    self.engine.step()
                except Exception as exc:  # the engine failed its sessions; the server goes on
                    log.exception("engine step failed")
                    self.engine.abort(f"the engine failed: {exc!r}")
                self._publish()
        finally:
            with self._wake:  # from here on submit refuses: what it queued before, the abort fails
                self._closing = True
            self.engine.abort("the server is shutting down")
            self._publish()

    def _publish(self) -> None:
        with self._wake:
            handles = list(self._handles)
        done = []
        for handle in handles:
            events = self._events(handle)
            if events:
                try:
                    handle.loop.call_soon_threadsafe(handle.deliver, events)
                except RuntimeError:  # the event loop has closed: nobody is listening
                    pass
            if all(handle.closed):
                done.append(handle)
        if done:
            with self._wake:
                self._handles = [h for h in self._handles if h not in done]

    def _events(self, handle: RequestHandle) -> list[ChoiceEvent]:
        events = []
        leader = handle.sessions[0]
        if self.metrics and not handle.counted_prompt and leader.seq is not None:
            handle.counted_prompt = True
            self.metrics.admitted(len(leader.prompt), leader.num_cached_tokens)
        for i, session in enumerate(handle.sessions):
            if handle.closed[i]:
                continue
            sent, count = handle.sent[i], len(session.generated)
            if count == sent and not session.done:
                continue
            if self.metrics:
                self.metrics.tokens(session, sent, count)
            logprobs = session.token_logprobs[sent:count] if session.params.logprobs is not None else []
            prompt_logprobs = session.prompt_logprobs if sent == 0 and session.params.prompt_logprobs is not None \
                else None
            handle.sent[i] = count
            handle.closed[i] = session.done
            if session.done and self.metrics:
                self.metrics.finished(session)
            events.append(ChoiceEvent(handle.first_choice + i, session.generated[sent:count], logprobs,
                                      session.num_cached_tokens, prompt_logprobs,
                                      session.finish_reason if session.done else None, session.error))
        return events
