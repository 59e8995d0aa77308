"""A radix tree over token ids whose edges hold whole KV blocks (RadixAttention).

Every edge carries a whole number of blocks, so only full blocks are ever shared; a
prompt's partial tail block always belongs to its session. A node also keeps the partly filled
last blocks of finished sessions that ended there (its ``tails``), shared by no one. Where a
prompt leaves the cached path inside a block, a match also names the block, full or partly
filled, that continues it furthest (the match's ``tail``): its K/V for the tokens the prompt
shares with it can be copied into the session's own block instead of computed. The tree holds
one reference on each of its blocks. Sessions lock the path to their deepest node; eviction takes
blocks from unlocked leaves and tails from any node, least recently used first.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from trellis.cache.block_pool import BlockPool


def shared_whole_blocks(earlier: Sequence[int], tokens: Sequence[int], block_size: int) -> int:
    """The tokens of ``tokens`` in whole blocks that admission could take by reference from a
    cache holding ``earlier``: their common prefix, never all of ``tokens`` (admission computes at
    least one), rounded down to whole blocks."""
    limit = min(len(earlier), len(tokens) - 1)
    n = 0
    while n < limit and earlier[n] == tokens[n]:
        n += 1
    return n // block_size * block_size


class RadixNode:
    __slots__ = ("blocks", "children", "last_access", "lock_count", "parent", "tails", "tokens")

    def __init__(self, parent: RadixNode | None, tokens: tuple[int, ...], blocks: list[int]) -> None:
        self.parent = parent
        self.tokens = tokens  # the edge's tokens, len(blocks) * block_size of them
        self.blocks = blocks
        self.children: dict[tuple[int, ...], RadixNode] = {}  # keyed by the child's first block of tokens
        # Partly filled blocks that continue this node's path, keyed by their (1 to block_size - 1)
        # tokens: only ever copied from, so no session holds them and eviction may take them any time.
        self.tails: dict[tuple[int, ...], int] = {}
        self.lock_count = 0
        self.last_access = 0


# Each node's (node, parent, edge tokens, blocks, children, tails, last access): ``RadixCache.snapshot``.
TreeSnapshot = list[tuple[RadixNode, RadixNode | None, tuple[int, ...], list[int], dict, dict, int]]


@dataclass
class TailMatch:
    """A cached block whose first ``num_tokens`` (fewer than a block) continue a matched prefix."""

    block: int
    num_tokens: int
    node: RadixNode  # the node whose edge holds ``block``, or whose tails do
    loose: bool = False  # one of the node's tails: evictable whatever the node's locks


@dataclass
class PrefixMatch:
    blocks: list[int]  # the cached blocks of the prefix, in order
    node: RadixNode  # the deepest node; its path from the root is exactly the matched prefix
    tail: TailMatch | None = None  # the block after ``blocks`` that shares the most further tokens

    def num_tokens(self, block_size: int) -> int:
        """Tokens whose K/V the cache holds: the whole blocks and the tail's shared tokens."""
        return len(self.blocks) * block_size + (self.tail.num_tokens if self.tail else 0)


class RadixCache:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self._clock = itertools.count(1)
        self.root = RadixNode(None, (), [])
        self.root.lock_count = 1  # the root is never evicted
        self.lookup_tokens = 0
        self.hit_tokens = 0
        self.evicted_blocks = 0
        # evictable_blocks' count, and the (pool version, tree version) it was counted at: pricing every
        # waiting request between two changes of the cache reads it, where a count walks the whole tree.
        self._version = 0  # counts changes to nodes, their blocks, tails and locks
        self._evictable: tuple[tuple[int, int], int] | None = None

    # --- lookup and insertion -------------------------------------------------------------

    def match(self, tokens: Sequence[int], max_tokens: int | None = None, touch: bool = True) -> PrefixMatch:
        """Longest cached prefix of ``tokens`` in whole blocks, and the tail block that continues
        it furthest, together at most ``max_tokens`` long.

        By default at most ``len(tokens) - 1`` tokens, so a caller always has one token left to
        compute logits from. Takes no references: lock the node and incref the blocks to keep them.
        ``touch`` marks the path as used now (LRU); a caller that may still fail passes False and
        calls ``touch`` once it has succeeded.
        """
        limit = self._limit(tokens, max_tokens)
        node, blocks, stop = self._walk(tokens, limit // self.block_size, touch=touch)
        return PrefixMatch(blocks, node, self._tail(tokens, limit, node, len(blocks), stop))

    def peek(self, tokens: Sequence[int], max_tokens: int | None = None) -> PrefixMatch:
        """What ``match`` would serve now, without its side effects: no edge is split and no node's
        LRU time is touched (for planning, e.g. before admission). ``node`` is the deepest node
        matched whole; the prefix may go on into one of its children's edges."""
        limit = self._limit(tokens, max_tokens)
        node, blocks, stop = self._walk(tokens, limit // self.block_size, peek=True)
        return PrefixMatch(blocks, node, self._tail(tokens, limit, node, len(blocks), stop))

    def held(self, tokens: Sequence[int]) -> tuple[list[int], RadixNode]:
        """The blocks the tree holds of ``tokens``' whole blocks, from the first on, with no side
        effects; and the node whose lock keeps them all from eviction: the deepest one they reach
        into (where they end inside an edge, that edge, whole)."""
        node, blocks, stop = self._walk(tokens, len(tokens) // self.block_size, peek=True)
        return blocks, (stop[0] if stop is not None else node)

    def touch(self, node: RadixNode) -> None:
        """Mark ``node`` and its ancestors as used now (the LRU order eviction follows)."""
        now = next(self._clock)
        while node is not self.root:
            node.last_access = now
            node = node.parent

    def cached_tokens(self, tokens: Sequence[int], max_tokens: int | None = None) -> int:
        """How many tokens ``match`` would serve now (``peek``, in tokens)."""
        return self.peek(tokens, max_tokens).num_tokens(self.block_size)

    @staticmethod
    def _limit(tokens: Sequence[int], max_tokens: int | None) -> int:
        return max(len(tokens) - 1 if max_tokens is None else min(max_tokens, len(tokens)), 0)

    def _tail(self, tokens: Sequence[int], limit: int, node: RadixNode, done: int,
              stop: tuple[RadixNode, int] | None) -> TailMatch | None:
        """The cached block after the first ``done`` blocks of ``tokens`` that shares the most of
        its leading tokens with them (up to ``limit``): the next block of the edge the walk
        stopped inside (``stop``: the edge and the block's index in it), else the first blocks of
        ``node``'s children and ``node``'s tails. None where no block shares even one token.
        Never a whole block: the walk would have matched it."""
        bs = self.block_size
        start = done * bs
        want = tuple(tokens[start : min(limit, start + bs)])
        if not want:
            return None
        if stop is not None:
            edge, i = stop
            candidates = [(edge.tokens[i * bs : (i + 1) * bs], TailMatch(edge.blocks[i], 0, edge))]
        else:
            candidates = [(key, TailMatch(child.blocks[0], 0, child)) for key, child in node.children.items()
                          if key[0] == want[0]]
            candidates += [(key, TailMatch(block, 0, node, loose=True)) for key, block in node.tails.items()
                           if key[0] == want[0]]
        tail = None
        for key, candidate in candidates:
            shared, most = (tail.num_tokens if tail else 0), min(len(want), len(key))
            if shared >= most or key[: shared + 1] != want[: shared + 1]:
                continue  # cannot share more than the best so far
            shared += 1
            while shared < most and key[shared] == want[shared]:
                shared += 1
            candidate.num_tokens = shared
            tail = candidate
        return tail

    def add_tail(self, node: RadixNode, tokens: Sequence[int], block: int, release: bool = True) -> list[int]:
        """Keep ``block``, the K/V of ``tokens`` (fewer than a block) after ``node``'s path, as one
        of its tails; the tree takes a reference. Nothing changes where a tail or child block of
        the node already holds those tokens; a tail that holds fewer of them is replaced.
        Returns the blocks of the tails replaced; with ``release`` False the tree's references to
        them pass to the caller (who can then put the tails back, as a failed load does)."""
        tokens = tuple(tokens)
        if not 0 < len(tokens) < self.block_size:
            raise ValueError(f"a tail holds 1 to {self.block_size - 1} tokens, got {len(tokens)}")
        held = [*node.children, *node.tails]
        if any(key[: len(tokens)] == tokens for key in held):
            return []
        shorter = [key for key in node.tails if tokens[: len(key)] == key]
        self._version += 1
        self.pool.incref([block])  # before the tree links it: it never holds a block it has no reference on
        replaced = [node.tails.pop(key) for key in shorter]
        node.tails[tokens] = block
        if release:
            self.pool.decref(replaced)
        return replaced

    def record_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Count one admitted lookup in the hit-rate statistics."""
        self.lookup_tokens += num_tokens
        self.hit_tokens += num_hit

    def insert(self, tokens: Sequence[int], blocks: list[int], replaced: list[int] | None = None) -> RadixNode:
        """Cache ``blocks`` as the K/V of ``tokens`` (whole blocks only).

        Where the tree already holds a prefix, it keeps its own blocks and the caller keeps
        ownership of its duplicates. The tree takes one reference on each block it adopts.
        Returns the deepest node whose path holds ``blocks`` themselves: the whole insert's end,
        or the node before the first block the tree holds a copy of its own for.

        A new child's first block holds the tokens of any tail of its parent that it begins with:
        those tails are let go (lookups take the child). With ``replaced`` given, the tree's
        references to their blocks are appended to it instead of released, as ``add_tail`` does.
        """
        if len(tokens) != len(blocks) * self.block_size:
            raise ValueError(
                f"insert needs whole blocks: {len(tokens)} tokens for {len(blocks)} blocks of {self.block_size}"
            )
        self._version += 1
        node, matched, _ = self._walk(tokens, len(blocks))
        n = len(matched)
        own = next((i for i, (held, given) in enumerate(zip(matched, blocks)) if held != given), n)
        if n < len(blocks):
            new_blocks = list(blocks[n:])
            child = RadixNode(node, tuple(tokens[n * self.block_size :]), new_blocks)
            child.last_access = next(self._clock)
            self.pool.incref(new_blocks)  # before the tree links them: it never holds a block it has no reference on
            node.children[self._key(child.tokens)] = child
            covered = [node.tails.pop(key) for key in list(node.tails) if child.tokens[: len(key)] == key]
            if replaced is None:
                self.pool.decref(covered)
            else:
                replaced += covered
            node = child
        return node if own == n else self._walk(tokens, own)[0]

    def node_at(self, tokens: Sequence[int]) -> RadixNode | None:
        """The node whose path is ``tokens`` (whole blocks), splitting the edge they end inside;
        None where the tree does not hold them all. Touches no LRU time."""
        num_blocks = len(tokens) // self.block_size
        node, blocks, _ = self._walk(tokens, num_blocks, touch=False)
        return node if len(blocks) == num_blocks else None

    def depth(self, node: RadixNode) -> int:
        """How many blocks the path from the root to ``node`` holds."""
        blocks = 0
        while node is not None:
            blocks += len(node.blocks)
            node = node.parent
        return blocks

    def _key(self, tokens: Sequence[int], start: int = 0) -> tuple[int, ...]:
        return tuple(tokens[start : start + self.block_size])

    def _walk(self, tokens: Sequence[int], max_blocks: int, peek: bool = False,
              touch: bool = True) -> tuple[RadixNode, list[int], tuple[RadixNode, int] | None]:
        """Follow ``tokens`` down the tree for at most ``max_blocks`` blocks, splitting an edge
        where the match ends inside it, so that the returned node ends exactly there, and (with
        ``touch``) marking the path as used. With ``peek`` nothing changes: no split, no LRU time,
        and the node returned is the deepest one matched whole; the third value is then the edge
        the match ends inside and how many of its blocks matched (else None)."""
        bs = self.block_size
        node, blocks, done, stop = self.root, [], 0, None
        now = next(self._clock) if touch and not peek else None
        while done < max_blocks:
            child = node.children.get(self._key(tokens, done * bs))
            if child is None:
                break
            n = 1  # the key matched the first block
            while n < len(child.blocks) and done + n < max_blocks:
                lo = (done + n) * bs
                if tuple(tokens[lo : lo + bs]) != child.tokens[n * bs : (n + 1) * bs]:
                    break
                n += 1
            blocks.extend(child.blocks[:n])
            done += n
            if n < len(child.blocks):
                if peek:
                    stop = (child, n)
                    break
                child = self._split(child, n)
            if now is not None:
                child.last_access = now
            node = child
        return node, blocks, stop

    def _split(self, node: RadixNode, n_blocks: int) -> RadixNode:
        """Cut ``node``'s edge after ``n_blocks`` blocks; returns the new upper node."""
        bs = self.block_size
        self._version += 1
        upper = RadixNode(node.parent, node.tokens[: n_blocks * bs], node.blocks[:n_blocks])
        upper.lock_count = node.lock_count
        upper.last_access = node.last_access
        node.parent.children[self._key(upper.tokens)] = upper
        node.tokens = node.tokens[n_blocks * bs :]
        node.blocks = node.blocks[n_blocks:]
        node.parent = upper
        upper.children[self._key(node.tokens)] = node
        return upper

    # --- locking and eviction ------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Pin ``node`` and its ancestors against eviction (one count per live session)."""
        self._version += 1
        while node is not None:
            node.lock_count += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        self._version += 1
        while node is not None:
            if node.lock_count <= 0:
                raise RuntimeError("unlock of a radix node that is not locked")
            node.lock_count -= 1
            node = node.parent

    @contextlib.contextmanager
    def sparing(self, tails: Sequence[TailMatch]) -> Iterator[None]:
        """Keep the nodes' tails among ``tails`` from eviction while the body runs (eviction takes
        them whatever their nodes' locks): they leave their nodes and come back afterwards."""
        out = {}
        for tail in tails:
            if tail.loose:
                key = next((k for k, block in tail.node.tails.items() if block == tail.block), None)
                if key is not None:
                    out[id(tail.node), key] = (tail.node, key, tail.node.tails.pop(key))
        self._version += 1
        try:
            yield
        finally:
            self._version += 1
            for node, key, block in out.values():
                node.tails[key] = block

    def evictable(self, tail: TailMatch) -> bool:
        """Whether eviction could free ``tail``'s block now: the tree alone holds it, and it is a
        node's tail or lies on an unlocked node (``evictable_blocks`` counts such blocks)."""
        return self.pool.ref_counts[tail.block] == 1 and (tail.loose or tail.node.lock_count == 0)

    def evictable_blocks(self) -> int:
        """Blocks that eviction could return to the pool right now."""
        at = (self.pool.version, self._version)
        if self._evictable is None or self._evictable[0] != at:
            self._evictable = (at, self._count_evictable())
        return self._evictable[1]

    def _count_evictable(self) -> int:
        ref = self.pool.ref_counts
        return (sum(1 for node in self.nodes() if node.lock_count == 0 for b in node.blocks if ref[b] == 1)
                + sum(1 for node in self.every_node() for b in node.tails.values() if ref[b] == 1))

    def evict(self, num_blocks: int) -> int:
        """Free at least ``num_blocks`` blocks, least recently used node first: its tails, then, from
        an unlocked leaf, its blocks from the end. Returns how many blocks were freed."""
        self._version += 1
        heap = [(n.last_access, id(n), n) for n in self.every_node() if n.tails or self._evictable_leaf(n)]
        heapq.heapify(heap)
        queued = {id(n) for _, _, n in heap}  # the nodes in the heap now
        freed = 0
        while freed < num_blocks and heap:
            _, _, node = heapq.heappop(heap)
            queued.discard(id(node))
            while node.tails and freed < num_blocks:
                freed += self._drop(node.tails.popitem()[1])
            if not self._evictable_leaf(node):
                continue
            key = self._key(node.tokens)
            while node.blocks and freed < num_blocks:
                node.tokens = node.tokens[: -self.block_size]
                freed += self._drop(node.blocks.pop())
            if not node.blocks:
                parent = node.parent
                del parent.children[key]
                if self._evictable_leaf(parent) and id(parent) not in queued:
                    queued.add(id(parent))
                    heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _evictable_leaf(self, node: RadixNode) -> bool:
        return node is not self.root and not node.children and node.lock_count == 0 and bool(node.blocks)

    def _drop(self, block: int) -> bool:
        """Give up the tree's reference on an evicted block; whether that freed it."""
        last = self.pool.ref_counts[block] == 1
        self.pool.decref([block])
        self.evicted_blocks += 1
        return last

    def reset(self) -> None:
        """Drop every cached prefix. Live sessions keep their own references and stay valid."""
        self._version += 1
        for node in self.every_node():
            self.pool.decref(node.blocks)
            self.pool.decref(list(node.tails.values()))
        self.root = RadixNode(None, (), [])
        self.root.lock_count = 1

    # --- undo ------------------------------------------------------------------------------

    def snapshot(self) -> TreeSnapshot:
        """The tree's shape, for ``restore`` to undo insertions with (a prefix cache file's load).
        ``insert`` and ``node_at`` only add nodes, split edges and touch LRU times, and ``add_tail``
        only adds tails, or replaces some whose references it hands back (``release=False``), so
        restoring every existing node's links, edge and tails puts the tree back as it was. Not for
        undoing evictions or lock changes."""
        return [(node, node.parent, node.tokens, list(node.blocks), dict(node.children), dict(node.tails),
                 node.last_access) for node in self.every_node()]

    def restore(self, snapshot: TreeSnapshot) -> None:
        """Put the tree back as ``snapshot`` found it (the caller settles the references of blocks
        the insertions since took or handed back)."""
        self._version += 1
        for node, parent, tokens, blocks, children, tails, last_access in snapshot:
            node.parent, node.tokens, node.blocks, node.children, node.tails, node.last_access = (
                parent, tokens, blocks, children, tails, last_access)

    # --- introspection -------------------------------------------------------------------

    def every_node(self):
        """The root, then ``nodes()``."""
        yield self.root
        yield from self.nodes()

    def nodes(self):
        """Every node except the root, each before its children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def stats(self) -> dict[str, float | int]:
        nodes = list(self.nodes())
        return {
            "lookup_tokens": self.lookup_tokens,
            "hit_tokens": self.hit_tokens,
            "hit_rate": self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0,
            "cached_blocks": sum(len(n.blocks) for n in nodes),
            "tail_blocks": sum(len(n.tails) for n in self.every_node()),
            "free_blocks": self.pool.num_free,
            "total_blocks": self.pool.num_blocks,
            "evicted_blocks": self.evicted_blocks,
            "nodes": len(nodes),
            "leaves": sum(1 for n in nodes if not n.children),
            "block_size": self.block_size,
        }

    def tree_block_refs(self) -> dict[int, int]:
        refs: dict[int, int] = {}
        for node in self.every_node():
            for b in [*node.blocks, *node.tails.values()]:
                refs[b] = refs.get(b, 0) + 1
        return refs

    def check_integrity(self) -> None:
        """Tree shape and reference accounting; raises AssertionError on the first violation."""
        self.pool.check_integrity()
        bs = self.block_size
        for node in self.nodes():
            if not node.blocks or len(node.tokens) != len(node.blocks) * bs:
                raise AssertionError(f"edge of {len(node.tokens)} tokens holds {len(node.blocks)} blocks")
            if node.parent.children.get(self._key(node.tokens)) is not node:
                raise AssertionError("child not reachable under its own key")
            if node.lock_count < 0 or node.lock_count > node.parent.lock_count:
                raise AssertionError("lock count not monotone along the path")
        for node in self.every_node():
            if any(not 0 < len(tokens) < bs for tokens in node.tails):
                raise AssertionError(f"a tail of {[len(t) for t in node.tails]} tokens: not part of a block")
        for block, count in self.tree_block_refs().items():
            if count != 1:
                raise AssertionError(f"block {block} appears {count} times in the tree")
            if self.pool.ref_counts[block] < 1:
                raise AssertionError(f"tree block {block} has no reference")
        counted = self._evictable  # a count kept across unchanged states must still be the tree's
        if counted is not None and counted[0] == (self.pool.version, self._version) and counted[1] != self._count_evictable():
            raise AssertionError(f"evictable_blocks kept {counted[1]}, the tree holds {self._count_evictable()}")
