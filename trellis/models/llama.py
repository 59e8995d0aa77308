"""``TrellisLlama``: ``LlamaForCausalLM`` with paged attention over a radix prefix cache.

Every forward packs the uncomputed tokens of each batch row into one ``[1, T]`` sequence and
hands the model a ``PagedBatch`` (a keyword argument that transformers passes through to the
attention function). The attention function writes the new K/V into the pool and attends
over each row's blocks. A fresh prompt first takes its longest cached prefix from the radix
tree, so only the suffix runs through the model.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref

import torch
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from trellis import ops
from trellis.cache.block_pool import BlockPool, check_block_size
from trellis.cache.manager import KVCacheManager, Sequence
from trellis.cache.persist import load_prefix_cache, save_prefix_cache, weights_fingerprint
from trellis.engine.batch import PagedBatch, build_batch
from trellis.models import cpu_linear
from trellis.models.attention import ATTN_IMPLEMENTATION
from trellis.models.loading import default_kv_cache_memory, load_llama_config, resolve_device
from trellis.models.paged_cache import CACHE_ARG, PagedKVCache, take_cache_argument

# Bumped whenever a module or parameter is registered into a module of some TrellisLlama (a
# replaced parameter, an added adapter), so that it re-walks its parameters only when they may
# have changed. Registrations elsewhere are ignored: a layer under construction, or the throwaway
# ModuleList that transformers slices from ``model.layers`` on every forward, can only reach a
# model by being attached to one of its modules, which is itself a counted registration.
_registrations = [0]
_watched_modules: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def _count_registration(parent: torch.nn.Module, name: str, value) -> None:
    if parent in _watched_modules:
        _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _peft_tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    if "peft" not in sys.modules:  # no adapters without peft; never import it ourselves
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


class TrellisLlama(LlamaForCausalLM):
    """A drop-in ``LlamaForCausalLM`` whose successive calls reuse cached prompt prefixes.

    ``model.prefix_cache`` is the paged KV cache (``stats()``, ``reset()``); it is created on
    first use for the model's device and dtype, and rebuilt (empty) if either changes.
    """

    def __init__(self, config, block_size: int = 32, num_blocks: int | None = None,
                 kv_cache_memory: int | None = None, backend: str | None = None) -> None:
        super().__init__(config)
        self.configure_cache(block_size=block_size, num_blocks=num_blocks,
                             kv_cache_memory=kv_cache_memory, backend=backend)
        self._forward_lock, self._cache_lock = threading.RLock(), threading.Lock()
        self.set_linear_kernel(cpu_linear.default_linear_kernel())

    def __getstate__(self) -> dict:
        """Copies and pickles carry the weights and settings, not the lock or the cache."""
        state = self.__dict__.copy()
        for transient in ("_forward_lock", "_cache_lock", "_kv_manager", "_kv_key", "_watched_params",
                          "_watched_adapters"):
            state.pop(transient, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._forward_lock, self._cache_lock = threading.RLock(), threading.Lock()
        self._kv_manager, self._kv_key, self._watched_epoch = None, None, -1

    def configure_cache(self, block_size: int = 32, num_blocks: int | None = None,
                        kv_cache_memory: int | None = None, backend: str | None = None) -> None:
        """Set the KV pool's geometry; takes effect (with an empty cache) at the next forward."""
        check_block_size(block_size)
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks <= 0):
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if kv_cache_memory is not None and kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {ops.BACKENDS}")
        self.block_size, self.num_blocks, self.kv_cache_memory, self.backend = (
            block_size, num_blocks, kv_cache_memory, backend)
        self._kv_manager: KVCacheManager | None = None
        self._kv_key: tuple | None = None  # what the cached K/V were computed with
        self._watched_epoch = -1  # see _weights_state

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, block_size: int = 32,
                        num_blocks: int | None = None, kv_cache_memory: int | None = None,
                        backend: str | None = None, device: str | torch.device = "auto",
                        linear_kernel: str | None = None, **kwargs):
        """Load like ``LlamaForCausalLM.from_pretrained`` (local dirs, hub ids, ``gguf_file=``, ``dtype=``).

        With no path, loads the embedded SmolLM2-135M-Instruct. ``device="auto"`` picks CUDA,
        then MPS, then CPU (ignored when ``device_map`` is given). ``linear_kernel``: see
        ``set_linear_kernel()``; by default oneDNN where it runs.
        """
        check_block_size(block_size)
        if pretrained_model_name_or_path is None:
            from trellis.models.embedded import embedded_model_dir

            pretrained_model_name_or_path = embedded_model_dir()
        if kwargs.get("config") is None:
            kwargs["config"] = load_llama_config(pretrained_model_name_or_path, kwargs)
        kwargs.setdefault("attn_implementation", ATTN_IMPLEMENTATION)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model.configure_cache(block_size=block_size, num_blocks=num_blocks,
                              kv_cache_memory=kv_cache_memory, backend=backend)
        if "device_map" not in kwargs:
            model.to(resolve_device(device))
        model.attention_backend()  # load (or build) the kernels now rather than in the first request
        model.set_linear_kernel(linear_kernel or model.linear_kernel)  # also lays out the loaded weights
        return model.eval()

    def set_linear_kernel(self, kind: str) -> int:
        """What runs the linear layers in CPU fp32 inference (elsewhere it is always ``F.linear``):
        ``"blas"`` (transformers' path), ``"onednn"`` (the default on x86: faster, no extra memory;
        the weights are stored input-major) or ``"packed"`` (oneDNN over a second, prepacked copy
        of the weights). See ``trellis.models.cpu_linear``. Returns the number of layers that
        changed kind. The KV cache starts empty afterwards: its K/V were computed by the other
        matmuls."""
        changed = cpu_linear.set_linear_kernel(self, kind)
        self.linear_kernel = kind
        return changed

    def attention_backend(self) -> str:
        """The kernels this model's attention runs on: the configured backend, else the fastest for its device."""
        return self.backend or ops.default_backend(self.device)

    # --- the KV cache ----------------------------------------------------------------------

    @property
    def prefix_cache(self) -> KVCacheManager:
        """The paged KV cache. Rebuilt empty whenever the K/V it holds would be stale: a new
        device, dtype or linear kernel, weights changed in place or replaced (``load_state_dict``,
        edits), or another PEFT adapter state. Handles (``past_key_values``) of the old cache are refused."""
        with self._cache_lock:  # threads arriving together must get one and the same cache
            key = (self.device, self.dtype, self.linear_kernel, self._weights_state())
            if self._kv_manager is None or key != self._kv_key:
                self._kv_manager = KVCacheManager(self._new_pool(self.device, self.dtype))
                self._kv_key = key
            return self._kv_manager

    def _weights_state(self) -> int:
        """Changes whenever a parameter is replaced or modified in place (its version counter),
        or a PEFT adapter is switched, enabled or disabled. Cheap enough for every forward: the
        parameter list is only re-walked after some module or parameter was registered."""
        if self._watched_epoch != _registrations[0]:
            _watched_modules.update(self.modules())
            self._watched_params = list(self.parameters())
            self._watched_adapters = _peft_tuner_layers(self)
            self._watched_epoch = _registrations[0]
        state = [(p.data_ptr(), p._version) for p in self._watched_params]
        state += [(tuple(m.active_adapters), m.disable_adapters) for m in self._watched_adapters]
        return hash(tuple(state))

    def save_prefix_cache(self, path: str | os.PathLike) -> int:
        """Save every cached prefix (tree + K/V) to a safetensors file; returns the blocks saved."""
        with self._forward_lock:
            return save_prefix_cache(self.prefix_cache, path, weights_fingerprint(self))

    def load_prefix_cache(self, path: str | os.PathLike) -> int:
        """Add the prefixes of a file written by ``save_prefix_cache`` for these same weights, dtype
        and block size; anything else is refused with ``PrefixCacheFileError``, changing nothing."""
        with self._forward_lock:
            return load_prefix_cache(self.prefix_cache, path, weights_fingerprint(self))

    def _new_pool(self, device: torch.device, dtype: torch.dtype) -> BlockPool:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        geometry = (cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)
        num_blocks = self.num_blocks
        if num_blocks is None:
            budget = self.kv_cache_memory or default_kv_cache_memory(device)
            num_blocks = max(1, budget // BlockPool.bytes_per_block(self.block_size, *geometry, dtype))
        return BlockPool(num_blocks, self.block_size, *geometry, dtype=dtype, device=device)

    # --- forward ---------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: PagedKVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As ``LlamaForCausalLM.forward``, over the paged cache.

        Positions count each row's real tokens (padding takes none), as ``generate()`` does.
        Logits at padded positions are zero. A fresh prompt reuses its cached prefix up to the
        first position whose logits are asked for (``logits_to_keep``; 0 means all of them).
        """
        past_key_values = take_cache_argument(past_key_values, kwargs)
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **{CACHE_ARG: past_key_values}, **kwargs)
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("TrellisLlama keys its prefix cache on token ids: pass input_ids, not inputs_embeds")
        if past_key_values is not None and not isinstance(past_key_values, PagedKVCache):
            raise TypeError(f"past_key_values must be a PagedKVCache from this model, got {type(past_key_values).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0]
                                           or attention_mask.shape[1] < input_ids.shape[1]):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not cover input_ids of "
                             f"shape {tuple(input_ids.shape)}")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        with self._forward_lock:
            manager = self.prefix_cache
            cache = past_key_values if past_key_values is not None else PagedKVCache(manager)
            if cache.manager is not manager:
                raise RuntimeError("this past_key_values belongs to an earlier KV cache (the model's device, dtype, weights "
                                   "or cache settings changed since); start a new generation")
            num_cols = input_ids.shape[1]
            real = self._padding_mask(input_ids, attention_mask)  # [B, S] bool, None if nothing is padding
            keep_cols = self._logit_columns(logits_to_keep, num_cols, input_ids.device)  # [K]
            rows = input_ids.tolist() if real is None else [row[mask].tolist() for row, mask in zip(input_ids, real)]
            self._check_token_ids(rows)
            fresh = cache.is_empty
            past = [0] * len(rows) if fresh else [len(seq.token_ids) for seq in cache.seqs]
            self._check_positions(max((p + len(r) for p, r in zip(past, rows)), default=0))
            if fresh:
                # Reuse at most the real tokens before the first column whose logits are wanted.
                first_kept = int(keep_cols.min()) if len(keep_cols) else num_cols
                reusable = [first_kept] * len(rows) if real is None else real[:, :first_kept].sum(1).tolist()
                cache.seqs[:] = self._admit(manager, rows, reusable)
            else:
                self._extend(manager, cache.seqs, rows)
            seqs = cache.seqs
            skipped = torch.tensor([s.num_prefix_hit if fresh else 0 for s in seqs], device=input_ids.device)
            try:
                hidden, batch = self.forward_paged(manager, seqs, **kwargs)
            except BaseException:
                self._undo(manager, seqs, rows, fresh)
                raise
            cache.seen_columns += num_cols
            logits = self._gather_logits(hidden, real, keep_cols, batch.cu_seqlens_q[:-1].long(), skipped)
            if not use_cache:
                cache.release()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_ARG: cache if use_cache else None})

    def forward_paged(self, manager: KVCacheManager, seqs: list[Sequence], **kwargs) -> tuple[torch.Tensor, PagedBatch]:
        """One packed forward over the uncomputed tokens of ``seqs``, sessions of ``manager`` (the
        ``prefix_cache`` they were admitted to) with their blocks already reserved.

        Writes their K/V into the pool, marks them computed and shares their full blocks with the
        radix cache. Returns the final hidden states ``[T, H]`` of the new tokens, packed, and the
        batch (sequence i's tokens are ``hidden[cu_seqlens_q[i]:cu_seqlens_q[i+1]]``); apply
        ``lm_head`` to the rows whose logits you need. The engine and the scorers build on this.
        """
        batch = build_batch(seqs, manager.pool, self.backend)
        hidden = self.model(input_ids=batch.input_ids[None], position_ids=batch.positions[None],
                            paged_batch=batch, use_cache=False, **kwargs).last_hidden_state[0]  # [T, H]
        for seq in seqs:
            manager.mark_computed(seq)
        return hidden, batch

    @staticmethod
    def _padding_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Which tokens are real ``[B, S]``; None when all are (the common case, given fast paths)."""
        if attention_mask is None:
            return None
        real = attention_mask[:, -input_ids.shape[1]:].bool()
        return None if real.all() else real

    def _check_token_ids(self, rows: list[list[int]]) -> None:
        vocab = self.config.vocab_size
        for row in rows:
            if row and not (0 <= min(row) and max(row) < vocab):
                bad = next(t for t in row if not 0 <= t < vocab)
                raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")

    def _check_positions(self, length: int) -> None:
        limit = self.config.max_position_embeddings
        if length > limit:
            raise ValueError(f"a sequence of {length} tokens exceeds the model's {limit} positions "
                             "(max_position_embeddings)")

    @staticmethod
    def _logit_columns(logits_to_keep: int | torch.Tensor, num_cols: int, device: torch.device) -> torch.Tensor:
        if isinstance(logits_to_keep, torch.Tensor):
            return logits_to_keep.to(device=device, dtype=torch.long).flatten()
        keep = num_cols if logits_to_keep == 0 else min(logits_to_keep, num_cols)
        return torch.arange(num_cols - keep, num_cols, device=device)

    @staticmethod
    def _admit(manager: KVCacheManager, rows: list[list[int]], reusable: list[int]) -> list[Sequence]:
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"row {i} of the batch has no tokens (empty prompt or all padding)")
        seqs: list[Sequence] = []
        try:
            for row, reuse in zip(rows, reusable):
                seqs.append(manager.admit(row, max_reuse=reuse))
        except BaseException:
            for seq in seqs:
                manager.release(seq, commit=False)
            raise
        return seqs

    @staticmethod
    def _extend(manager: KVCacheManager, seqs: list[Sequence], rows: list[list[int]]) -> None:
        if len(rows) != len(seqs):
            raise ValueError(f"batch of {len(rows)} rows continues a cache of {len(seqs)} sequences")
        done = 0
        try:
            for seq, row in zip(seqs, rows):
                manager.append(seq, row)
                done += 1
        except BaseException:
            TrellisLlama._undo(manager, seqs[:done], rows[:done], fresh=False)
            raise

    @staticmethod
    def _undo(manager: KVCacheManager, seqs: list[Sequence], rows: list[list[int]], fresh: bool) -> None:
        """Roll back a forward that failed: nothing it started may stay half-done in the cache."""
        with manager.lock:
            for seq, row in zip(seqs, rows):
                if fresh:
                    manager.release(seq, commit=False)
                else:
                    del seq.token_ids[len(seq.token_ids) - len(row):]
            if fresh:
                seqs.clear()

    def _gather_logits(self, hidden: torch.Tensor, real: torch.Tensor | None, keep_cols: torch.Tensor,
                       row_starts: torch.Tensor, skipped: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, V]`` for the kept columns; zero where a column is padding."""
        if real is None:  # row i's column c is packed token row_starts[i] + c - skipped[i]
            return self.lm_head(hidden[(row_starts - skipped)[:, None] + keep_cols])
        rank = real.long().cumsum(1) - 1  # [B, S] index of each real token among its row's new tokens
        packed = row_starts[:, None] + rank - skipped[:, None]  # [B, S] its index in the packed batch
        kept_real = real[:, keep_cols]  # [B, K]
        index = packed[:, keep_cols][kept_real]  # [R]
        logits_real = self.lm_head(hidden[index])  # [R, V]
        logits = logits_real.new_zeros(real.shape[0], len(keep_cols), logits_real.shape[-1])
        logits[kept_real] = logits_real
        return logits

    # --- generation ------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """``LlamaForCausalLM.generate`` over the paged cache; prompts reuse cached prefixes, and
        each finished row's full blocks (prompt and answer) are cached for the next turn."""
        use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
        if (self.config._attn_implementation != ATTN_IMPLEMENTATION or use_cache is False
                or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None):
            return super().generate(inputs, generation_config, **kwargs)
        self._check_generation_length(inputs if inputs is not None else kwargs.get("input_ids"),
                                      kwargs.get("attention_mask"), generation_config, kwargs)
        with self._forward_lock:
            cache = PagedKVCache(self.prefix_cache)
            result = None
            try:
                result = super().generate(inputs, generation_config, **{CACHE_ARG: cache}, **kwargs)
                return result
            finally:
                if getattr(result, CACHE_ARG, None) is not cache:
                    cache.release()

    def _check_generation_length(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                                 generation_config, kwargs: dict) -> None:
        """Refuse up front a prompt that ``max_new_tokens`` would carry past the model's positions."""
        max_new = kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
        if input_ids is None or max_new is None or input_ids.dim() != 2:
            return
        longest = int(attention_mask.sum(1).max()) if attention_mask is not None else input_ids.shape[1]
        self._check_positions(longest + max_new)

    def generate_batch(self, inputs: list[list[int]], generation_config=None, continuous_batching_config=None,
                       record_timestamps: bool = False, progress_bar: bool = False, persistent_manager: bool = False,
                       warmup: bool = True, **kwargs):
        """transformers' continuous-batching ``generate_batch`` (same call, same ``{request_id: output}``
        result) served by the Trellis engine over the prefix cache; each output also carries ``ttft``,
        ``num_cached_tokens`` and ``decode_time``. ``persistent_manager`` and ``warmup`` have nothing
        to do here: the cache always persists in ``prefix_cache``."""
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            return super().generate_batch(inputs, generation_config, continuous_batching_config, record_timestamps,
                                          progress_bar, persistent_manager, warmup, **kwargs)
        from trellis.engine.api import generate_batch

        return generate_batch(self, inputs, generation_config, continuous_batching_config, record_timestamps,
                              progress_bar, **kwargs)
