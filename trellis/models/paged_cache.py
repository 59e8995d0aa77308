"""The handle through which transformers' ``generate()`` carries Trellis sessions between steps."""

from __future__ import annotations

import operator
import weakref

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from trellis.cache.manager import KVCacheManager, PagedSequence

# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache``
# (the old name still works there, with a deprecation warning); earlier 5.x releases know only
# the old name. Trellis hands the cache to transformers under the name it expects.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def take_cache_argument(past_key_values: Cache | None, cache: object, kwargs: dict) -> Cache | None:
    """The cache a caller passed under either name (``generate()`` in transformers 5.24+ passes
    ``cache``). Before 5.24 ``cache`` is no cache argument (continuous batching passes its paged
    cache to the attention under that name): it goes back into ``kwargs``."""
    if CACHE_ARG != "cache":
        if cache is not None:
            kwargs["cache"] = cache
        return past_key_values
    if cache is not None and past_key_values is not None:
        foreign = [type(c).__name__ for c in (cache, past_key_values) if not isinstance(c, PagedKVCache)]
        if foreign:  # generate()'s paged cache beside one of a wrapper's (PEFT's prefix tuning)
            raise TypeError(f"a {foreign[0]} came beside the paged cache: Trellis keeps every K/V in its paged "
                            "cache, and cannot attend over another cache's (prefix tuning's virtual tokens)")
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
        # Which of those columns held real tokens [B, seen_columns] (None: every one). The sessions
        # hold K/V of the real tokens alone, so a later attention_mask must mark the past alike.
        self.past_real: torch.Tensor | None = None
        # The fewest decoder layers a forward over these sessions ran (None before the first): while
        # config.num_hidden_layers is lowered (an early-exit drafter) the later layers' K/V stay unwritten.
        self.num_layers: int | None = None
        # Set by generate() while it runs assisted decoding: the column (its max_length - 1: the last
        # token is never fed back) from which it discards whatever a forward computes; drafts there
        # and past it need not fit the model's positions.
        self.discard_from: int | None = None
        # The finalizer only queues the release: it may run inside another cache operation.
        self._finalizer = weakref.finalize(self, manager.release_later, self.seqs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_columns

    def record_columns(self, real: torch.Tensor | None, num_rows: int, num_cols: int) -> None:
        """Count a forward's ``num_cols`` columns; ``real`` [B, S]: which held real tokens (None: all)."""
        if real is not None or self.past_real is not None:
            device = (real if real is not None else self.past_real).device
            past = self.past_real if self.past_real is not None else \
                torch.ones(num_rows, self.seen_columns, dtype=torch.bool, device=device)
            new = real if real is not None else torch.ones(num_rows, num_cols, dtype=torch.bool, device=device)
            self.past_real = torch.cat([past, new.to(device)], 1)
        self.seen_columns += num_cols

    def check_past_mask(self, attention_mask: torch.Tensor | None, num_cols: int) -> None:
        """Refuse an ``attention_mask`` whose columns before the last ``num_cols`` mark the columns
        this cache holds otherwise than the forwards that computed them: transformers would mask
        those keys anew, while the sessions hold K/V of the real tokens alone; and a mask wider than
        those columns and the new ones (which transformers would read from its first columns)."""
        if attention_mask is not None and attention_mask.shape[1] > self.seen_columns + num_cols:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns, more than the cache's "
                             f"{self.seen_columns} and the input's {num_cols}: pass the mask of those columns")
        past_cols = 0 if attention_mask is None else min(attention_mask.shape[1] - num_cols, self.seen_columns)
        if past_cols <= 0:
            return
        given = attention_mask[:, attention_mask.shape[1] - num_cols - past_cols : attention_mask.shape[1] - num_cols]
        given = given.bool()  # [B, P]
        own = None if self.past_real is None else self.past_real[:, -past_cols:].to(given.device)
        if own is not None and own.shape[0] != given.shape[0]:
            return  # another batch size: the forward refuses it, naming the rows
        if bool(given.all()) if own is None else torch.equal(given, own):
            return
        own = torch.ones_like(given) if own is None else own
        row, col = (given != own).nonzero()[0].tolist()
        raise ValueError(
            f"attention_mask marks past column {self.seen_columns - past_cols + col} of row {row} as "
            f"{'real' if given[row, col] else 'padding'}, but the forward that computed this cache had it as "
            f"{'real' if own[row, col] else 'padding'}: the cache holds K/V of the real tokens only and cannot be "
            "masked anew; pass the mask it was computed with (its columns, then the new ones)")

    def get_max_length(self) -> int:
        """-1: no fixed length (``Cache.get_max_length`` would read the per-layer caches this one has none of)."""
        return -1

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def released(self) -> bool:
        """Whether ``release`` ended its sessions (it then serves no forward)."""
        return not self._finalizer.alive

    def __deepcopy__(self, memo: dict) -> PagedKVCache:
        """An independent handle over the same K/V: each session forked (full blocks shared, the
        partial tail block copied), as transformers' recipe of reusing one prefilled prompt
        cache for several continuations expects of ``copy.deepcopy``."""
        copy = PagedKVCache(self.manager)
        with self.manager.lock:  # (a Ctrl-C waits for it: the forks reach the copy)
            copy.seqs.extend(self.manager.fork_all(self.seqs))
        copy.seen_columns, copy.num_layers, copy.past_real = self.seen_columns, self.num_layers, self.past_real
        return copy

    def __copy__(self) -> PagedKVCache:
        raise TypeError("a PagedKVCache cannot be copied shallowly (the copy and the original would end the same "
                        "sessions); copy.deepcopy forks them into an independent handle")

    def release(self) -> None:
        """End every session now: share their full blocks, free the rest."""
        with self.manager.lock:  # (a Ctrl-C waits until they are released)
            if not self._finalizer.alive:
                return
            self._finalizer()  # queues them, as garbage collection would
            self.manager.release_pending()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every row (transformers passes a negative
        count, as to its own caches); ``KVCacheManager.truncate`` does the rollback."""
        try:
            count = operator.index(tokens_to_remove)  # an int, a NumPy int or a 0-d integer tensor
        except TypeError:
            raise TypeError(f"crop takes minus the number of tokens to remove (an integer), got {tokens_to_remove!r}") \
                from None
        if count > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {count}")
        remove = -count
        if remove == 0:
            return
        shortest = min((len(seq.token_ids) for seq in self.seqs), default=0)
        if remove > shortest:
            raise ValueError(f"cannot crop {remove} tokens from a cache whose shortest row holds {shortest}")
        with self.manager.lock:  # the sessions and the columns alike, whenever a Ctrl-C comes
            self.manager.truncate(self.seqs, [len(seq.token_ids) - remove for seq in self.seqs])
            self.seen_columns -= remove
            if self.past_real is not None:
                self.past_real = self.past_real[:, : self.seen_columns]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i continues from row ``beam_idx[i]`` (shared blocks, copied tail)."""
        with self.manager.lock:
            rows = beam_idx.tolist()
            if any(not 0 <= i < len(self.seqs) for i in rows):
                raise IndexError(f"row indices {rows} for a cache of {len(self.seqs)} rows")
            forks = self.manager.fork_all([self.seqs[i] for i in rows])  # (out of blocks: the rows keep theirs)
            old, self.seqs[:] = list(self.seqs), forks  # the forks held by the cache before anything is let go
            if self.past_real is not None:
                self.past_real = self.past_real[beam_idx.to(self.past_real.device)]
            for seq in old:
                self.manager.release(seq, commit=False)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (in that order; a boolean mask keeps the rows it marks), as
        transformers' caches do (contrastive search)."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self.reorder_cache(indices.long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in a row, as transformers' caches do (expanding for sampling)."""
        self.reorder_cache(torch.arange(len(self.seqs)).repeat_interleave(repeats))

    def reset(self) -> None:
        raise NotImplementedError("a PagedKVCache is not reset in place: call release() and start a new one "
                                  "(past_key_values=None)")
