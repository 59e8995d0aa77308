"""``PagedModelRunner``: an unchanged transformers Llama run over the paged KV cache, one packed
step at a time.

The runner owns what every caller of the model shares: the KV cache (rebuilt empty whenever its
K/V would be stale), the input checks, packing a step's new tokens into one ``[1, T]`` sequence,
the forward itself (transformers' decoder, whose attention is the registered ``"trellis"``
function reading the step's ``PagedBatch``), picking logits, and the lock that keeps forwards on
the shared pool one at a time. The engine, the eval scorers and the Hugging Face façade
(``TrellisLlama``) all run the model through it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM

from trellis import ops
from trellis.cache.block_pool import BlockPool, check_block_size
from trellis.cache.manager import KVCacheManager, PagedSequence
from trellis.runner import cpu_linear
from trellis.runner.attention import ATTN_IMPLEMENTATION
from trellis.runner.batch import PagedBatch, build_batch
from trellis.runner.weights_watcher import WeightsWatcher


@dataclass(frozen=True)
class CacheSettings:
    """The KV pool's geometry and kernels. ``num_blocks`` wins over ``kv_cache_memory`` (bytes);
    with neither, ``default_kv_cache_memory``. ``backend`` None: the fastest for the device."""

    block_size: int = 32
    num_blocks: int | None = None
    kv_cache_memory: int | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        check_block_size(self.block_size)
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks <= 0):
            raise ValueError(f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}")
        if self.backend is not None and self.backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {ops.BACKENDS}")


def default_kv_cache_memory(device: torch.device) -> int:
    """Bytes for the KV pool when the user sets neither ``num_blocks`` nor ``kv_cache_memory``:
    half the free memory of a CUDA device, else a quarter of free RAM, at most 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    return min(available // 4, 4 << 30)


class PagedModelRunner:
    """Runs ``model`` (a ``LlamaForCausalLM`` loaded with ``attn_implementation="trellis"``)
    over its paged KV cache.

    Thread-safety: hold ``lock`` around any sequence of cache changes and forwards that must not
    interleave with another thread's (it is re-entrant; the methods here take it too).
    """

    def __init__(self, model: LlamaForCausalLM, settings: CacheSettings | None = None) -> None:
        self.model = model
        self.settings = settings or CacheSettings()
        self.linear_kernel = cpu_linear.linear_kernel_of(model.lm_head) or "blas"
        self.lock = threading.RLock()
        self._cache_lock = threading.Lock()  # threads asking for the cache together get one and the same
        self._manager: KVCacheManager | None = None
        self._manager_key: tuple | None = None  # what the cached K/V were computed with
        self.weights_watcher = WeightsWatcher(model)

    # --- settings ----------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def configure(self, settings: CacheSettings) -> None:
        """New pool geometry or kernels; takes effect, with an empty cache, at the next forward."""
        with self.lock, self._cache_lock:
            self.settings, self._manager = settings, None

    def set_linear_kernel(self, kind: str) -> int:
        """What runs the linear layers in CPU fp32 inference (see ``cpu_linear``); the cache starts
        empty afterwards (its K/V came from other matmuls). Returns the layers that changed kind."""
        with self.lock:
            changed = cpu_linear.set_linear_kernel(self.model, kind)
            self.linear_kernel = kind
            return changed

    def attention_backend(self) -> str:
        """The kernels attention runs on: the configured backend, else the fastest for the device."""
        return self.settings.backend or ops.default_backend(self.device)

    # --- the KV cache ------------------------------------------------------------------------

    @property
    def prefix_cache(self) -> KVCacheManager:
        """The paged KV cache. Rebuilt empty whenever the K/V it holds would be stale: a new
        device, dtype, linear kernel or cache settings, weights changed in place or replaced, or
        another PEFT adapter state. Sessions of the old cache can no longer run."""
        with self._cache_lock:
            key = (self.device, self.model.dtype, self.linear_kernel, self.weights_watcher.state())
            if self._manager is None or key != self._manager_key:
                self._manager, self._manager_key = KVCacheManager(self._new_pool()), key
            return self._manager

    def _new_pool(self) -> BlockPool:
        cfg, settings = self.config, self.settings
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        geometry = (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)
        num_blocks = settings.num_blocks
        if num_blocks is None:
            budget = settings.kv_cache_memory or default_kv_cache_memory(self.device)
            num_blocks = max(1, budget // BlockPool.bytes_per_block(settings.block_size, *geometry, self.model.dtype))
        return BlockPool(num_blocks, settings.block_size, *geometry, dtype=self.model.dtype, device=self.device)

    # --- input checks ------------------------------------------------------------------------

    def check_token_ids(self, rows: Sequence[Sequence[int]]) -> None:
        vocab = self.config.vocab_size
        for row in rows:
            if row and not (0 <= min(row) and max(row) < vocab):
                bad = next(t for t in row if not 0 <= t < vocab)
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")

    def check_positions(self, length: int) -> None:
        limit = self.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"a sequence of {length} tokens exceeds the model's {limit} positions "
                             "(max_position_embeddings)")

    # --- forwards ----------------------------------------------------------------------------

    def forward(self, manager: KVCacheManager, seqs: Sequence[PagedSequence], **kwargs) -> tuple[torch.Tensor, PagedBatch]:
        """One packed forward over the uncomputed tokens of ``seqs``, sessions of ``manager`` (the
        ``prefix_cache`` they were admitted to) with their blocks already reserved.

        Writes their K/V into the pool, marks them computed and shares their full blocks with the
        radix cache. Returns the final hidden states ``[T, H]`` of the new tokens, packed, and the
        batch (sequence i's tokens are ``hidden[cu_seqlens_q[i]:cu_seqlens_q[i+1]]``); ``logits``
        turns the rows you need into logits. ``kwargs`` go to transformers' decoder.
        """
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"the model runs {self.config._attn_implementation!r} attention, not the paged "
                               f"{ATTN_IMPLEMENTATION!r} one; load it with attn_implementation={ATTN_IMPLEMENTATION!r}")
        with self.lock:
            batch = build_batch(seqs, manager.pool, self.settings.backend)
            hidden = self.model.model(input_ids=batch.input_ids[None], position_ids=batch.positions[None],
                                      paged_batch=batch, use_cache=False, **kwargs).last_hidden_state[0]  # [T, H]
            for seq in seqs:
                manager.mark_computed(seq)
            return hidden, batch

    def forward_rows(self, manager: KVCacheManager, seqs: list[PagedSequence], rows: Sequence[Sequence[int]],
                     max_reuse: Sequence[int] | None = None, **kwargs) -> tuple[torch.Tensor, PagedBatch]:
        """Run ``rows`` as the next tokens of ``seqs`` (row ``i`` continues session ``i``); an empty
        ``seqs`` is filled, in place, with sessions admitted over ``rows``, row ``i`` reusing at most
        ``max_reuse[i]`` cached tokens. A failure leaves ``seqs`` and the cache as they were."""
        with self.lock:
            fresh = not seqs
            if fresh:
                seqs[:] = manager.admit_batch(rows, max_reuse if max_reuse is not None else [len(r) for r in rows])
            else:
                manager.extend_batch(seqs, rows)
            try:
                return self.forward(manager, seqs, **kwargs)
            except BaseException:
                manager.rollback_batch(seqs, None if fresh else [len(row) for row in rows])
                if fresh:
                    seqs.clear()
                raise

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, H]`` final hidden states to ``[R, V]`` logits."""
        return self.model.lm_head(hidden)

    def select_logits(self, hidden: torch.Tensor, batch: PagedBatch, real: torch.Tensor | None, keep_cols: torch.Tensor,
                      skipped: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, V]`` of a padded ``[B, S]`` input at columns ``keep_cols`` ``[K]``, from the
        packed ``hidden`` of its real tokens (``real`` ``[B, S]`` bool, None if all are real); row
        ``i``'s first ``skipped[i]`` real tokens were served by the cache. Zero where padding."""
        row_starts = batch.cu_seqlens_q[:-1].long()  # [B]
        if real is None:  # row i's column c is packed token row_starts[i] + c - skipped[i]
            return self.logits(hidden[(row_starts - skipped)[:, None] + keep_cols])
        rank = real.long().cumsum(1) - 1  # [B, S] index of each real token among its row's new tokens
        packed = row_starts[:, None] + rank - skipped[:, None]  # [B, S] its index in the packed batch
        kept_real = real[:, keep_cols]  # [B, K]
        index = packed[:, keep_cols][kept_real]  # [R]
        logits_real = self.logits(hidden[index])  # [R, V]
        logits = logits_real.new_zeros(real.shape[0], len(keep_cols), logits_real.shape[-1])
        logits[kept_real] = logits_real
        return logits


def runner_of(model: object) -> PagedModelRunner:
    """The runner of a ``TrellisLlama`` (its ``runner``), or ``model`` itself if it is one."""
    runner = model if isinstance(model, PagedModelRunner) else getattr(model, "runner", None)
    if not isinstance(runner, PagedModelRunner):
        raise TypeError(f"expected a TrellisLlama or a PagedModelRunner, got {type(model).__name__}")
    return runner
