"""The radix cache and the session manager: unit tests and property tests (hypothesis).

Every test ends with ``check_integrity()``: free + referenced == total, each block's count is
its tree references plus its session references, no block twice in the tree.
"""

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trellis.cache.block_pool import BlockPool, OutOfBlocksError
from trellis.cache.manager import KVCacheManager
from trellis.cache.radix import shared_whole_blocks
from trellis.models.paged_cache import PagedKVCache

BS = 4


def make_manager(num_blocks=32, block_size=BS):
    return KVCacheManager(BlockPool(num_blocks, block_size, num_layers=1, num_kv_heads=1, head_dim=4))


def run_session(manager, tokens):
    seq = manager.admit(tokens)
    manager.mark_computed(seq)
    manager.release(seq)
    return seq


def test_shared_prefix_is_taken_by_refcount():
    m = make_manager()
    system = list(range(100, 112))  # 3 blocks
    first = run_session(m, system + [1, 2, 3])
    second = m.admit(system + [7, 8])
    assert second.num_prefix_hit == 12
    assert second.block_ids[:3] == first.block_ids[:3]
    assert all(m.pool.ref_counts[b] == 2 for b in second.block_ids[:3])  # tree + session
    m.check_integrity()
    m.release(second)
    s = m.stats()
    assert s["lookup_tokens"] == 15 + 14 and s["hit_tokens"] == 12
    assert s["hit_rate"] == pytest.approx(12 / 29)
    m.check_integrity()


def test_match_never_covers_the_whole_prompt_and_copies_a_partly_shared_block():
    m = make_manager()
    tokens = list(range(16))  # exactly 4 blocks
    first = run_session(m, tokens)
    assert m.radix.stats()["cached_blocks"] == 4
    m.pool.kv[:, :, first.block_ids[3]] = 7.0  # the last block's K/V, to follow into the copy
    again = m.admit(tokens)
    assert again.num_prefix_hit == 15  # one token must be left to compute
    assert again.num_new == 1
    assert again.block_ids[:3] == first.block_ids[:3]  # whole blocks by reference
    assert again.block_ids[3] != first.block_ids[3] and m.pool.ref_counts[again.block_ids[3]] == 1
    assert bool((m.pool.kv[:, :, again.block_ids[3]] == 7.0).all())  # the tail block by copy
    partial = m.admit(tokens[:10])
    assert partial.num_prefix_hit == 9
    assert m.stats()["cached_blocks"] == 4  # copies are the sessions' own until committed
    m.release(again)
    m.release(partial)
    m.check_integrity()


def test_cached_tokens_peeks_without_splitting_or_touching():
    m = make_manager()
    run_session(m, list(range(20)))  # one edge of 5 blocks
    other = run_session(m, [50] * 9)  # a second, more recent prefix (2 blocks)
    before = {id(n): n.last_access for n in m.radix.nodes()}
    probes = [list(range(10)) + [99] * 10, list(range(20)), list(range(16)), [7] * 9, list(range(3))]
    peeked = [m.radix.cached_tokens(p) for p in probes] + [m.radix.cached_tokens(list(range(20)), max_tokens=20)]
    assert peeked == [10, 19, 15, 0, 2, 20]  # whole blocks, then the shared tokens of the next one
    assert {id(n): n.last_access for n in m.radix.nodes()} == before  # no split, no LRU touch
    assert peeked[:5] == [m.radix.match(p).num_tokens(BS) for p in probes]
    assert other.released
    m.check_integrity()


def test_divergence_inside_an_edge_splits_it_at_a_block_boundary():
    m = make_manager()
    run_session(m, list(range(20)))  # one edge of 5 blocks (16 tokens cached + partial)
    b = list(range(10)) + [99] * 10  # diverges inside block 2
    seq = m.admit(b)
    assert seq.num_prefix_hit == 10  # 2 blocks, and 2 tokens copied from the third
    m.mark_computed(seq)
    m.release(seq)
    s = m.stats()
    assert s["nodes"] == 3 and s["leaves"] == 2
    m.check_integrity()


def test_the_tail_is_the_block_sharing_most_and_is_held_or_left_as_the_pool_allows():
    m = make_manager(num_blocks=6)
    first = run_session(m, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    run_session(m, [1, 2, 3, 4, 5, 9, 9, 9, 0])  # the tree: [1-4] then [5 6 7 8] or [5 9 9 9]
    near = m.radix.peek([1, 2, 3, 4, 5, 6, 7, 0, 0])
    assert near.num_tokens(BS) == 7 and near.tail.node.tokens == (5, 6, 7, 8)
    m.pool.kv[:, :, first.block_ids[1]] = 3.0
    # 20 tokens: 4 new blocks, 3 free. The tail is the least recent leaf: the allocation's eviction
    # takes it from the tree, but the session holds it until it has its copy.
    seq = m.admit([1, 2, 3, 4, 5, 6, 7] + [0] * 13)
    assert seq.num_prefix_hit == 7 and bool((m.pool.kv[:, :, seq.block_ids[1]] == 3.0).all())
    m.release(seq, commit=False)
    m.check_integrity()
    # 24 tokens: 5 new blocks take every free and evictable block, the tail's too: computed instead.
    prompt = [1, 2, 3, 4, 5, 6, 7] + [0] * 17
    cost = m.admission_cost(prompt)
    assert (cost.cached_tokens, cost.new_blocks, cost.fits) == (4, 5, True)
    seq = m.admit(prompt)
    assert seq.num_prefix_hit == 4 and len(seq.block_ids) == 6
    m.release(seq)
    m.check_integrity()


def test_a_finished_session_leaves_its_partly_filled_block_as_a_tail_for_the_next_turn():
    m = make_manager(num_blocks=12)
    first = run_session(m, list(range(10)))  # 2 blocks cached, tokens 8 and 9 left as a tail
    assert m.stats()["tail_blocks"] == 1 and m.pool.ref_counts[first.block_ids[2]] == 1
    m.pool.kv[:, :, first.block_ids[2]] = 5.0
    turn = m.admit(list(range(10)) + [70, 71])  # the next turn: every token the first computed
    assert turn.num_prefix_hit == 10 and bool((m.pool.kv[:, :, turn.block_ids[2]] == 5.0).all())
    m.mark_computed(turn)
    m.release(turn)  # its third block is full now: cached, and it holds the first turn's tail's tokens
    assert m.stats()["cached_blocks"] == 3 and m.radix.match(list(range(10)) + [70, 71, 0]).num_tokens(BS) == 12
    node = m.radix.match(list(range(8)) + [0]).node
    assert node.tails == {} and m.stats()["tail_blocks"] == 0
    # One tail per run of tokens: a longer one replaces a shorter one it extends, and what a
    # child block or a tail already holds adds nothing.
    spare = m.pool.alloc(3)
    m.radix.add_tail(node, [8], spare[0])
    assert node.tails == {}  # the child [8, 9, 70, 71] holds it
    m.radix.add_tail(node, [30, 31], spare[0])
    m.radix.add_tail(node, [30], spare[1])
    assert node.tails == {(30, 31): spare[0]}  # [30, 31] holds it
    with pytest.raises(ValueError, match="a tail holds 1 to 3 tokens"):
        m.radix.add_tail(node, [8, 9, 10, 11], spare[1])
    assert node.tails == {(30, 31): spare[0]} and m.pool.ref_counts[spare[1]] == 1
    assert m.radix.add_tail(node, [30, 31, 32], spare[2]) == [spare[0]]  # replaced, its reference released
    assert node.tails == {(30, 31, 32): spare[2]}
    m.pool.decref(spare)
    assert m.pool.ref_counts[spare[2]] == 1 and m.stats()["tail_blocks"] == 1
    assert m.radix.node_at(list(range(4))) is not None and m.radix.node_at(list(range(4)) + [9] * 4) is None
    m.check_integrity()
    # Eviction takes a node's tails before its blocks, whatever its locks.
    live = m.admit(list(range(8)) + [1, 2])  # locks the first two blocks (and uses them last)
    assert m.radix.evict(2) == 2  # the turn's block, the least recent, then the locked node's tail
    assert m.stats()["tail_blocks"] == 0 and m.stats()["cached_blocks"] == 2
    m.release(live)
    m.check_integrity()
    # A node whose tails went first (it was older than its child) is evicted once the child is.
    m.reset()
    run_session(m, [1, 2, 3, 4, 9, 9])  # node [1-4] with a tail
    run_session(m, list(range(1, 9)) + [0])  # uses [1-4], then its child [5-8] (newer) with a tail
    assert m.radix.evict(100) == 4 and m.stats()["nodes"] == 0 and m.pool.num_free == 12
    m.check_integrity()


def test_lru_eviction_spares_locked_and_recent_prefixes():
    m = make_manager(num_blocks=12)
    old = list(range(8))
    recent = list(range(50, 58))
    run_session(m, old + [1])  # caches 2 blocks, and keeps the third, partly filled, as a tail
    run_session(m, recent + [1])  # the same
    live = m.admit(recent + [2])  # locks `recent`
    assert m.pool.num_free == 12 - 6 - 1
    big = m.admit(list(range(200, 236)))  # 9 blocks, 5 free: evicts `old` (tail and blocks), then
    assert m.stats()["evicted_blocks"] == 4  # `recent`'s tail, which its lock does not cover
    assert m.stats()["tail_blocks"] == 0 and m.radix.match(recent + [1]).num_tokens(BS) == 8
    assert m.radix.match(old + [1]).blocks == []
    m.release(big)
    again = m.admit(recent + [3])  # the pool is full: evicts part of `big`, the least recent
    assert again.num_prefix_hit == 8
    m.release(again)
    m.release(live)
    m.check_integrity()


def test_request_that_cannot_fit_fails_cleanly_without_evicting():
    m = make_manager(num_blocks=6)
    run_session(m, list(range(8)) + [0])
    before = m.stats()
    with pytest.raises(OutOfBlocksError, match="KV cache full"):
        m.admit(list(range(300, 330)))
    assert m.stats()["cached_blocks"] == before["cached_blocks"]
    assert m.stats()["live_sessions"] == 0
    assert m.admit(list(range(8)) + [5]).num_prefix_hit == 8
    m.check_integrity()


def test_admission_cost_predicts_admit_and_changes_nothing():
    m = make_manager(num_blocks=8)
    run_session(m, list(range(9)))  # caches 2 blocks
    prompt = list(range(8)) + [50, 51, 52]
    cost = m.admission_cost(prompt, extra_tokens=6)  # 17 tokens: 5 blocks, 2 of them cached
    assert (cost.cached_tokens, cost.new_blocks, cost.fits) == (8, 3, True)
    assert m.admission_cost(prompt, max_reuse=5).cached_tokens == 5  # a block and a token of the next
    assert not m.admission_cost(list(range(100, 140))).fits  # 10 blocks: more than free + evictable
    assert m.stats()["lookup_tokens"] == 9  # a peek is no lookup
    seq = m.admit(prompt, extra_tokens=6)
    assert seq.num_prefix_hit == 8 and len(seq.block_ids) == 5
    m.release(seq)
    m.check_integrity()


def test_admit_batch_is_all_or_nothing():
    m = make_manager(num_blocks=6)
    run_session(m, list(range(9)))
    before = m.stats()
    with pytest.raises(OutOfBlocksError):
        m.admit_batch([list(range(9)), list(range(200, 220))], max_reuse=[8, 0])  # the second cannot fit
    assert m.stats()["live_sessions"] == 0 and m.stats()["cached_blocks"] == before["cached_blocks"]
    with pytest.raises(ValueError, match="row 1 .* no tokens"):
        m.admit_batch([[1, 2], []], max_reuse=[0, 0])
    seqs = m.admit_batch([list(range(9)), [7, 7, 7]], max_reuse=[4, 0])
    assert [s.num_prefix_hit for s in seqs] == [4, 0]
    m.rollback_batch(seqs)  # a failed first step: released without committing
    assert all(s.released for s in seqs) and m.stats()["live_sessions"] == 0
    m.check_integrity()


def test_extend_batch_rolls_back_every_row_when_one_cannot_grow():
    m = make_manager(num_blocks=4)
    first, second = m.admit_batch([[1, 2, 3], [4, 5, 6]], max_reuse=[0, 0])
    for seq in (first, second):
        m.mark_computed(seq)
    with pytest.raises(OutOfBlocksError):
        m.extend_batch([first, second], [[9] * 5, [9] * 9])  # 2 + 3 blocks: the pool has 4
    assert first.token_ids == [1, 2, 3] and second.token_ids == [4, 5, 6]
    m.extend_batch([first, second], [[8], [9, 9]])
    m.rollback_batch([first, second], [1, 2])  # a failed step drops its uncomputed tokens
    assert first.token_ids == [1, 2, 3] and second.token_ids == [4, 5, 6]
    m.release(second)
    m.extend_batch([first], [[7, 7]])
    m.mark_computed(first)  # a step whose Ctrl-C came once it had marked its sessions: truncated away
    m.rollback_batch([first], [2])  # (its first block, full and cached meanwhile, copied)
    assert first.token_ids == [1, 2, 3] and first.num_cached == 3
    with pytest.raises(ValueError, match="cannot roll back 4 tokens of a session of 3"):
        m.rollback_batch([first], [4])
    m.release(first)
    m.check_integrity()


def test_release_later_is_drained_at_next_call():
    m = make_manager()
    seq = m.admit(list(range(9)))
    m.mark_computed(seq)
    m.release_later([seq])
    assert m.stats()["live_sessions"] == 0
    assert seq.released
    m.check_integrity()


def test_a_child_holding_a_tails_tokens_lets_the_tail_go():
    """A later session fills the block a tail began: the child it leaves serves those tokens, so
    the tail would only hold a block (and be saved to files) for nothing."""
    m = make_manager(num_blocks=8)
    run_session(m, [1, 2, 3, 4, 5, 6])  # [1-4] cached, [5, 6] a tail
    assert m.stats()["tail_blocks"] == 1
    run_session(m, [1, 2, 3, 4, 5, 6, 7, 8, 9])  # [5-8] a child of [1-4], [9] its tail
    node = m.radix.match([1, 2, 3, 4, 0]).node
    assert node.tails == {} and m.stats()["tail_blocks"] == 1 and m.stats()["cached_blocks"] == 2
    assert m.radix.peek([1, 2, 3, 4, 5, 6, 0]).num_tokens(BS) == 6  # from the child's block
    m.check_integrity()
    # Where the caller asks for them (a load that may have to put things back), the references pass to it.
    run_session(m, [1, 2, 3, 4, 11, 12])  # another tail of [1-4]
    held = []
    seq = m.admit([1, 2, 3, 4, 11, 12, 13, 14])
    m.radix.insert(seq.token_ids, seq.block_ids, replaced=held)
    assert len(held) == 1 and node.tails == {} and m.pool.ref_counts[held[0]] == 1
    m.pool.decref(held)
    m.release(seq)
    m.check_integrity()


def test_fork_shares_full_blocks_and_copies_the_tail():
    m = make_manager()
    seq = m.admit(list(range(10)))
    m.mark_computed(seq)
    child = m.fork(seq)
    assert child.block_ids[:2] == seq.block_ids[:2]
    assert child.block_ids[2] != seq.block_ids[2]
    m.check_integrity()
    m.release(seq)
    m.release(child)
    m.check_integrity()




def test_shared_whole_blocks_counts_the_common_prefix_in_whole_blocks_never_all_of_the_prompt():
    assert shared_whole_blocks(list(range(20)), list(range(20)), 4) == 16  # the last token is always computed
    assert shared_whole_blocks(list(range(20)), [*range(9), 99, 5], 4) == 8
    assert shared_whole_blocks(list(range(6)), list(range(20)), 4) == 4  # no further than the cached tokens
    assert shared_whole_blocks([7, 1], [1, 2, 3], 1) == 0 and shared_whole_blocks([], [1], 4) == 0


def test_evictable_blocks_are_counted_once_between_changes(monkeypatch):
    """Pricing every waiting request reads one count while nothing changes; any change recounts."""
    m = make_manager(num_blocks=16)
    run_session(m, list(range(12)))
    counts = []
    count = m.radix._count_evictable
    monkeypatch.setattr(m.radix, "_count_evictable", lambda: counts.append(1) or count())
    for tokens in ([0, 1, 2, 3, 9], list(range(40)), [7] * 30):
        m.admission_cost(tokens)
    assert len(counts) == 1 and m.available_blocks() == 16
    seq = m.admit(list(range(9)))  # locks the cached prefix: its two blocks are no longer evictable
    assert m.available_blocks() == 16 - 3 and len(counts) == 2
    m.release(seq)
    assert m.available_blocks() == 16 and len(counts) == 3
    run_session(m, list(range(14)))  # leaves a tail of two tokens after the three cached blocks
    node, (tail_tokens, tail_block) = next((n, t) for n in m.radix.nodes() for t in n.tails.items())
    available, counted = m.available_blocks(), len(counts)
    m.radix.add_tail(node, tail_tokens, tail_block)  # a tail the tree holds already: nothing changes
    assert m.available_blocks() == available and len(counts) == counted
    m.check_integrity()  # (which checks a kept count against a fresh one)

def test_a_released_session_is_not_forked():
    """Its blocks may be free or another session's by now: forking it would copy or share them."""
    m = make_manager()
    seq = m.admit(list(range(10)))
    m.mark_computed(seq)
    m.release(seq)
    before = m.stats()
    with pytest.raises(RuntimeError, match="session already released: it cannot be forked"):
        m.fork(seq)
    assert m.stats() == before
    m.check_integrity()

def test_truncate_copies_a_tail_block_the_tree_shares():
    m = make_manager(num_blocks=8)
    seq = m.admit(list(range(10)))
    m.mark_computed(seq)  # blocks 0 and 1 are now in the tree too
    blocks = list(seq.block_ids)
    m.truncate([seq], [6])  # the new end falls inside block 1: the next forward writes it
    assert seq.token_ids == list(range(6)) and seq.num_cached == 6
    assert seq.block_ids[0] == blocks[0] and seq.block_ids[1] not in blocks
    assert m.pool.ref_counts[blocks[1]] == 1 and m.pool.ref_counts[blocks[2]] == 0  # the tree's; freed
    assert seq.num_committed_blocks == 1
    m.check_integrity()
    m.append(seq, [50, 51])
    m.mark_computed(seq)
    m.release(seq)
    assert m.radix.match(list(range(9))).blocks == blocks[:2]  # the tree's prefix is intact
    assert m.radix.match([0, 1, 2, 3, 4, 5, 50, 51, 0]).num_tokens(BS) == 8
    m.check_integrity()


def test_truncate_to_a_block_boundary_or_an_unshared_block_copies_nothing():
    m = make_manager(num_blocks=8)
    seq = m.admit(list(range(10)))
    m.mark_computed(seq)
    blocks = list(seq.block_ids)
    m.truncate([seq], [9])  # inside block 2, which only the session holds
    m.truncate([seq], [8])
    assert seq.block_ids == blocks[:2] and seq.num_committed_blocks == 2 and m.pool.num_free == 6
    m.truncate([seq], [0])
    assert seq.block_ids == [] and seq.node is m.radix.root and m.stats()["cached_blocks"] == 2
    m.check_integrity()
    m.release(seq)
    m.check_integrity()


def test_truncate_that_cannot_get_its_copy_changes_nothing():
    m = make_manager(num_blocks=3)
    seq = m.admit(list(range(10)))
    m.mark_computed(seq)
    before = (list(seq.token_ids), list(seq.block_ids), seq.node, seq.num_cached)
    with pytest.raises(OutOfBlocksError):
        m.truncate([seq], [6])
    assert (seq.token_ids, seq.block_ids, seq.node, seq.num_cached) == before
    with pytest.raises(ValueError, match="cannot truncate"):
        m.truncate([seq], [11])
    m.check_integrity()


def _interrupt_copies(monkeypatch, manager):
    def copy_block(src, dst):
        raise KeyboardInterrupt  # Ctrl-C, or a device error, while a block's K/V are copied

    monkeypatch.setattr(manager.pool, "copy_block", copy_block)


@pytest.mark.parametrize("copying", ["admit", "fork", "truncate"])
def test_a_failed_block_copy_leaves_nothing_behind(monkeypatch, copying):
    """admit copies a cached tail, fork a session's tail, truncate a shared block a new end falls
    inside: an exception during the copy undoes the call, every block and lock it took given back."""
    m = make_manager(num_blocks=16)
    run_session(m, list(range(10)))  # two cached blocks and a 2-token tail
    kept = m.admit(list(range(50, 58)), extra_tokens=4)
    m.mark_computed(kept)  # its two blocks shared with the tree: truncating inside one copies it
    before = (m.stats(), list(m.pool.ref_counts), m.radix.root.lock_count)
    _interrupt_copies(monkeypatch, m)
    call = {"admit": lambda: m.admit([*range(10), 99]), "fork": lambda: m.fork(kept),
            "truncate": lambda: m.truncate([kept], [5])}[copying]
    with pytest.raises(KeyboardInterrupt):
        call()
    assert (m.stats(), list(m.pool.ref_counts), m.radix.root.lock_count) == before
    assert len(kept.token_ids) == 8
    m.check_integrity()
    m.release(kept)
    assert m.stats()["live_sessions"] == 0


def test_a_beam_reorder_that_runs_out_of_blocks_part_way_leaves_no_fork():
    m = make_manager(num_blocks=8)
    cache = PagedKVCache(m)
    for tokens in ([1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]):  # two beams: a whole block and a partly filled one
        seq = m.admit(tokens)
        m.mark_computed(seq)
        cache.seqs.append(seq)
    other = m.admit(list(range(20, 32)))  # leaves one block: room for one fork's tail copy, not two
    before = (m.stats(), list(m.pool.ref_counts), list(cache.seqs))
    with pytest.raises(OutOfBlocksError):
        cache.reorder_cache(torch.tensor([0, 1]))
    assert (m.stats(), list(m.pool.ref_counts), list(cache.seqs)) == before
    cache.release()
    m.release(other)
    assert m.stats()["live_sessions"] == 0
    m.check_integrity()


def test_a_session_released_while_an_admission_prices_its_match_leaves_the_match_valid(monkeypatch):
    """Sessions queued for release are released before an admission matches, not between its
    match and the pricing of it: a release then could replace (and free) the matched tail."""
    m = make_manager(num_blocks=16)
    run_session(m, list(range(6)))  # a tail of (4, 5)
    longer = m.admit(list(range(7)))
    m.mark_computed(longer)  # released, its tail (4, 5, 6) replaces (4, 5)
    match = m.radix.match

    def match_then_drop(*args, **kwargs):
        found = match(*args, **kwargs)
        m.release_later([longer])  # a handle garbage collected meanwhile
        return found

    monkeypatch.setattr(m.radix, "match", match_then_drop)
    seq = m.admit([0, 1, 2, 3, 4, 5, 9])
    monkeypatch.setattr(m.radix, "match", match)
    assert seq.num_cached == 6  # the old tail's two tokens, copied
    m.release(seq)
    assert m.stats()["live_sessions"] == 0 and all(node.lock_count == 0 for node in m.radix.nodes())
    m.check_integrity()


def test_a_session_computing_blocks_the_tree_holds_pins_only_its_own():
    """Two sessions that compute the same full block: the tree adopts the first one's; the second
    keeps its own K/V and locks none of the tree's copy, which stays evictable (else a warm rerun
    of a cached prompt would pin twice the blocks its cold run needed)."""
    m = make_manager(num_blocks=8)
    first, second = m.admit([5, 6, 7]), m.admit([5, 6, 7])  # partial blocks: neither hits
    for seq in (first, second):
        m.mark_computed(seq)
        m.append(seq, [8, 9])
        m.mark_computed(seq)
    assert m.radix.match([5, 6, 7, 8, 0]).blocks == first.block_ids[:1] != second.block_ids[:1]
    assert second.node is m.radix.root and second.num_committed_blocks == 0
    m.release(first)
    assert m.radix.evictable_blocks() == 2  # the tree's copy and first's last block (a tail); second holds its own
    assert m.radix.evict(2) == 2
    m.append(second, [10, 11, 12])  # its next full block: the tree now adopts both of its own
    m.mark_computed(second)
    assert m.radix.match([5, 6, 7, 8, 9, 10, 11, 12, 0]).blocks == second.block_ids[:2]
    assert second.num_committed_blocks == 2
    m.check_integrity()
    m.release(second)
    m.check_integrity()


def test_blocks_the_tree_kept_copies_of_are_offered_again_only_after_an_eviction():
    """A cached prompt run again recomputes its last block, which the tree holds: the session does
    not walk the tree at every step for it, and the tree takes the session's copy once it has
    evicted its own."""
    m = make_manager(num_blocks=16)
    prompt = list(range(2 * BS))
    run_session(m, prompt)
    seq = m.admit(prompt)  # hits the first block; its second is computed again
    m.mark_computed(seq)
    assert seq.num_committed_blocks == 1 and m.radix.match(prompt + [0]).blocks[1] != seq.block_ids[1]
    inserts = []
    insert = m.radix.insert
    m.radix.insert = lambda tokens, blocks: inserts.append(len(blocks)) or insert(tokens, blocks)
    for token in range(BS - 1):  # the same two full blocks step after step
        m.append(seq, [token])
        m.mark_computed(seq)
    assert inserts == []
    m.append(seq, [BS])  # a third full block: offered, with the second again
    m.mark_computed(seq)
    assert inserts == [3] and seq.num_committed_blocks == 1
    assert m.radix.evict(2) >= 1  # the tree's copies past the session's lock
    m.append(seq, [0])
    m.mark_computed(seq)
    assert inserts == [3, 3] and seq.num_committed_blocks == 3
    assert m.radix.match(seq.token_ids[: 3 * BS] + [0]).blocks == seq.block_ids[:3]
    m.check_integrity()
    m.release(seq)
    m.check_integrity()


def test_a_cached_prompt_run_again_leaves_its_tail_after_the_trees_copies():
    """A cached prompt run again computes its own copy of its last block (the tree keeps its
    own), yet its partly filled block continues the tree's path all the same: the next turn is
    served every token the session computed."""
    m = make_manager(num_blocks=16)
    prompt = list(range(2 * BS))
    run_session(m, prompt)
    seq = m.admit(prompt)
    m.mark_computed(seq)
    m.append(seq, [50, 51])  # the answer, into a third block
    m.mark_computed(seq)
    assert seq.num_committed_blocks == 1
    m.release(seq)
    assert m.stats()["tail_blocks"] == 1 and m.pool.ref_counts[seq.block_ids[2]] == 1
    turn = m.admit(prompt + [50, 51, 60])
    assert turn.num_prefix_hit == 2 * BS + 2
    m.release(turn, commit=False)
    m.check_integrity()


def test_a_cleared_tree_takes_the_blocks_it_kept_copies_of_before():
    m = make_manager(num_blocks=16)
    prompt = list(range(2 * BS))
    run_session(m, prompt)
    seq = m.admit(prompt)  # its second block duplicates the tree's
    m.mark_computed(seq)
    m.clear()
    m.append(seq, [0])  # the same two full blocks, offered to an empty tree
    m.mark_computed(seq)
    assert seq.num_committed_blocks == 2 and m.radix.match(prompt + [0]).blocks == seq.block_ids[:2]
    m.release(seq)
    m.check_integrity()


def test_reset_keeps_live_sessions_valid():
    m = make_manager()
    run_session(m, list(range(9)))
    live = m.admit(list(range(9)))
    m.reset()
    assert m.stats()["cached_blocks"] == 0
    m.check_integrity()
    m.append(live, [1, 2, 3, 4, 5])
    m.mark_computed(live)
    m.release(live)
    assert m.stats()["cached_blocks"] == 3
    m.check_integrity()


class CacheMachine(RuleBasedStateMachine):
    """Random admit / grow / finish / abort / evict / reset against a simple model.

    The model records, for each block id, which token prefix its K/V were computed for; every
    prefix hit must return blocks whose recorded prefix is exactly the prompt's. With a pool too
    big to evict, hits must also be as long as the longest committed prefix.
    """

    def __init__(self):
        super().__init__()
        self.m = None

    @rule(num_blocks=st.sampled_from([6, 12, 400]))
    @precondition(lambda self: self.m is None)
    def create(self, num_blocks):
        self.m = make_manager(num_blocks=num_blocks)
        self.evicting = num_blocks < 400
        self.content = {}  # block id -> token prefix its K/V belong to
        self.committed = set()  # token prefixes (whole blocks) inserted into the tree
        self.finished = set()  # the computed tokens of sessions released with commit (their tails)
        self.live = []

    def record(self, seq):
        for i in range(len(seq.token_ids) // BS):
            self.content[seq.block_ids[i]] = tuple(seq.token_ids[: (i + 1) * BS])

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=24))
    @precondition(lambda self: self.m is not None)
    def admit(self, tokens):
        peek = self.m.radix.peek(tokens)
        cost = self.m.admission_cost(tokens)
        # Where the allocation needs every block, the tail block is not held to copy it.
        assert cost.cached_tokens in (peek.num_tokens(BS), len(peek.blocks) * BS)
        try:
            seq = self.m.admit(tokens)
        except OutOfBlocksError:
            return
        assert cost.fits  # a cost that does not fit is never admitted
        hit = seq.num_prefix_hit
        assert hit == cost.cached_tokens  # the cost predicts admission exactly
        assert len(seq.block_ids) - hit // BS == cost.new_blocks
        for i in range(hit // BS):
            assert self.content[seq.block_ids[i]] == tuple(tokens[: (i + 1) * BS])
        if hit % BS:  # the tail was copied from a block computed for the same leading tokens
            assert self.content[peek.tail.block][:hit] == tuple(tokens[:hit])
        if not self.evicting:
            prompt = tuple(tokens[: len(tokens) - 1])

            def longest(prefixes):  # the longest run of leading tokens any of them shares with the prompt
                return max((next((i for i, (a, b) in enumerate(zip(p, prompt)) if a != b), min(len(p), len(prompt)))
                            for p in prefixes), default=0)

            # At least what the committed whole blocks share; at most that or a finished session's tail.
            assert longest(self.committed) <= hit <= longest(self.committed | self.finished)
        self.m.mark_computed(seq)
        self.record(seq)
        self.commit_model(seq)
        self.live.append(seq)

    def commit_model(self, seq):
        for i in range(1, len(seq.token_ids) // BS + 1):
            self.committed.add(tuple(seq.token_ids[: i * BS]))

    @rule(data=st.data())
    @precondition(lambda self: self.m is not None and self.live)
    def grow(self, data):
        seq = data.draw(st.sampled_from(self.live))
        tokens = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=6))
        try:
            self.m.append(seq, tokens)
        except OutOfBlocksError:
            return
        self.m.mark_computed(seq)
        self.record(seq)
        self.commit_model(seq)

    @rule(data=st.data())
    @precondition(lambda self: self.m is not None and self.live)
    def truncate(self, data):
        seq = data.draw(st.sampled_from(self.live))
        length = data.draw(st.integers(0, len(seq.token_ids)))
        before = (list(seq.token_ids), list(seq.block_ids))
        try:
            self.m.truncate([seq], [length])
        except OutOfBlocksError:
            assert (seq.token_ids, seq.block_ids) == before
            return
        assert seq.token_ids == before[0][:length] and seq.block_ids[: length // BS] == before[1][: length // BS]
        assert len(seq.block_ids) == -(-length // BS)

    @rule(data=st.data(), commit=st.booleans())
    @precondition(lambda self: self.m is not None and self.live)
    def finish(self, data, commit):
        seq = data.draw(st.sampled_from(self.live))
        self.live.remove(seq)
        self.m.release(seq, commit=commit)
        if commit:  # a session that outlived a reset caches its blocks again as it ends
            self.commit_model(seq)
            full = seq.num_cached // BS
            if seq.num_cached % BS:  # its partly filled last block may stay as a tail
                self.content[seq.block_ids[full]] = tuple(seq.token_ids[: seq.num_cached])
                self.finished.add(tuple(seq.token_ids[: seq.num_cached]))

    @rule(n=st.integers(1, 8))
    @precondition(lambda self: self.m is not None)
    def evict(self, n):
        self.m.radix.evict(n)
        if not self.evicting:
            self.committed = {p for p in self.committed if self.m.radix.match(list(p) + [0]).num_tokens(BS) == len(p)}

    @rule()
    @precondition(lambda self: self.m is not None)
    def reset(self):
        self.m.reset()
        self.committed, self.finished = set(), set()

    @invariant()
    def integrity(self):
        if self.m is not None:
            self.m.check_integrity()

    @invariant()
    def sessions_lock_only_their_own_blocks(self):
        """A live session's locked path holds its committed blocks themselves, never the tree's
        copies of tokens it computed again: those stay evictable."""
        for seq in self.live if self.m is not None else ():
            node, path = seq.node, []
            while node is not None:
                path[:0] = node.blocks
                node = node.parent
            assert path == seq.block_ids[: seq.num_committed_blocks]


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestCacheMachine = CacheMachine.TestCase


@pytest.mark.parametrize("failing", ["radix.lock", "pool.incref"])
def test_a_fork_or_admission_that_fails_part_way_holds_nothing(monkeypatch, failing):
    """An error while a fork or an admission takes its holds (a lock, references) gives back what
    it took: no block keeps a reference, and no node a lock, that nobody holds."""
    m = KVCacheManager(BlockPool(16, 4, num_layers=1, num_kv_heads=1, head_dim=4))
    seq = m.admit(list(range(10)))
    m.mark_computed(seq)  # two full blocks in the tree, and a partly filled one
    owner, name = {"radix.lock": (m.radix, "lock"), "pool.incref": (m.pool, "incref")}[failing]

    def failed(*args):
        raise MemoryError("injected")

    monkeypatch.setattr(owner, name, failed)
    for act in (lambda: m.fork(seq), lambda: m.admit(list(range(10)) + [99])):
        with pytest.raises(MemoryError, match="injected"):
            act()
    monkeypatch.undo()
    assert m.live == {seq}
    m.check_integrity()
    m.release(seq)
    m.check_integrity()
    assert m.stats()["live_sessions"] == 0 and all(node.lock_count == 0 for node in m.radix.root.children.values())
