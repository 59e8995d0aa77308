"""The handle through which transformers' ``generate()`` carries Trellis sessions between steps."""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from trellis.cache.manager import KVCacheManager, PagedSequence

# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache``
# (the old name still works there, with a deprecation warning); earlier 5.x releases know only
# the old name. Trellis hands the cache to transformers under the name it expects.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def take_cache_argument(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The cache a caller passed under either name (``generate()`` in transformers 5.24+ passes
    ``cache``); removes ``cache`` from ``kwargs``. Before 5.24 ``cache`` is no cache argument
    (continuous batching passes its paged cache to the attention under that name) and stays."""
    if CACHE_ARG != "cache":
        return past_key_values
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class PagedKVCache(Cache):
    """One paged session per batch row; the K/V themselves live in the shared block pool.

    It stands where transformers expects its cache (``cache``, formerly ``past_key_values``).
    Releasing it (explicitly, or when it is garbage collected) shares the sessions' full blocks
    with the radix cache and returns the rest to the pool.
    """

    is_compileable = False
    is_croppable = True  # see ``crop``: assisted and prompt-lookup decoding roll rejected drafts back

    # transformers derives these per-layer flags from ``self.layers``, which is empty here (the
    # K/V live in the pool), and ``all([])`` would call this cache all linear attention: then
    # ``generate()`` continuing from it would not skip the tokens it already holds.
    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.manager.pool.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.manager.pool.layers)

    def __init__(self, manager: KVCacheManager) -> None:
        super().__init__(layers=[])
        self.manager = manager
        self.seqs: list[PagedSequence] = []
        self.seen_columns = 0  # width of the (padded) inputs consumed so far, as transformers counts
        # The fewest decoder layers a forward over these sessions ran (None before the first): while
        # config.num_hidden_layers is lowered (an early-exit drafter) the later layers' K/V stay unwritten.
        self.num_layers: int | None = None
        # Set by generate() while it runs assisted decoding: the column (its max_length) from which
        # it discards whatever a forward computes; drafts past it need not fit the model's positions.
        self.discard_from: int | None = None
        # The finalizer only queues the release: it may run inside another cache operation.
        self._finalizer = weakref.finalize(self, manager.release_later, self.seqs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_columns

    def get_max_length(self) -> int:
        return -1

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def __deepcopy__(self, memo: dict) -> PagedKVCache:
        """An independent handle over the same K/V: each session forked (full blocks shared, the
        partial tail block copied), as transformers' recipe of reusing one prefilled prompt
        cache for several continuations expects of ``copy.deepcopy``."""
        copy = PagedKVCache(self.manager)
        with self.manager.lock:
            copy.seqs.extend(self.manager.fork(seq) for seq in self.seqs)
        copy.seen_columns, copy.num_layers = self.seen_columns, self.num_layers
        return copy

    def release(self) -> None:
        """End every session now: share their full blocks, free the rest."""
        if self._finalizer.detach() is None:
            return
        with self.manager.lock:
            for seq in self.seqs:
                self.manager.release(seq)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every row (transformers passes a negative
        count, as to its own caches); ``KVCacheManager.truncate`` does the rollback."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if remove == 0:
            return
        shortest = min((len(seq.token_ids) for seq in self.seqs), default=0)
        if remove > shortest:
            raise ValueError(f"cannot crop {remove} tokens from a cache whose shortest row holds {shortest}")
        self.manager.truncate(self.seqs, [len(seq.token_ids) - remove for seq in self.seqs])
        self.seen_columns -= remove

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues from row ``beam_idx[i]`` (shared blocks, copied tail)."""
        with self.manager.lock:
            forks: list[PagedSequence] = []
            try:
                for i in beam_idx.tolist():
                    forks.append(self.manager.fork(self.seqs[i]))
            except BaseException:  # out of blocks part way: the rows keep their sessions, no fork is left
                for fork in forks:
                    self.manager.release(fork, commit=False)
                raise
            for seq in self.seqs:
                self.manager.release(seq, commit=False)
            self.seqs[:] = forks
