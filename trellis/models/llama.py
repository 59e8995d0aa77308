"""``TrellisLlama``: ``LlamaForCausalLM`` with paged attention over a radix prefix cache.

A thin Hugging Face façade over ``PagedModelRunner`` (``model.runner``): ``forward`` and
``generate`` take transformers' arguments, the runner packs the uncomputed tokens of each batch
row into one sequence and runs the unchanged Llama decoder over the paged KV cache. A fresh
prompt first takes its longest cached prefix from the radix tree, so only the suffix runs.
"""

from __future__ import annotations

import os

import torch
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from trellis.cache.manager import KVCacheManager
from trellis.cache.persist import load_prefix_cache, save_prefix_cache, weights_fingerprint
from trellis.models.loading import load_llama_config, resolve_device
from trellis.models.paged_cache import CACHE_ARG, PagedKVCache, take_cache_argument
from trellis.runner import ATTN_IMPLEMENTATION, CacheSettings, PagedModelRunner, cpu_linear


class TrellisLlama(LlamaForCausalLM):
    """A drop-in ``LlamaForCausalLM`` whose successive calls reuse cached prompt prefixes.

    ``model.prefix_cache`` is the paged KV cache (``stats()``, ``reset()``); it is created on
    first use for the model's device and dtype, and rebuilt (empty) if either changes.
    ``model.runner`` runs the model over it (the engine and the eval scorers use it).
    """

    def __init__(self, config, block_size: int = 32, num_blocks: int | None = None,
                 kv_cache_memory: int | None = None, backend: str | None = None) -> None:
        super().__init__(config)
        self.runner = PagedModelRunner(self, CacheSettings(block_size, num_blocks, kv_cache_memory, backend))
        self.set_linear_kernel(cpu_linear.default_linear_kernel())

    def __getstate__(self) -> dict:
        """Copies and pickles carry the weights and settings, not the runner's locks or cache."""
        state = self.__dict__.copy()
        runner = state.pop("runner")
        state["_runner_state"] = (runner.settings, runner.linear_kernel)
        return state

    def __setstate__(self, state: dict) -> None:
        settings, linear_kernel = state.pop("_runner_state")
        super().__setstate__(state)
        self.runner = PagedModelRunner(self, settings)
        self.runner.linear_kernel = linear_kernel  # the copied layers already run on it

    def configure_cache(self, block_size: int = 32, num_blocks: int | None = None,
                        kv_cache_memory: int | None = None, backend: str | None = None) -> None:
        """Set the KV pool's geometry; takes effect (with an empty cache) at the next forward."""
        self.runner.configure(CacheSettings(block_size, num_blocks, kv_cache_memory, backend))

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
        settings = CacheSettings(block_size, num_blocks, kv_cache_memory, backend)  # checked before loading
        if pretrained_model_name_or_path is None:
            from trellis.models.embedded import embedded_model_dir

            pretrained_model_name_or_path = embedded_model_dir()
        if kwargs.get("config") is None:
            kwargs["config"] = load_llama_config(pretrained_model_name_or_path, kwargs)
        kwargs.setdefault("attn_implementation", ATTN_IMPLEMENTATION)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model.runner.configure(settings)
        if "device_map" not in kwargs:
            model.to(resolve_device(device))
        model.attention_backend()  # load (or build) the kernels now rather than in the first request
        model.set_linear_kernel(linear_kernel or model.linear_kernel)  # also lays out the loaded weights
        return model.eval()

    def set_linear_kernel(self, kind: str) -> int:
        """What runs the linear layers in CPU fp32 inference (elsewhere it is always ``F.linear``):
        ``"blas"`` (transformers' path), ``"onednn"`` (the default on x86: faster, no extra memory;
        the weights are stored input-major) or ``"packed"`` (oneDNN over a second, prepacked copy
        of the weights). See ``trellis.runner.cpu_linear``. Returns the number of layers that
        changed kind. The KV cache starts empty afterwards: its K/V were computed by the other
        matmuls."""
        return self.runner.set_linear_kernel(kind)

    @property
    def linear_kernel(self) -> str:
        return self.runner.linear_kernel

    def attention_backend(self) -> str:
        """The kernels this model's attention runs on: the configured backend, else the fastest for its device."""
        return self.runner.attention_backend()

    # --- the KV cache ----------------------------------------------------------------------

    @property
    def prefix_cache(self) -> KVCacheManager:
        """The paged KV cache. Rebuilt empty whenever the K/V it holds would be stale: a new
        device, dtype or linear kernel, weights changed in place or replaced (``load_state_dict``,
        edits), or another PEFT adapter state. Handles (``past_key_values``) of the old cache are refused."""
        return self.runner.prefix_cache

    def save_prefix_cache(self, path: str | os.PathLike) -> int:
        """Save every cached prefix (tree + K/V) to a safetensors file; returns the blocks saved."""
        with self.runner.lock:
            return save_prefix_cache(self.prefix_cache, path, weights_fingerprint(self))

    def load_prefix_cache(self, path: str | os.PathLike) -> int:
        """Add the prefixes of a file written by ``save_prefix_cache`` for these same weights, dtype
        and block size; anything else is refused with ``PrefixCacheFileError``, changing nothing."""
        with self.runner.lock:
            return load_prefix_cache(self.prefix_cache, path, weights_fingerprint(self))

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
        runner = self.runner
        with runner.lock:
            manager = runner.prefix_cache
            cache = past_key_values if past_key_values is not None else PagedKVCache(manager)
            if cache.manager is not manager:
                raise RuntimeError("this past_key_values belongs to an earlier KV cache (the model's device, dtype, weights "
                                   "or cache settings changed since); start a new generation")
            num_cols = input_ids.shape[1]
            real = self._padding_mask(input_ids, attention_mask)  # [B, S] bool, None if nothing is padding
            keep_cols = self._logit_columns(logits_to_keep, num_cols, input_ids.device)  # [K]
            rows = input_ids.tolist() if real is None else [row[mask].tolist() for row, mask in zip(input_ids, real)]
            runner.check_token_ids(rows)
            fresh = cache.is_empty
            past = [0] * len(rows) if fresh else [len(seq.token_ids) for seq in cache.seqs]
            runner.check_positions(max((p + len(r) for p, r in zip(past, rows)), default=0))
            reusable = None
            if fresh:
                # Reuse at most the real tokens before the first column whose logits are wanted.
                first_kept = int(keep_cols.min()) if len(keep_cols) else num_cols
                reusable = [first_kept] * len(rows) if real is None else real[:, :first_kept].sum(1).tolist()
            hidden, batch = runner.forward_rows(manager, cache.seqs, rows, reusable, **kwargs)
            skipped = torch.tensor([s.num_prefix_hit if fresh else 0 for s in cache.seqs], device=input_ids.device)
            cache.seen_columns += num_cols
            logits = runner.select_logits(hidden, batch, real, keep_cols, skipped)
            if not use_cache:
                cache.release()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_ARG: cache if use_cache else None})

    @staticmethod
    def _padding_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Which tokens are real ``[B, S]``; None when all are (the common case, given fast paths)."""
        if attention_mask is None:
            return None
        real = attention_mask[:, -input_ids.shape[1]:].bool()
        return None if real.all() else real

    @staticmethod
    def _logit_columns(logits_to_keep: int | torch.Tensor, num_cols: int, device: torch.device) -> torch.Tensor:
        if isinstance(logits_to_keep, torch.Tensor):
            return logits_to_keep.to(device=device, dtype=torch.long).flatten()
        keep = num_cols if logits_to_keep == 0 else min(logits_to_keep, num_cols)
        return torch.arange(num_cols - keep, num_cols, device=device)

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
        with self.runner.lock:
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
        self.runner.check_positions(longest + max_new)

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
        from trellis.models.generate_batch import generate_batch

        return generate_batch(self, inputs, generation_config, continuous_batching_config, record_timestamps,
                              progress_bar, **kwargs)
