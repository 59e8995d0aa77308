"""Sessions over the block pool and the radix cache: admit, grow, commit, roll back, release.

A session (``PagedSequence``) holds one pool reference on each of its blocks and a lock on the
deepest radix node covering its committed prefix. Every method here keeps the accounting
invariant ``pool ref count == tree refs + session refs`` for every block, and an allocation
that cannot be satisfied raises ``OutOfBlocksError`` before anything is changed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from trellis.cache.block_pool import BlockPool, OutOfBlocksError
from trellis.cache.interrupts import InterruptDeferringLock
from trellis.cache.radix import PrefixMatch, RadixCache, RadixNode, TailMatch
from trellis.utils import cdiv, is_int


def blocks_for_fork(computed_tokens: int, kv_tokens: int, block_size: int) -> int:
    """Blocks a fork of a session with ``computed_tokens`` computed takes (``KVCacheManager.fork``)
    once it holds ``kv_tokens``: a copy of the partial tail block, and the blocks past it."""
    return cdiv(kv_tokens, block_size) - computed_tokens // block_size


@dataclass(eq=False)
class PagedSequence:
    """One session's view of the paged KV cache."""

    token_ids: list[int]  # every token of the session; the first ``num_cached`` have K/V in the cache
    block_ids: list[int] = field(default_factory=list)  # block i holds tokens [i*bs, (i+1)*bs)
    num_cached: int = 0
    num_prefix_hit: int = 0  # tokens served by the radix cache at admission
    node: RadixNode | None = None  # locked radix node covering the committed blocks
    num_committed_blocks: int = 0
    # (full blocks, the tree's evictions) at the last offer to the tree: while both stay, offering
    # the blocks again would find the tree as that offer left it (``commit``).
    offered: tuple[int, int] | None = None
    released: bool = False
    # False once any of its K/V were computed in a way a later prompt of the same tokens would
    # not reproduce (caller-given positions, embeddings instead of token ids): never cached.
    shareable: bool = True

    @property
    def num_new(self) -> int:
        """Tokens whose K/V the next forward must compute."""
        return len(self.token_ids) - self.num_cached


@dataclass(frozen=True)
class AdmissionCost:
    """What admitting a prompt would take now (``KVCacheManager.admission_cost``)."""

    cached_tokens: int  # leading prompt tokens the radix cache would serve
    new_blocks: int  # blocks to allocate for the rest (and any reserved room)
    available_blocks: int  # free and evictable blocks, but for the prompt's own prefix (admission pins it)
    fits: bool  # ``available_blocks`` cover ``new_blocks``


class KVCacheManager:
    """The paged KV cache with prefix sharing: what ``model.prefix_cache`` is.

    Thread-safe: one re-entrant lock serialises every change. Sessions abandoned by a garbage
    collected handle are queued by ``release_later`` and released before anything else decides
    from the pool's occupancy (admitting, allocating, forking, truncating, ``stats``) and before
    the cache is saved.
    """

    def __init__(self, pool: BlockPool, owner_lock: AbstractContextManager | None = None) -> None:
        self.pool = pool
        self.radix = RadixCache(pool)
        self.block_size = pool.block_size
        self.lock = InterruptDeferringLock()  # re-entrant; Ctrl-C waits for a change to be whole
        self.live: set[PagedSequence] = set()
        self._pending: deque[tuple[PagedSequence, bool]] = deque()  # (session, commit)
        # Run by ``reset``: the owner drops what it derived alongside the cached K/V (packed weights),
        # under ``owner_lock`` (taken before this lock): the runner's, under which forwards read them.
        self.on_reset: list[Callable[[], None]] = []
        self.owner_lock = owner_lock if owner_lock is not None else nullcontext()

    # --- session lifecycle ---------------------------------------------------------------

    def admission_cost(self, tokens: Sequence[int], extra_tokens: int = 0, max_reuse: int | None = None) -> AdmissionCost:
        """What ``admit(tokens, max_reuse, extra_tokens)`` would take now; changes nothing (no edge
        split, no LRU touch), so it is safe for planning which sessions to admit."""
        with self.lock:
            self.release_pending()
            match = self.radix.peek(tokens, max_tokens=self._reuse_limit(tokens, max_reuse))
            return self._price(tokens, extra_tokens, match)[0]

    def _price(self, tokens: Sequence[int], extra_tokens: int,
               match: PrefixMatch) -> tuple[AdmissionCost, TailMatch | None]:
        """What admitting ``tokens`` over ``match`` costs, and the tail it copies: none where holding
        the match's tail while its K/V are copied would leave the allocation too few blocks (its
        tokens are computed instead)."""
        new_blocks = cdiv(len(tokens) + extra_tokens, self.block_size) - len(match.blocks)
        # Blocks that only the tree holds are evictable; once admitted, the session holds its own.
        pinned = sum(self.pool.ref_counts[b] == 1 for b in match.blocks)
        available = self._available() - pinned
        tail = match.tail
        if tail is not None and self.radix.evictable(tail) and new_blocks + 1 > available:
            tail = None
        cached = len(match.blocks) * self.block_size + (tail.num_tokens if tail else 0)
        return AdmissionCost(cached, new_blocks, available, new_blocks <= available), tail

    def available_blocks(self) -> int:
        """Blocks that could be allocated now: free ones, and those only the radix cache holds (evictable)."""
        with self.lock:
            self.release_pending()
            return self._available()

    def _available(self) -> int:
        # Releases nothing: a release between a match and its pricing could free the matched tail.
        return self.pool.num_free + self.radix.evictable_blocks()

    def cached_tokens(self, tokens: Sequence[int], max_tokens: int | None = None) -> int:
        """How many leading tokens of ``tokens`` (at most ``max_tokens``; by default all but the
        last) the radix cache would serve now, whole blocks and a tail's tokens."""
        with self.lock:
            self.release_pending()
            return self.radix.cached_tokens(tokens, max_tokens)

    def can_ever_hold(self, num_tokens: int) -> bool:
        """Whether an empty cache could hold one session of ``num_tokens`` tokens."""
        return cdiv(num_tokens, self.block_size) <= self.pool.num_blocks

    def admit(self, tokens: Sequence[int], max_reuse: int | None = None, extra_tokens: int = 0,
              prompt_tokens: int | None = None) -> PagedSequence:
        """Start a session over ``tokens``, taking the longest cached prefix (at most
        ``max_reuse`` tokens, and never all of them) and blocks for the rest, plus room for
        ``extra_tokens`` more. All or nothing: ``OutOfBlocksError`` leaves the cache as it was
        (a matched edge may be split, which changes no cached content). ``prompt_tokens``: the
        whole prompt's length where ``tokens`` is its first chunk (the hit rate counts prompts)."""
        with self.lock:
            seq = self._admit(tokens, max_reuse, extra_tokens)
            try:
                self._count_admitted([seq], [prompt_tokens or len(tokens)])
            except BaseException:
                self.release(seq, commit=False)
                raise
            return seq

    def _admit(self, tokens: Sequence[int], max_reuse: int | None, extra_tokens: int) -> PagedSequence:
        """``admit`` without the bookkeeping of a success (LRU time, hit statistics)."""
        with self.lock:
            self.release_pending()
            if len(tokens) == 0:
                raise ValueError("cannot start a session with an empty prompt")
            match = self.radix.match(tokens, max_tokens=self._reuse_limit(tokens, max_reuse), touch=False)
            tail = self._price(tokens, extra_tokens, match)[1] if match.tail else None  # as admission_cost decides
            if tail is not None:
                self.pool.incref([tail.block])  # allocation may evict it from the tree: keep it to copy
            try:
                seq = PagedSequence(list(tokens))  # holds nothing yet; each hold is recorded as it is taken
                self.live.add(seq)
                try:
                    self.radix.lock(match.node)
                    seq.node = match.node
                    self.pool.incref(match.blocks)
                    seq.block_ids = list(match.blocks)
                    seq.num_cached = seq.num_prefix_hit = len(match.blocks) * self.block_size
                    seq.num_committed_blocks = len(match.blocks)
                    self.reserve(seq, extra_tokens)
                    if tail is not None:
                        # The shared tokens' K/V are those of the same tokens at the same positions
                        # after the same prefix; the block's later slots are overwritten by the prefill.
                        self.pool.copy_block(tail.block, seq.block_ids[len(match.blocks)])
                        seq.num_cached = seq.num_prefix_hit = seq.num_cached + tail.num_tokens
                except BaseException:  # out of blocks, an interrupt during the copy: leave nothing behind
                    self.release(seq, commit=False)
                    raise
            finally:
                if tail is not None:
                    self.pool.decref([tail.block])
            return seq

    def _count_admitted(self, seqs: Sequence[PagedSequence], lookups: Sequence[int]) -> None:
        """Admissions that stand: their prefixes become the most recently used, and count as hits
        (each of ``lookups`` tokens looked up)."""
        for seq, looked_up in zip(seqs, lookups, strict=True):
            self.radix.touch(seq.node)
            self.radix.record_lookup(looked_up, seq.num_prefix_hit)

    @staticmethod
    def _reuse_limit(tokens: Sequence[int], max_reuse: int | None) -> int:
        return len(tokens) - 1 if max_reuse is None else min(max_reuse, len(tokens) - 1)

    def admit_batch(self, rows: Sequence[Sequence[int]], max_reuse: Sequence[int]) -> list[PagedSequence]:
        """``admit`` each row (row ``i`` reusing at most ``max_reuse[i]`` cached tokens); all or nothing."""
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"row {i} of the batch has no tokens (empty prompt or all padding)")
        seqs: list[PagedSequence] = []
        with self.lock:
            try:
                for row, reuse in zip(rows, max_reuse, strict=True):
                    seqs.append(self._admit(row, reuse, 0))
                self._count_admitted(seqs, [len(row) for row in rows])
            except BaseException:
                self.rollback_batch(seqs)
                raise
        return seqs

    def _check_held(self, seq: PagedSequence) -> None:
        """Refuse a session this cache does not hold: released, or another cache's (its block ids
        index another pool: changing it here would free or share this pool's blocks)."""
        if seq.released:
            raise RuntimeError("session already released")
        if seq not in self.live:
            raise ValueError("this session belongs to another KV cache (another model's, or this model's before it "
                             "was rebuilt)")

    def append(self, seq: PagedSequence, tokens: Sequence[int]) -> None:
        """Add tokens to a session and make room for their K/V."""
        with self.lock:
            self._check_held(seq)
            before = len(seq.token_ids)
            seq.token_ids.extend(tokens)
            try:
                self.reserve(seq)
            except OutOfBlocksError:
                del seq.token_ids[before:]
                raise

    def extend_batch(self, seqs: Sequence[PagedSequence], rows: Sequence[Sequence[int]]) -> None:
        """``append`` row ``i`` to session ``i``; all or nothing."""
        if len(rows) != len(seqs):
            raise ValueError(f"batch of {len(rows)} rows continues a cache of {len(seqs)} sequences")
        with self.lock:
            done = 0
            try:
                for seq, row in zip(seqs, rows):
                    self.append(seq, row)
                    done += 1
            except BaseException:
                self.rollback_batch(seqs[:done], [len(row) for row in rows[:done]])
                raise

    def rollback_batch(self, seqs: Sequence[PagedSequence], appended: Sequence[int] | None = None) -> None:
        """Undo a step whose forward failed, so nothing it started stays half-done: with
        ``appended`` None the sessions were admitted by it and are released uncommitted;
        otherwise session ``i`` loses its last ``appended[i]`` tokens: uncomputed ones dropped,
        computed ones (a Ctrl-C held back until the step had marked them) truncated away."""
        with self.lock:
            if appended is None:
                for seq in seqs:
                    self.release(seq, commit=False)
                return
            for seq, count in zip(seqs, appended, strict=True):
                if not 0 <= count <= len(seq.token_ids):
                    raise ValueError(f"cannot roll back {count} tokens of a session of {len(seq.token_ids)}")
            computed = [count > seq.num_new for seq, count in zip(seqs, appended)]
            if any(computed):
                self.truncate([seq for seq, done in zip(seqs, computed) if done],
                              [len(seq.token_ids) - count for seq, count, done in zip(seqs, appended, computed) if done])
            for seq, count, done in zip(seqs, appended, computed):
                if count and not done:
                    del seq.token_ids[len(seq.token_ids) - count:]

    def reserve(self, seq: PagedSequence, extra_tokens: int = 0) -> None:
        """Ensure ``seq`` has blocks for all its tokens plus ``extra_tokens``."""
        with self.lock:
            needed = cdiv(len(seq.token_ids) + extra_tokens, self.block_size) - len(seq.block_ids)
            if needed > 0:
                seq.block_ids.extend(self.allocate(needed))

    def mark_computed(self, seq: PagedSequence) -> None:
        """Record that the forward wrote K/V for all of ``seq``'s tokens, and share its full blocks."""
        with self.lock:
            seq.num_cached = len(seq.token_ids)
            self.commit(seq)

    def commit(self, seq: PagedSequence) -> None:
        """Insert the session's full, computed blocks into the radix tree so later prompts hit them.

        Where the tree already holds other blocks for the same tokens (another forward computed
        them), the session keeps its own K/V and locks only the prefix whose blocks it shares with
        the tree: the tree's copies stay evictable, so a rerun of a cached prompt never pins more
        blocks than its first run. Its own blocks past that prefix are offered again at the next
        commit after a block fills or the tree evicts (the tree adopts them once its copies are
        evicted)."""
        with self.lock:
            full = seq.num_cached // self.block_size
            if full <= seq.num_committed_blocks or not seq.shareable:
                return
            # The tree gives up a copy only by eviction: with the same full blocks and no
            # eviction since the last offer, offering them again would change nothing. (A cached
            # prompt run again recomputes its last block, which the tree holds: it would walk the
            # tree at every decode step for the rest of the session.)
            offer = (full, self.radix.evicted_blocks)
            if seq.offered == offer:
                return
            node = self.radix.insert(seq.token_ids[: full * self.block_size], seq.block_ids[:full])
            depth = self.radix.depth(node)
            self.radix.lock(node)
            old, seq.node, seq.num_committed_blocks = seq.node, node, depth
            seq.offered = offer
            self.radix.unlock(old)

    def truncate(self, seqs: Sequence[PagedSequence], lengths: Sequence[int]) -> None:
        """Roll each session back to its first ``lengths[i]`` tokens (rejected speculative drafts).

        Blocks past the new end are dropped. The block a new end falls inside is written again
        by the next forward, so if anyone else holds it (the radix tree, which cached it full,
        or a fork) the session takes a private copy first (copy-on-write): what the tree caches
        is the K/V of the tokens it was cached with, and stays valid for them. The copies are
        made before any session changes, so a full pool (or a failed copy) changes nothing.
        """
        with self.lock:
            self.release_pending()
            for seq, length in zip(seqs, lengths, strict=True):
                self._check_held(seq)
                if not is_int(length) or not 0 <= length <= len(seq.token_ids):
                    raise ValueError(f"cannot truncate a session of {len(seq.token_ids)} tokens to {length}")
            shared_tail = [length % self.block_size > 0
                           and self.pool.ref_counts[seq.block_ids[length // self.block_size]] > 1
                           for seq, length in zip(seqs, lengths)]
            next_copy = iter(self._copies([seq.block_ids[length // self.block_size]
                                           for seq, length, shared in zip(seqs, lengths, shared_tail) if shared]))
            for seq, length, shared in zip(seqs, lengths, shared_tail):
                self._truncate(seq, length, next(next_copy) if shared else None)

    def _truncate(self, seq: PagedSequence, length: int, copy: int | None) -> None:
        full = length // self.block_size
        kept = cdiv(length, self.block_size)
        dropped = seq.block_ids[kept:]
        if copy is not None:  # the partial tail block: the session's own copy replaces the shared one
            dropped.append(seq.block_ids[full])
            seq.block_ids[full] = copy
        del seq.block_ids[kept:], seq.token_ids[length:]
        self.pool.decref(dropped)
        seq.num_cached = min(seq.num_cached, length)
        seq.offered = None  # the blocks past `length` will hold other tokens
        if full < seq.num_committed_blocks:
            # Lock only the committed blocks still in the session's prefix; the tree holds them
            # (the old lock kept them), and the match splits an edge to end exactly there.
            node = self.radix.match(seq.token_ids, max_tokens=full * self.block_size).node
            self.radix.lock(node)
            self.radix.unlock(seq.node)
            seq.node, seq.num_committed_blocks = node, full

    def release(self, seq: PagedSequence, commit: bool = True) -> None:
        """End a session: share its full blocks (unless ``commit`` is False), keep its partly filled
        last block as a tail of its node for later prompts to copy from, and drop its references."""
        with self.lock:
            if seq.released:
                return
            self._check_held(seq)
            if commit:
                self.commit(seq)
                full, rest = divmod(seq.num_cached, self.block_size)
                if rest and seq.shareable:
                    # The tail continues the tree's path of the session's full blocks: its own, or
                    # the tree's copies of them (a cached prompt run again computed its own last one).
                    node = seq.node if seq.num_committed_blocks == full else \
                        self.radix.node_at(seq.token_ids[: full * self.block_size])
                    if node is not None:
                        self.radix.add_tail(node, seq.token_ids[full * self.block_size : seq.num_cached],
                                            seq.block_ids[full])
            # Released first: an error below (a bug it detects) must not make every later release retry it.
            seq.released = True
            self.live.discard(seq)
            try:
                self.radix.unlock(seq.node)
            finally:
                self.pool.decref(seq.block_ids)

    def release_later(self, seqs: Sequence[PagedSequence], commit: bool = True) -> None:
        """Queue sessions for release (``release``'s ``commit``); safe from a finalizer or another thread."""
        self._pending.extend((seq, commit) for seq in seqs)

    def fork(self, seq: PagedSequence) -> PagedSequence:
        """A copy of ``seq`` that shares its full blocks and owns a copy of its partial tail block."""
        with self.lock:
            if seq.released:
                raise RuntimeError("session already released: it cannot be forked")
            self._check_held(seq)
            self.release_pending()
            full = seq.num_cached // self.block_size
            child = PagedSequence(  # holds nothing yet; each hold is recorded as it is taken
                list(seq.token_ids),
                num_cached=seq.num_cached,
                num_prefix_hit=seq.num_prefix_hit,
                num_committed_blocks=seq.num_committed_blocks,
                shareable=seq.shareable,
            )
            self.live.add(child)
            try:
                self.radix.lock(seq.node)
                child.node = seq.node
                self.pool.incref(seq.block_ids[:full])
                child.block_ids = seq.block_ids[:full]
                child.block_ids.extend(self._copies(seq.block_ids[full:]))
            except BaseException:  # out of blocks for the tail's copy: leave nothing behind
                self.release(child, commit=False)
                raise
            return child

    def fork_all(self, seqs: Sequence[PagedSequence]) -> list[PagedSequence]:
        """``fork`` of each of ``seqs`` (one may repeat), all or none: where one fork fails (out of
        blocks for a tail's copy), the others made before it are released."""
        forks: list[PagedSequence] = []
        with self.lock:
            try:
                for seq in seqs:
                    forks.append(self.fork(seq))
            except BaseException:
                for fork in forks:
                    self.release(fork, commit=False)
                raise
        return forks

    def _copies(self, blocks: Sequence[int]) -> list[int]:
        """New blocks holding copies of ``blocks``' K/V; if a copy fails, none (the new blocks go back)."""
        copies = self.allocate(len(blocks))
        try:
            for src, dst in zip(blocks, copies):
                self.pool.copy_block(src, dst)
        except BaseException:
            self.pool.decref(copies)
            raise
        return copies

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, evicting unlocked cached prefixes if the pool is short.

        Checks first that eviction can cover the shortfall, so a failed request evicts nothing.
        """
        with self.lock:
            self.release_pending()
            if not self.pool.can_alloc(n):
                short = n - self.pool.num_free
                evictable = self.radix.evictable_blocks()
                if evictable < short:
                    raise OutOfBlocksError(
                        f"KV cache full: {n} blocks of {self.block_size} tokens needed, {self.pool.num_free} free "
                        f"and {evictable} evictable of {self.pool.num_blocks} ({len(self.live)} live sessions); "
                        "use a larger num_blocks / kv_cache_memory, a shorter prompt or fewer new tokens"
                    )
                self.radix.evict(short)
            return self.pool.alloc(n)

    def release_pending(self) -> None:
        """Release the sessions ``release_later`` queued (every decision from the pool or the tree
        calls this first; so does saving the cache)."""
        with self.lock:
            while self._pending:
                self.release(*self._pending[0])  # dequeued once released: an interrupt loses none
                self._pending.popleft()

    # --- whole-cache operations ----------------------------------------------------------

    def reset(self) -> None:
        """Forget every cached prefix (live sessions keep working), then run ``on_reset`` (the
        runner makes what it derives from the weights afresh: weights written in place). From
        another thread it waits for the owner's forward in progress (``owner_lock``)."""
        with self.owner_lock, self.lock:
            self.clear()
            for callback in self.on_reset:
                callback()

    def clear(self) -> None:
        """Forget every cached prefix (live sessions keep working) and nothing else: the pool and
        what the runner derives from the weights stay, as they are valid while the weights do not
        change. An empty cache without ``reset``'s cost, for measuring cold prompts."""
        with self.lock:
            self.release_pending()
            self.radix.reset()
            for seq in self.live:
                seq.node, seq.num_committed_blocks, seq.offered = self.radix.root, 0, None
                self.radix.lock(seq.node)

    def stats(self) -> dict[str, float | int]:
        with self.lock:
            self.release_pending()
            return {**self.radix.stats(), "live_sessions": len(self.live)}

    def check_integrity(self) -> None:
        """Every block's count equals its tree refs plus its session refs; see RadixCache.check_integrity."""
        with self.lock:
            self.radix.check_integrity()
            expected = self.radix.tree_block_refs()
            for seq in self.live:
                for b in seq.block_ids:
                    expected[b] = expected.get(b, 0) + 1
            for b, count in enumerate(self.pool.ref_counts):
                if count != expected.get(b, 0):
                    raise AssertionError(f"block {b}: ref count {count}, expected {expected.get(b, 0)}")
