"""Upstream prefix-cache scenarios, specified for Trellis' radix tree, block pool and manager (issue #15).

Sources (read for their scenarios; the code here is Trellis' own):

- SGLang ``test/registered/unit/mem_cache/test_radix_cache_unit.py`` (``TestRadixCache``) and
  ``test/registered/unit/mem_cache/test_decode_radix_lock_ref.py`` (``TestDecodeLockRefScenarios``).
- vLLM ``tests/v1/core/test_prefix_caching.py``.

How the systems differ, once for every test below:

- SGLang's tree is token-granular with an optional page size; Trellis' edges hold whole blocks, so
  only full blocks are shared and a prompt's partial tail block is always its session's own. A
  finished session's partly filled last block stays as a tail of its node, which later prompts
  copy from (as they copy from a full block they leave inside), and eviction takes first.
- vLLM keys blocks by a chained hash of (parent hash, block tokens, extra keys) and keeps a cached
  block with ref count 0 on its free queue (lazy eviction). Trellis keys edges by the token ids
  themselves, so there is no hash and no hash collision; equal block contents at different
  positions are different nodes. Its tree holds one reference on every cached block, so a cached
  block is never "free", it is *evictable* (held by the tree alone, on an unlocked node).
- ``match`` never covers the whole prompt (one token is left to compute logits from), like vLLM
  recomputing the last block of a fully cached prompt.
- Not applicable to Trellis: KV events, cache salts / extra keys, multimodal hashes, LoRA ids,
  hybrid (sliding-window, Mamba) groups, EAGLE hashing, host (hierarchical) cache.

Every test ends with ``check`` (the manager's or tree's integrity check plus free + referenced == total).
"""

import pytest

from trellis.cache.block_pool import BlockPool, OutOfBlocksError
from trellis.cache.manager import KVCacheManager
from trellis.cache.radix import RadixCache

BS = 4
COMMON = [i for i in range(3) for _ in range(BS)]  # three full blocks: 0 0 0 0 | 1 1 1 1 | 2 2 2 2


def make_pool(num_blocks: int, block_size: int = BS) -> BlockPool:
    return BlockPool(num_blocks, block_size, num_layers=1, num_kv_heads=1, head_dim=2)


def make_manager(num_blocks: int = 16, block_size: int = BS) -> KVCacheManager:
    return KVCacheManager(make_pool(num_blocks, block_size))


def check(cache: KVCacheManager | RadixCache) -> None:
    cache.check_integrity()
    pool = cache.pool
    referenced = sum(1 for count in pool.ref_counts if count > 0)
    assert pool.num_free + referenced == pool.num_blocks


def run_session(m: KVCacheManager, tokens: list[int]):
    seq = m.admit(tokens)
    m.mark_computed(seq)
    m.release(seq)
    return seq


def path_locks(node) -> list[int]:
    """Lock counts from ``node`` up to (excluding) the root."""
    counts = []
    while node.parent is not None:
        counts.append(node.lock_count)
        node = node.parent
    return counts


# --- block reuse across requests -------------------------------------------------------------


def test_prefill_shares_full_blocks_and_keeps_the_partial_tail_to_copy():
    """vLLM ``test_prefix_caching.py::test_prefill``: a cold request, a hit while the first is
    still running, a hit after it finished, then a miss that needs the whole pool.

    Trellis terms: after the first request finishes, its full blocks are held by the tree (count 1,
    evictable), not on the free list as in vLLM; its partial tail block stays as a tail of their
    node (vLLM frees it), which the next hit copies a token from. The final cold request evicts the
    cached blocks instead of popping them off vLLM's free queue.
    """
    m = make_manager(num_blocks=10)
    req0 = m.admit(COMMON + [3] * 3)  # 15 tokens: 3 full blocks + a partial one
    assert req0.num_prefix_hit == 0 and len(req0.block_ids) == 4
    m.mark_computed(req0)
    full0, tail0 = req0.block_ids[:3], req0.block_ids[3]
    assert m.stats()["cached_blocks"] == 3  # the partial block is not cached
    assert [m.pool.ref_counts[b] for b in req0.block_ids] == [2, 2, 2, 1]  # tree + session; session only
    assert m.radix.match(COMMON + [3] * 4 + [9]).blocks == full0  # the tail block never matches
    check(m)

    req1 = m.admit(COMMON + [3])  # hit while req0 is still live
    assert req1.num_prefix_hit == 12 and req1.block_ids[:3] == full0
    assert [m.pool.ref_counts[b] for b in full0] == [3, 3, 3]
    assert len(req1.block_ids) == 4 and req1.block_ids[3] not in req0.block_ids
    assert m.pool.num_free == 10 - 5
    check(m)

    m.release(req0)
    m.release(req1)
    assert [m.pool.ref_counts[b] for b in full0] == [1, 1, 1]  # the tree's reference alone
    assert m.pool.ref_counts[tail0] == 1 and m.pool.num_free == 6  # req0's computed tail; req1 computed none
    assert m.radix.evictable_blocks() == 4 and m.stats()["tail_blocks"] == 1
    check(m)

    req2 = m.admit(COMMON + [3, 3])  # hit after the original requests finished
    assert req2.num_prefix_hit == 13 and req2.block_ids[:3] == full0  # and a token of req0's tail, copied
    m.release(req2)
    check(m)

    req3 = m.admit([99] * (BS * 10))  # a miss that needs every block: 6 free + 4 evicted
    assert req3.num_prefix_hit == 0 and len(req3.block_ids) == 10
    assert set(full0) <= set(req3.block_ids)
    assert m.stats()["cached_blocks"] == 0 and m.stats()["evicted_blocks"] == 4 and m.pool.num_free == 0
    check(m)
    m.release(req3, commit=False)
    assert m.pool.num_free == 10
    check(m)


def test_decode_caches_a_block_once_it_fills():
    """vLLM ``test_prefix_caching.py::test_decode`` and ``::test_cache_blocks``: decode tokens go
    into the partial block without allocating; a block enters the cache only when it is full, and
    caching continues incrementally from where it stopped."""
    m = make_manager(num_blocks=10)
    seq = m.admit(COMMON + [3] * 3)
    m.mark_computed(seq)
    assert seq.num_committed_blocks == 3
    free = m.pool.num_free

    m.append(seq, [8])  # fills block 3 without a new block
    assert len(seq.block_ids) == 4 and m.pool.num_free == free
    assert m.stats()["cached_blocks"] == 3  # not computed yet, so not cached
    m.mark_computed(seq)
    assert seq.num_committed_blocks == 4 and m.stats()["cached_blocks"] == 4
    assert m.radix.match(seq.token_ids + [0]).blocks == seq.block_ids[:4]
    check(m)

    m.append(seq, [7] * 5)  # 21 tokens: one more full block and a new partial one
    assert len(seq.block_ids) == 6 and m.pool.num_free == free - 2
    m.mark_computed(seq)
    assert seq.num_committed_blocks == 5 and m.stats()["cached_blocks"] == 5
    assert m.pool.ref_counts[seq.block_ids[5]] == 1  # the partial tail: the session's own
    assert all(count >= 1 for count in path_locks(seq.node))  # the live session's path is locked
    check(m)

    m.release(seq)
    assert m.stats()["cached_blocks"] == 5 and m.pool.num_free == 4  # and the last block, kept as a tail
    assert m.stats()["tail_blocks"] == 1
    check(m)


def test_scoring_without_reuse_duplicates_blocks_and_the_tree_keeps_its_own():
    """vLLM ``test_prefix_caching.py::test_prefill_plp``: a prompt-logprobs request takes no hit
    and computes duplicates of cached blocks. Trellis: ``max_reuse=0`` gives the same cold admission;
    on commit the tree keeps the blocks it already has and the duplicates stay the session's, freed
    when it ends (vLLM instead keeps both copies under one hash)."""
    m = make_manager(num_blocks=12)
    req0 = m.admit(COMMON + [3] * 3)
    m.mark_computed(req0)
    req1 = m.admit(COMMON + [3] * 2, max_reuse=0)
    assert req1.num_prefix_hit == 0 and not set(req1.block_ids) & set(req0.block_ids)
    m.mark_computed(req1)
    assert m.stats()["cached_blocks"] == 3
    assert m.radix.match(COMMON + [0]).blocks == req0.block_ids[:3]
    assert [m.pool.ref_counts[b] for b in req1.block_ids] == [1, 1, 1, 1]
    check(m)
    m.release(req0)
    m.release(req1)
    assert all(m.pool.ref_counts[b] == 0 for b in req1.block_ids)  # its tail too: its node is not its own
    assert m.pool.num_free == 12 - 4  # the tree's 3 blocks and req0's tail
    check(m)


def test_sessions_that_must_not_be_shared_leave_nothing_in_the_tree():
    """vLLM ``test_prefix_caching.py::test_basic_prefix_caching_disabled`` and SGLang
    ``TestRadixCache::test_insert_and_match_basic`` (``disable=True``). Trellis has no global switch;
    a session marked not shareable (K/V a later prompt would not reproduce) is never cached."""
    m = make_manager(num_blocks=5)
    seq = m.admit(list(range(10)))
    seq.shareable = False
    m.mark_computed(seq)
    assert m.stats()["cached_blocks"] == 0
    m.release(seq)
    assert m.pool.num_free == 5
    again = m.admit(list(range(16)))  # 4 blocks, no hit
    assert again.num_prefix_hit == 0 and len(again.block_ids) == 4
    m.release(again, commit=False)
    assert m.stats()["cached_blocks"] == 0 and m.pool.num_free == 5
    check(m)


# --- eviction ----------------------------------------------------------------------------------


def test_eviction_is_lru_leaves_first_block_by_block():
    """vLLM ``test_prefix_caching.py::test_evict`` and SGLang ``TestRadixCache::test_evict_functionality``:
    freed prefixes are evicted least recently used first, and touching a prefix protects it.

    Trellis terms: the touch splits the older prefix's edge; eviction takes a node's tails first,
    then from leaves only, from their end, block by block, exactly the shortfall of the request; an
    emptied leaf's parent becomes a leaf and competes by its own (recent) access time. vLLM instead
    checks its free-queue order.
    """
    m = make_manager(num_blocks=10)
    a_tokens, b_tokens = list(range(23)), list(range(23, 35))
    a = m.admit(a_tokens)  # 5 full blocks + a partial one
    m.mark_computed(a)
    b = m.admit(b_tokens)  # 3 full blocks
    m.mark_computed(b)
    assert m.pool.num_free == 1
    a_blocks = list(a.block_ids)
    m.release(a)  # its partial block stays as a tail
    m.release(b)
    assert m.pool.num_free == 1 and m.stats()["cached_blocks"] == 8 and m.stats()["tail_blocks"] == 1

    touch = run_session(m, a_tokens[:8] + [99])  # touches a's first 2 blocks; leaves a tail [99]
    assert touch.num_prefix_hit == 8 and m.stats()["nodes"] == 3 and m.pool.num_free == 0
    check(m)

    cold = m.admit(list(range(100, 116)))  # 4 blocks, none free: a's lower part, the oldest, goes
    assert m.stats()["evicted_blocks"] == 4  # its tail first, then its 3 blocks from the end
    assert set(a_blocks[2:6]) <= set(cold.block_ids)
    assert m.radix.cached_tokens(a_tokens) == 8 and m.radix.cached_tokens(b_tokens + [0]) == 12
    m.release(cold, commit=False)
    check(m)

    # Left: b (older than the touch) and a's upper part with the touch's tail, touched last.
    assert m.radix.evict(3) == 3
    assert m.radix.cached_tokens(a_tokens) == 8 and m.radix.cached_tokens(b_tokens + [0]) == 0
    check(m)
    assert m.radix.evict(100) == 3  # the tail, then a's 2 blocks
    assert m.stats()["cached_blocks"] == 0 and m.pool.num_free == 10
    check(m)


def test_a_request_never_evicts_the_blocks_it_hits():
    """vLLM ``test_prefix_caching.py::test_computed_blocks_not_evicted``: with one hit block and one
    other cached block, allocating for the hit request evicts the other block, even though the hit
    block is the least recently used. Trellis: ``admit`` locks the matched path before allocating."""
    m = make_manager(num_blocks=2)
    first = run_session(m, list(range(4)))  # 1 full block, cached
    second = run_session(m, list(range(4, 8)))
    assert m.pool.num_free == 0 and m.stats()["cached_blocks"] == 2
    req = m.admit(list(range(8)))  # hits first's block, needs one more
    assert req.num_prefix_hit == 4
    assert req.block_ids == [first.block_ids[0], second.block_ids[0]]
    assert m.stats()["evicted_blocks"] == 1
    check(m)
    m.mark_computed(req)
    m.release(req)
    assert m.radix.cached_tokens(list(range(8)) + [0]) == 8
    check(m)


def test_an_evicted_block_reused_for_a_new_request_is_forgotten_by_the_tree():
    """vLLM ``test_prefix_caching.py::test_hash_block_correct_reuse``: a cached block that is
    evicted and handed out again (here for a partial block) must lose its cache identity.
    Trellis: eviction removes the block from the tree before the pool hands it out."""
    m = make_manager(num_blocks=1)
    cached = run_session(m, list(range(4)))
    assert m.stats()["cached_blocks"] == 1
    seq = m.admit(list(range(3)))  # a partial block; the only block must be evicted first
    assert seq.block_ids == cached.block_ids
    assert m.radix.cached_tokens(list(range(4)) + [9]) == 0 and m.stats()["cached_blocks"] == 0
    m.mark_computed(seq)
    m.release(seq)  # its 3 tokens stay as a tail, evictable
    assert m.stats()["cached_blocks"] == 0 and m.stats()["tail_blocks"] == 1 and m.radix.evictable_blocks() == 1
    check(m)


def test_evicting_a_child_while_a_session_uses_its_parent():
    """SGLang ``TestRadixCache::test_lock_ref_operations`` (protected vs evictable) applied to a
    split path: a live session locks only the prefix it uses. Eviction may take the unlocked child
    below it, never the locked parent, and the session can later cache the child again with its
    own blocks. A session on the child's path locks the parent too."""
    m = make_manager(num_blocks=12)
    p, q = list(range(8)), list(range(8, 16))
    run_session(m, p + q + [0])  # one edge of 4 blocks, and a tail after them
    live = m.admit(p + q[:1])  # uses p only: the edge splits under it
    assert live.num_prefix_hit == 8
    assert m.radix.evictable_blocks() == 3  # the child's 2 blocks and its tail
    assert m.radix.evict(10) == 3
    assert m.radix.cached_tokens(p + q + [0]) == 8  # the parent survives, the child is gone
    check(m)

    m.append(live, q[1:] + [0])
    m.mark_computed(live)  # caches q again, with the session's own blocks
    assert m.radix.match(p + q + [0]).blocks == live.block_ids[:4]
    other = m.admit(p + q + [5])
    assert other.num_prefix_hit == 16
    assert m.radix.evictable_blocks() == 0 and m.radix.evict(10) == 0
    check(m)
    m.release(live)
    assert m.radix.evict(10) == 1  # live's tail alone: other's path still locks the parent and the child
    m.release(other)
    assert m.radix.evictable_blocks() == 4
    check(m)


def test_evict_frees_a_block_only_when_its_count_reaches_zero():
    """Trellis' pool rule against SGLang ``TestRadixCache::test_evict_functionality`` (evict calls
    the allocator's free): a block the tree drops goes to the free list only if nobody else holds
    it. Here the inserting caller keeps its own reference, so eviction frees nothing until it drops it."""
    pool = make_pool(4)
    radix = RadixCache(pool)
    blocks = pool.alloc(2)
    radix.insert(list(range(8)), blocks)
    assert [pool.ref_counts[b] for b in blocks] == [2, 2] and radix.evictable_blocks() == 0
    assert radix.evict(2) == 0  # removed from the tree, still referenced
    assert radix.stats()["cached_blocks"] == 0 and pool.num_free == 2
    assert [pool.ref_counts[b] for b in blocks] == [1, 1]
    check(radix)
    pool.decref(blocks)
    assert pool.num_free == 4
    check(radix)


# --- locks and references while requests are in flight ---------------------------------------


def test_lock_and_unlock_move_blocks_between_protected_and_evictable():
    """SGLang ``TestRadixCache::test_lock_ref_operations``: locking a node protects its whole path,
    unlocking makes it evictable again; the root is always locked. Trellis counts evictable blocks
    (SGLang counts tokens), and an unbalanced unlock is an error."""
    pool = make_pool(8)
    radix = RadixCache(pool)
    blocks = pool.alloc(3)
    radix.insert(list(range(12)), blocks)
    pool.decref(blocks)  # the tree is the only owner now
    assert radix.evictable_blocks() == 3
    node = radix.match(list(range(8)) + [0]).node  # splits the edge after 2 blocks
    radix.lock(node)
    assert radix.evictable_blocks() == 1  # the unlocked lower block only
    assert path_locks(node) == [1] and radix.root.lock_count == 2
    radix.unlock(node)
    assert radix.evictable_blocks() == 3 and radix.root.lock_count == 1
    with pytest.raises(RuntimeError, match="not locked"):
        radix.unlock(node)
    check(radix)


def test_repeated_sessions_on_a_cached_prefix_leak_no_locks_or_references():
    """SGLang ``TestDecodeLockRefScenarios::test_incremental_transfer_success``,
    ``::test_incremental_transfer_failure`` and ``::test_repeated_incremental_no_leak``: lock on match,
    move the lock to the deeper node on commit, unlock on finish; a failed session (released without
    committing) unlocks and leaves the prefix cached and evictable."""
    m = make_manager(num_blocks=16)
    prefix = list(range(12))
    run_session(m, prefix)  # 3 full blocks computed: all cached
    for i in range(5):
        seq = m.admit(prefix + [40 + i, 41 + i])
        assert seq.num_prefix_hit == 12
        # The prefix is protected while the session runs; the earlier sessions' tails are not.
        assert m.radix.evictable_blocks() == m.stats()["tail_blocks"] == i
        m.mark_computed(seq)
        m.release(seq)
        assert m.radix.root.lock_count == 1
        check(m)
    assert all(node.lock_count == 0 for node in m.radix.nodes())

    failed = m.admit(prefix + [1, 2, 3, 4, 5])  # the forward fails: released without commit
    m.release(failed, commit=False)
    assert m.stats()["cached_blocks"] == 3 and m.radix.evictable_blocks() == 3 + 5
    assert m.radix.root.lock_count == 1 and m.pool.num_free == 16 - 3 - 5
    check(m)


def test_concurrent_sessions_share_a_prefix_by_reference_count():
    """vLLM ``test_prefix_caching.py::test_prefill`` (hit while the original block is in use) and
    SGLang's RadixAttention sharing: each live session adds one reference to the shared blocks; the
    blocks stay off the free list until the last reference, the tree's, goes at eviction."""
    m = make_manager(num_blocks=16)
    system = list(range(100, 112))
    run_session(m, system)
    shared = m.radix.match(system + [0]).blocks
    sessions = [m.admit(system + [i] * 3) for i in range(4)]
    assert all(s.block_ids[:3] == shared for s in sessions)
    assert [m.pool.ref_counts[b] for b in shared] == [5, 5, 5]
    check(m)
    for live, seq in zip(range(3, -1, -1), sessions):
        m.release(seq)
        assert [m.pool.ref_counts[b] for b in shared] == [1 + live] * 3
        check(m)
    assert m.pool.num_free == 16 - 3
    m.radix.evict(3)
    assert all(m.pool.ref_counts[b] == 0 for b in shared) and m.pool.num_free == 16
    check(m)


# --- the same prompt twice, full pool, failures -----------------------------------------------


def test_same_prompt_twice_in_one_batch():
    """vLLM ``test_prefix_caching.py::test_block_lookup_cache_multi_blocks_per_key`` and
    ``::test_maybe_evict_cached_block`` (two blocks computed for the same hash). In one batch neither
    copy of a prompt can hit the other. Trellis: the first commit caches its blocks; the second finds
    them and keeps its duplicates private, so the tree never holds a prompt twice and the duplicates
    are freed when the session ends. A later admission (the engine's "wait a step") hits the cache."""
    m = make_manager(num_blocks=12)
    prompt = list(range(10))
    first, second = m.admit_batch([prompt, prompt], max_reuse=[9, 9])
    assert first.num_prefix_hit == second.num_prefix_hit == 0
    assert not set(first.block_ids) & set(second.block_ids)
    m.mark_computed(first)
    assert m.admission_cost(prompt).cached_tokens == 8  # what a request waiting a step would get
    m.mark_computed(second)
    assert m.stats()["cached_blocks"] == 2
    assert [m.pool.ref_counts[b] for b in first.block_ids[:2]] == [2, 2]
    assert [m.pool.ref_counts[b] for b in second.block_ids[:2]] == [1, 1]
    check(m)
    m.release(first)
    m.release(second)
    assert all(m.pool.ref_counts[b] == 0 for b in second.block_ids)
    assert m.pool.num_free == 12 - 3  # the tree's 2 blocks and first's partial one, kept as a tail
    third = m.admit(prompt)
    assert third.block_ids[:2] == first.block_ids[:2]
    m.release(third)
    check(m)


def test_full_pool_rejects_cleanly_and_admits_once_blocks_can_be_evicted():
    """vLLM ``test_prefix_caching.py::test_can_fit_full_sequence_full_attention_still_gates_oversized``
    and the "cache miss and eviction" step of ``::test_prefill``: with the pool held by live sessions
    a request fails with a clear error and changes nothing; once they finish, a request as large as
    the whole pool fits by evicting every cached block."""
    m = make_manager(num_blocks=6)
    a = m.admit(list(range(12)))
    b = m.admit(list(range(100, 112)))
    m.mark_computed(a)
    m.mark_computed(b)
    assert m.pool.num_free == 0
    before = (m.stats(), list(m.pool.ref_counts))
    with pytest.raises(OutOfBlocksError, match="KV cache full"):
        m.admit([7])
    with pytest.raises(OutOfBlocksError):
        m.append(a, [1])
    assert a.token_ids == list(range(12)) and (m.stats(), m.pool.ref_counts) == before
    assert not m.admission_cost([7]).fits
    assert m.can_ever_hold(24) and not m.can_ever_hold(25)
    check(m)

    m.release(a)  # evictable now; b is still locked
    whole = list(range(200, 224))
    with pytest.raises(OutOfBlocksError):
        m.admit(whole)
    assert m.stats()["cached_blocks"] == 6 and m.stats()["evicted_blocks"] == 0
    m.release(b)
    seq = m.admit(whole)
    assert len(seq.block_ids) == 6 and m.stats()["evicted_blocks"] == 6 and m.stats()["cached_blocks"] == 0
    m.release(seq, commit=False)
    check(m)


def test_a_request_that_cannot_fit_leaves_its_hit_blocks_untouched():
    """vLLM ``test_prefix_caching.py::test_prefill_not_enough_free_blocks_with_computed_blocks``:
    a request whose prefix is cached but whose remaining blocks cannot be allocated fails, and the
    reference counts of the hit blocks are unchanged. Trellis: its own match locked the evictable
    extension, so nothing can be evicted for it; the error leaves counts, tree and stats as they were."""
    m = make_manager(num_blocks=8)
    req0 = m.admit(COMMON)
    m.mark_computed(req0)
    req1 = m.admit(COMMON * 2)  # hits COMMON, adds 3 blocks
    assert req1.num_prefix_hit == 12
    m.mark_computed(req1)
    ext = req1.block_ids[3:]
    m.release(req1)
    assert [m.pool.ref_counts[b] for b in req0.block_ids] == [2, 2, 2]
    assert [m.pool.ref_counts[b] for b in ext] == [1, 1, 1]
    req2 = m.admit([7] * 8)
    assert m.pool.num_free == 0
    counts, stats = list(m.pool.ref_counts), m.stats()
    with pytest.raises(OutOfBlocksError):
        m.admit(COMMON * 3)  # would hit 6 blocks and need 3 more
    assert m.pool.ref_counts == counts
    after = m.stats()
    for key in ("cached_blocks", "evicted_blocks", "lookup_tokens", "hit_tokens", "live_sessions", "free_blocks"):
        assert after[key] == stats[key], key
    check(m)
    m.release(req0)
    m.release(req2)
    check(m)


def test_a_failed_request_does_not_refresh_its_prefix_for_eviction():
    """vLLM ``test_prefix_caching.py::test_prefill_not_enough_free_blocks_with_computed_blocks``:
    the hit blocks of a request that cannot be allocated are not touched (vLLM touches, i.e. moves
    blocks off the LRU free queue, only after allocation succeeds). Trellis' rule is that a failed
    request changes nothing, eviction order included: the older prefix must still go first."""
    m = make_manager(num_blocks=6)
    old, new = list(range(8)), list(range(50, 58))
    run_session(m, old)
    run_session(m, new)  # 4 blocks cached, `old` the least recently used
    with pytest.raises(OutOfBlocksError):
        m.admit(old + list(range(100, 120)))  # hits `old`, needs 5 more: 2 free + 2 evictable
    m.radix.evict(2)
    assert m.radix.cached_tokens(old + [1]) == 0
    assert m.radix.cached_tokens(new + [1]) == 8
    check(m)


# --- statistics, keys, reset ---------------------------------------------------------------------


def test_hit_statistics_count_admitted_lookups():
    """vllm-gaudi/vllm ``test_prefix_cache_stats_is_recorded`` (``[101] * (BLOCK_SIZE + 1)`` twice
    gives ``num_cached_tokens == BLOCK_SIZE``) and vLLM ``::test_eagle_identical_prompt_hits_last_safe_block``
    (an identical whole-block prompt recomputes its last block, where Trellis copies all of it but
    the last token): Trellis' hit counters and ``match``'s one-token rule. A peek
    (``admission_cost``) and a failed admission are not lookups."""
    m = make_manager(num_blocks=8)
    short = [101] * (BS + 1)
    assert run_session(m, short).num_prefix_hit == 0
    assert run_session(m, short).num_prefix_hit == BS
    whole = [102] * (2 * BS)
    assert run_session(m, whole).num_prefix_hit == 0
    assert run_session(m, whole).num_prefix_hit == 2 * BS - 1  # one token is left to compute
    s = m.stats()
    assert (s["lookup_tokens"], s["hit_tokens"]) == (2 * (BS + 1) + 2 * 2 * BS, 3 * BS - 1)
    assert s["hit_rate"] == pytest.approx((3 * BS - 1) / (2 * (BS + 1) + 4 * BS))
    m.admission_cost(short)
    with pytest.raises(OutOfBlocksError):
        m.admit(short + list(range(40)))
    assert m.stats()["lookup_tokens"] == s["lookup_tokens"] and m.stats()["hit_tokens"] == s["hit_tokens"]
    check(m)


def test_a_failed_batch_is_not_counted_in_hit_statistics():
    """The statistics half of "a failed request changes nothing", for a batch (vLLM and SGLang
    admit request by request; Trellis' ``admit_batch`` is all or nothing): a single failed ``admit``
    records no lookup, and a batch whose last row fails must not record its rolled-back rows either."""
    m = make_manager(num_blocks=6)
    run_session(m, list(range(9)))
    before = m.stats()
    with pytest.raises(OutOfBlocksError):
        m.admit_batch([list(range(9)), list(range(200, 220))], max_reuse=[8, 0])
    after = m.stats()
    assert (after["lookup_tokens"], after["hit_tokens"]) == (before["lookup_tokens"], before["hit_tokens"])
    check(m)


def test_repeated_block_contents_are_keyed_by_position():
    """SGLang ``TestRadixCache::test_hash_value_repeating_tokens`` (repeating pages get different,
    position-aware hashes) and vLLM's parent-chained block hashes. Trellis has no hashes, so no
    collisions: a block is found by the whole token path above it, and equal contents at different
    depths are different nodes with different blocks."""
    m = make_manager(num_blocks=12)
    r = [1, 2, 3, 4]
    seq = run_session(m, r * 3 + [9])
    cached = seq.block_ids[:3]
    assert len(set(cached)) == 3
    assert m.radix.match(r + [5, 6, 7, 8, 9]).blocks == cached[:1]
    assert m.radix.match(r * 2 + [0]).blocks == cached[:2]
    assert m.radix.match([5, 6, 7, 8] + r + [0]).blocks == []  # r at depth 1 is not r at depth 0
    check(m)


def test_radix_insert_match_split_and_block_alignment():
    """SGLang ``TestRadixCache::test_insert_and_match_basic``, ``::test_total_size``,
    ``::test_advanced_prefix_match_with_node_splits``, ``::test_page_alignment_boundary`` and
    ``::test_all_values_flatten``, on the bare tree with block size 2. Trellis: inserts take whole
    blocks only; an insert over a cached prefix adopts only the new blocks (the caller keeps its
    duplicates); a match that ends inside an edge splits it without changing what is cached; matches
    are whole blocks and, by default, never the whole key."""
    pool = make_pool(16, block_size=2)
    radix = RadixCache(pool)
    seq1 = [1, 2, 3, 4, 5, 6, 7, 8]
    blocks1 = pool.alloc(4)
    radix.insert(seq1, blocks1)
    seq2 = [1, 2, 9, 10]
    blocks2 = pool.alloc(2)
    radix.insert(seq2, blocks2)  # the tree keeps blocks1[0] for [1, 2] and adopts blocks2[1]
    assert radix.stats()["cached_blocks"] == 5
    assert [pool.ref_counts[b] for b in blocks2] == [1, 2]
    assert {b for n in radix.nodes() for b in n.blocks} == set(blocks1) | {blocks2[1]}
    with pytest.raises(ValueError, match="whole blocks"):
        radix.insert([1, 2, 3], blocks1[:1])  # a partial block is never cached
    check(radix)

    assert radix.match([1, 2, 3, 4, 999, 1000]).blocks == blocks1[:2]
    assert radix.stats()["cached_blocks"] == 5  # the split changed the shape, not the content
    assert radix.match(seq1).blocks == blocks1[:3]  # one token left to compute
    assert radix.match(seq1, max_tokens=len(seq1)).blocks == blocks1
    assert radix.match([1, 2, 3, 4, 5, 6, 777, 888]).blocks == blocks1[:3]
    assert radix.match(seq2, max_tokens=len(seq2)).blocks == [blocks1[0], blocks2[1]]
    for n in range(1, 9):
        assert len(radix.match(seq1[:n]).blocks) == (n - 1) // 2  # whole blocks, below the key
    before = list(pool.ref_counts)
    radix.insert(seq1, blocks1)  # a repeated insert adopts nothing
    assert pool.ref_counts == before
    check(radix)

    pool.decref(blocks1 + blocks2)  # the callers' references
    assert pool.num_free == 16 - 5
    check(radix)


@pytest.mark.parametrize("forget", ["reset", "clear"])
def test_reset_forgets_every_prefix_and_keeps_live_sessions_valid(forget):
    """vLLM ``test_prefix_caching.py::test_reset_prefix_cache`` and SGLang ``TestRadixCache::test_reset``.
    vLLM refuses to reset while blocks are in use; Trellis resets anyway: blocks only the tree held
    are freed at once, blocks a live session uses stay with it (count 1), and the session commits
    into the fresh tree when it ends. ``clear`` forgets the same, without the ``on_reset`` callbacks."""
    m = make_manager(num_blocks=10)
    callbacks = []
    m.on_reset.append(lambda: callbacks.append(1))
    run_session(m, COMMON + [3] * 3)
    live = m.admit(COMMON + [4] * 3)
    shared = live.block_ids[:3]
    run_session(m, list(range(100, 109)))  # 2 more cached blocks, no session on them
    assert m.pool.num_free == 10 - 3 - 1 - 2 - 2  # and each finished session's partial block, as a tail
    getattr(m, forget)()
    assert callbacks == ([1] if forget == "reset" else [])
    s = m.stats()
    assert s["cached_blocks"] == s["tail_blocks"] == s["nodes"] == 0 and m.radix.evictable_blocks() == 0
    assert m.pool.num_free == 6 and [m.pool.ref_counts[b] for b in shared] == [1, 1, 1]
    assert m.radix.root.lock_count == 2  # the root's own lock and the live session's
    check(m)
    cold = m.admit(COMMON + [5])
    assert cold.num_prefix_hit == 0
    m.release(cold, commit=False)
    m.mark_computed(live)
    m.release(live)
    assert m.stats()["cached_blocks"] == 3 and m.radix.match(COMMON + [0]).blocks == shared
    assert m.radix.root.lock_count == 1
    check(m)
