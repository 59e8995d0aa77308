"""What one engine step computes: which waiting sessions join, and how many tokens each session runs.

Three rules shape a step, all within a token budget (``max_batch_tokens``):

- **Chunked prefill.** Every decoding session runs its next token. The rest of the budget goes to
  prompts, oldest first: a prompt longer than what is left is prefilled over several steps, a
  chunk at a time, so running sessions keep decoding while it arrives. A chunk ends on a block
  boundary where it can, so each step's full blocks enter the radix cache at once.
- **In-batch prefix caching.** A waiting session whose uncached prefix shares a whole block with
  the prompt of a session being prefilled waits: once that prompt is computed, its blocks are in
  the cache and the waiting session takes them instead of computing them a second time.
- **Fair admission.** Waiting sessions are admitted first come, first served, except that one
  that must wait (not enough free blocks, or held back by the rule above) can be overtaken by
  later ones that can start now; at most ``max_overtakes`` times, after which nothing is admitted
  ahead of it. No session waits forever behind a stream of cache hits.

Admission reserves every block a session may need (prompt, answer, and the forks of an ``n > 1``
request), so a running session never runs out of blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from transformers.generation.continuous_batching.requests import RequestStatus

from trellis.cache.block_pool import OutOfBlocksError
from trellis.cache.manager import AdmissionCost, KVCacheManager, blocks_for_fork
from trellis.cache.radix import shared_whole_blocks
from trellis.engine.session import Session
from trellis.utils import is_int, store_as_ints

LOOKAHEAD = 8  # waiting sessions that must wait, passed over in one step before admission stops looking


@dataclass
class Scheduler:
    """Plans engine steps. ``max_batch_tokens``: tokens one forward computes (decode tokens
    included; a prompt chunk gets at least one block's worth); ``max_running``: sessions running at
    once; ``max_overtakes``: how many later sessions may be admitted ahead of a waiting one."""

    max_batch_tokens: int = 4096
    max_running: int = 256
    max_overtakes: int = 16

    def __post_init__(self) -> None:
        for name, least in (("max_batch_tokens", 1), ("max_running", 1), ("max_overtakes", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < least:
                kind = "a positive" if least else "a non-negative"
                raise ValueError(f"{name} must be {kind} integer, got {value!r}")
        store_as_ints(self, ("max_batch_tokens", "max_running", "max_overtakes"))

    def schedule(self, waiting: deque[Session], running: list[Session], manager: KVCacheManager,
                 others: Sequence[Session] = (), max_admit: int | None = None) -> list[Session]:
        """Give each running session its tokens for the next forward (a decode token, or its next
        prompt chunk appended to ``seq``), admit what fits from ``waiting`` into ``running`` (at
        most ``max_admit``), and return the sessions that have tokens to compute, ordered by their
        block ids: sessions over one cached prompt sit side by side, however they arrived, and the
        C++ attention reads the keys they share once a step for all of them. ``others``: sessions
        running elsewhere on the same cache (the engine's other lanes), which count towards
        ``max_running`` and whose prompts and forks are taken into account."""
        decoding = [s for s in running if s.status == RequestStatus.DECODING]
        budget = max(self.max_batch_tokens - len(decoding), manager.block_size)
        for session in running:
            if session.status == RequestStatus.PREFILLING and budget > 0:
                start = len(session.seq.token_ids)
                end = chunk_end(start, len(session.prompt), budget, manager.block_size)
                manager.append(session.seq, session.prompt[start:end])  # blocks reserved at admission
                budget -= end - start
        self._admit(waiting, running, others, manager, budget, max_admit)
        return sorted((s for s in running if s.seq.num_new > 0), key=lambda s: s.seq.block_ids)

    def _admit(self, waiting: deque[Session], running: list[Session], others: Sequence[Session],
               manager: KVCacheManager, budget: int, max_admit: int | None) -> None:
        passed_over: list[Session] = []
        admitted = 0
        with manager.lock:
            for session in list(waiting):
                if (budget <= 0 or width([*running, *others]) + 1 + len(session.forks) > self.max_running
                        or admitted == max_admit):
                    break
                reuse = 0 if session.params.prompt_logprobs is not None else None
                extra = session.params.max_new_tokens - 1
                cost = manager.admission_cost(session.prompt, extra_tokens=extra, max_reuse=reuse)
                held_back = reuse is None and computing_shared_blocks([*running, *others], session, cost,
                                                                      manager.block_size)
                if held_back or not self._try_admit(manager, session, cost, [*running, *others], budget, reuse):
                    passed_over.append(session)
                    if session.overtaken >= self.max_overtakes or len(passed_over) >= LOOKAHEAD:
                        break  # it has waited long enough: nothing more goes ahead of it
                    continue
                waiting.remove(session)
                running.append(session)
                admitted += 1
                budget -= session.seq.num_new
                for earlier in passed_over:
                    earlier.overtaken += 1
                if any(earlier.overtaken >= self.max_overtakes for earlier in passed_over):
                    break  # one that waits has been overtaken enough: nothing more goes ahead of it
            if passed_over and not running and not others:
                # Nothing this engine runs could free blocks for them: only holders outside it can.
                stats = manager.stats()
                raise OutOfBlocksError(
                    f"request {passed_over[0].request_id} does not fit in the KV pool even after eviction (nor "
                    f"do the other {len(passed_over) - 1} waiting requests tried), and this engine runs nothing "
                    f"that could free blocks ({stats['live_sessions']} sessions held elsewhere, "
                    f"{stats['free_blocks']} of {stats['total_blocks']} blocks free)"
                )

    def _try_admit(self, manager: KVCacheManager, session: Session, cost: AdmissionCost, running: list[Session],
                   budget: int, reuse: int | None) -> bool:
        """Take the session's cached prefix, its first prompt chunk and all its blocks, or change nothing."""
        bs = manager.block_size
        forks = fork_blocks(session, bs)
        if not cost.fits:
            return False
        # Blocks promised to forks are not for others to take.
        if (forks or promised_blocks(running, bs)) and \
                cost.new_blocks + forks + promised_blocks(running, bs) > cost.available_blocks:
            return False
        prompt = session.prompt
        end = chunk_end(cost.cached_tokens, len(prompt), budget, bs)
        try:
            seq = manager.admit(prompt[:end], max_reuse=reuse,
                                extra_tokens=len(prompt) - end + session.params.max_new_tokens - 1,
                                prompt_tokens=len(prompt))
        except OutOfBlocksError:
            return False
        session.seq, session.num_cached_tokens = seq, seq.num_prefix_hit
        session.status = RequestStatus.PREFILLING
        return True


def chunk_end(start: int, prompt_len: int, budget: int, block_size: int) -> int:
    """Where a prompt chunk that starts at ``start`` ends: as far as ``budget`` allows, cut back to
    a block boundary unless that leaves nothing."""
    end = min(prompt_len, start + budget)
    if end < prompt_len and end // block_size * block_size > start:
        end = end // block_size * block_size
    return end


def width(running: Sequence[Session]) -> int:
    """Sessions running, counting the forks a prefilling session will start."""
    return sum(1 + (len(s.forks) if s.status == RequestStatus.PREFILLING else 0) for s in running)


def fork_blocks(session: Session, block_size: int) -> int:
    """Blocks the session's forks take when they start: each copies the leader's blocks past its
    full prompt blocks (the partial tail, and the room reserved for the answer)."""
    return blocks_for_fork(len(session.prompt), session.kv_tokens, block_size) * len(session.forks)


def promised_blocks(running: Sequence[Session], block_size: int) -> int:
    """Blocks the forks of sessions still prefilling will take."""
    return sum(fork_blocks(s, block_size) for s in running if s.status == RequestStatus.PREFILLING)


def computing_shared_blocks(running: Sequence[Session], session: Session, cost: AdmissionCost, block_size: int) -> bool:
    """Whether a prompt being prefilled will compute whole blocks of ``session``'s prompt that the
    cache does not hold yet (and that admission could take: never all of the prompt)."""
    return any(other.status == RequestStatus.PREFILLING
               and shared_whole_blocks(other.prompt, session.prompt, block_size) > cost.cached_tokens
               for other in running)
