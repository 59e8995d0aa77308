"""``TrellisLlama``: ``LlamaForCausalLM`` with paged attention over a radix prefix cache.

A thin Hugging Face façade over ``PagedModelRunner`` (``model.runner``): ``forward`` and
``generate`` take transformers' arguments, the runner packs the uncomputed tokens of each batch
row into one sequence and runs the unchanged Llama decoder over the paged KV cache. A fresh
prompt first takes its longest cached prefix from the radix tree, so only the suffix runs.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from trellis.cache.manager import KVCacheManager
from trellis.cache.persist import load_prefix_cache, model_fingerprint, save_prefix_cache
from trellis.models.gguf_quantized import check_activation_dtype, keep_gguf_quantized, quantized_gguf
from trellis.models.gguf_reading import gguf_parsed_once
from trellis.models.loading import (
    check_full_attention,
    check_one_device,
    hardware_identity,
    load_llama_config,
    resolve_device,
)
from trellis.models.paged_cache import CACHE_ARG, PagedKVCache, take_cache_argument
from trellis.runner import ATTN_IMPLEMENTATION, CacheSettings, PagedModelRunner
from trellis.runner.cpu_linear import check_linear_kernel, rounding_identity
from trellis.runner.quantized_linear import QuantizedLinear
from trellis.runner.rope import dynamic_rope
from trellis.runner.weights_watcher import module_identity


class TrellisLlama(LlamaForCausalLM):
    """A drop-in ``LlamaForCausalLM`` whose successive calls reuse cached prompt prefixes.

    ``model.prefix_cache`` is the paged KV cache (``stats()``, ``reset()``); it is created on
    first use for the model's device and dtype, and rebuilt (empty) if either changes.
    ``model.runner`` runs the model over it (the engine and the eval scorers use it).
    """

    def __init__(self, config, block_size: int = 32, num_blocks: int | None = None,
                 kv_cache_memory: int | None = None, backend: str | None = None) -> None:
        check_full_attention(config)
        super().__init__(config)
        self.runner = PagedModelRunner(self, CacheSettings(block_size, num_blocks, kv_cache_memory, backend))
        self.runner.follow_dtype()  # from_pretrained: the dtype it loads
        # Input-major weights (the oneDNN kernel's layout) are transposed views: a state dict for
        # others to save or load (safetensors refuses non-contiguous tensors) gets plain copies.
        self._register_state_dict_hook(_contiguous_state_dict)

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, *args, **kwargs) -> str:
        """However the model is built (``TrellisLlama(config)``, ``_from_config``, ``from_pretrained``),
        it runs paged attention unless another implementation is asked for by name."""
        return super()._check_and_adjust_attn_implementation(attn_implementation or ATTN_IMPLEMENTATION, *args, **kwargs)

    def __getstate__(self) -> dict:
        """Copies and pickles carry the weights and settings, not the runner's locks or cache."""
        state = self.__dict__.copy()
        runner = state.pop("runner")
        state["_runner_state"] = (runner.settings, runner.linear_kernel, runner.linear_kernel_chosen)
        return state

    def __setstate__(self, state: dict) -> None:
        settings, linear_kernel, chosen = state.pop("_runner_state")
        super().__setstate__(state)
        self.runner = PagedModelRunner(self, settings)
        # the copied layers already run on it
        self.runner.linear_kernel, self.runner.linear_kernel_chosen = linear_kernel, chosen

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.bfloat16()``, ``.float()``, ...: the linear kernel follows the new dtype
        unless the user chose one (``set_linear_kernel``), and the weights take its layout. A dtype
        that layers kept quantized cannot run on, or a grid's new dtype or device (its stages keep
        theirs), is refused before anything is converted. It waits for another thread's call in
        progress (the runner's lock), which ends on the weights it began with."""
        if "runner" not in self.__dict__:  # while transformers builds the model
            return super()._apply(fn, recurse)
        with self.runner.lock:
            if any(isinstance(m, QuantizedLinear) for m in self.modules()):
                check_activation_dtype(fn(torch.empty(0, dtype=self.dtype, device=self.device)).dtype)  # fn's dtype
            self.runner.check_conversion(fn)
            super()._apply(fn, recurse)
            self.runner.follow_dtype()
        return self

    def configure_cache(self, block_size: int = 32, num_blocks: int | None = None,
                        kv_cache_memory: int | None = None, backend: str | None = None) -> None:
        """Set the KV pool's geometry; takes effect (with an empty cache) at the next forward."""
        self.runner.configure(CacheSettings(block_size, num_blocks, kv_cache_memory, backend))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, block_size: int = 32,
                        num_blocks: int | None = None, kv_cache_memory: int | None = None,
                        backend: str | None = None, device: str | torch.device = "auto",
                        linear_kernel: str | None = None, keep_quantized: bool = False,
                        q8_activations: bool = False, **kwargs):
        """Load like ``LlamaForCausalLM.from_pretrained`` (local dirs, hub ids, ``gguf_file=``, ``dtype=``).

        With no path, loads the embedded SmolLM2-135M-Instruct. ``device="auto"`` picks CUDA,
        then MPS, then CPU (ignored when ``device_map`` is given; a map over several devices, or to
        disk, is refused: the KV cache lives on one device). ``linear_kernel``: see
        ``set_linear_kernel()``; by default the fastest for the CPU and the loaded dtype (listed
        there), without the packed copy, and with a warning, where it would take more than half the
        free memory.
        ``keep_quantized=True`` keeps the
        GGUF's Q8_0 / Q4_0 / Q4_1 linear weights quantized and runs them on Trellis' kernels; with
        no path, the embedded model's (see ``trellis.models.gguf_quantized``). With it,
        ``q8_activations=True`` rounds the inputs of those layers to 8-bit blocks, as llama.cpp's
        CPU matmuls do, and multiplies integers: faster on CPUs without AVX-512, with llama.cpp's
        numerics rather than transformers' (docs/quantized.md).
        """
        settings = CacheSettings(block_size, num_blocks, kv_cache_memory, backend)  # checked before loading
        if not isinstance(keep_quantized, bool):  # a string "no" would be true
            raise TypeError(f"keep_quantized must be True or False, got {keep_quantized!r}")
        if not isinstance(q8_activations, bool):
            raise TypeError(f"q8_activations must be True or False, got {q8_activations!r}")
        if q8_activations and not keep_quantized:
            raise ValueError("q8_activations=True rounds the inputs of layers kept quantized: pass keep_quantized=True")
        if linear_kernel is not None:
            check_linear_kernel(linear_kernel)
        target = None if "device_map" in kwargs else resolve_device(device)
        if isinstance(kwargs.get("device_map"), Mapping):  # refused before loading; "auto" & co. once placed
            check_one_device(kwargs["device_map"])
        quantized_from = quantized_gguf(pretrained_model_name_or_path, kwargs) if keep_quantized else None
        if pretrained_model_name_or_path is None and kwargs.get("state_dict") is None:
            from trellis.models.embedded import embedded_model_dir

            pretrained_model_name_or_path = embedded_model_dir()
        reads_gguf = kwargs.get("gguf_file") is not None or quantized_from is not None
        with gguf_parsed_once() if reads_gguf else contextlib.nullcontext():  # (config, weights, blocks)
            if kwargs.get("config") is None:
                kwargs["config"] = load_llama_config(pretrained_model_name_or_path, kwargs)
            wants_info = kwargs.pop("output_loading_info", False)
            try:
                model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                                      output_loading_info=True, **kwargs)
            except SafetensorError as exc:  # a damaged checkpoint: an OSError, as a missing file is
                raise OSError(f"cannot read the weights in {pretrained_model_name_or_path}: {exc}") from exc
            except (OSError, ValueError):
                raise
            except Exception as exc:  # a GGUF whose tensors disagree with its metadata: transformers' RuntimeError
                if kwargs.get("gguf_file") is None:
                    raise
                raise ValueError(f"cannot load the GGUF file {kwargs['gguf_file']} of {pretrained_model_name_or_path} "
                                 f"(its tensors do not fit the model its metadata describes): {exc}") from exc
            if kwargs.get("state_dict") is None:  # a caller's own state dict may leave weights out (a grid stage's)
                check_weights_loaded(pretrained_model_name_or_path, info)
            check_one_device(getattr(model, "hf_device_map", {}))  # set by accelerate where it placed modules apart
            if quantized_from is not None:
                keep_gguf_quantized(model, quantized_from, q8_activations)
        model.runner.configure(settings)
        if target is not None:
            model.to(target)
        # Load (or build) the kernels, or refuse ones that cannot run (q8_activations off the C++ CPU
        # kernels too): now, not in a request.
        model.runner.batch_invariant(model.attention_backend())
        model.runner.choose_linear_kernel(linear_kernel)  # also lays out the loaded weights
        model.eval()
        return (model, info) if wants_info else model

    def set_linear_kernel(self, kind: str) -> int:
        """What runs the linear layers in CPU fp32 and bf16 inference (elsewhere it is always
        ``F.linear``): ``"blas"`` (transformers' path; the fp32 default on Intel CPUs without an
        AVX-512 build), ``"onednn"`` (no extra memory; fp32 weights stored input-major on Intel;
        the fp32 default on other x86 CPUs without an AVX-512 build) or ``"packed"`` (a second copy
        of the weights, oneDNN's prepacked layout or Trellis' panels; the default on x86 CPUs with
        AVX-512 in fp32 (with the C++ kernels built) and bf16; without AVX-512 bf16 runs ``F.linear`` whatever the kind). See
        ``trellis.runner.cpu_linear``. A kind set here is kept when the model changes dtype; without
        one, the kind follows the dtype (``.to(torch.bfloat16)`` moves an fp32 model to bf16's
        default). Returns the number of layers that changed kind. The KV cache
        starts empty afterwards: its K/V were computed by the other matmuls."""
        return self.runner.set_linear_kernel(kind)

    @property
    def linear_kernel(self) -> str:
        return self.runner.linear_kernel

    def attention_backend(self) -> str:
        """The kernels this model's attention runs on: the configured backend, else the fastest for its device."""
        return self.runner.attention_backend()

    def resize_token_embeddings(self, *args, **kwargs):
        """transformers' ``resize_token_embeddings``, refused before it changes anything where the LM
        head is kept quantized: it resizes the embedding first, then finds no ``weight`` to resize."""
        kept_quantized = isinstance(self.get_output_embeddings(), QuantizedLinear)
        if kept_quantized:
            raise ValueError("resize_token_embeddings cannot resize an LM head kept quantized (keep_quantized=True "
                             "holds it as GGUF blocks): load the model without keep_quantized to resize it")
        return super().resize_token_embeddings(*args, **kwargs)

    # --- the KV cache ----------------------------------------------------------------------

    @property
    def prefix_cache(self) -> KVCacheManager:
        """The paged KV cache. Rebuilt empty whenever the K/V it holds would be stale: a new
        device, dtype or linear kernel, weights changed in place or replaced (``load_state_dict``,
        edits), or another PEFT adapter state. Handles (``past_key_values``) of the old cache are refused."""
        return self.runner.prefix_cache

    def save_prefix_cache(self, path: str | os.PathLike) -> int:
        """Save every cached prefix and tail (tree + K/V) to a safetensors file; returns the blocks saved."""
        self._check_prefix_files()
        with self.runner.lock:
            return save_prefix_cache(self.prefix_cache, path, self._prefix_cache_fingerprint())

    def _check_prefix_files(self) -> None:
        if not self.runner.holds_every_layer:
            raise ValueError("save_prefix_cache and load_prefix_cache are not served by a grid: each stage's pool "
                             "holds its own layers' K/V, and a file of the coordinator's would hold none of theirs")

    def load_prefix_cache(self, path: str | os.PathLike) -> int:
        """Add the prefixes of a file written by ``save_prefix_cache`` for this same computation:
        the same weights and buffers (every byte), K/V-relevant config, dtype, attention backend,
        linear kernel (with its layout and the decode rows it streams: ``cpu_linear.rounding_identity``),
        hardware (``loading.hardware_identity``: the kind of CPU, the GPU) and block size. Anything
        else, or a damaged or inconsistent file, is refused with ``PrefixCacheFileError``, changing
        nothing."""
        self._check_prefix_files()
        with self.runner.lock:
            return load_prefix_cache(self.prefix_cache, path, self._prefix_cache_fingerprint(), self.config.vocab_size)

    def _prefix_cache_fingerprint(self) -> dict[str, str]:
        # Every config field that changes K/V; rope_theta / rope_scaling are transformers 4's rope_parameters.
        fields = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                  "attention_bias", "mlp_bias", "pretraining_tp", "rope_parameters", "rope_theta", "rope_scaling",
                  "max_position_embeddings")  # the last feeds RoPE scaling (dynamic, YaRN, LongRoPE)
        config = {name: getattr(self.config, name, None) for name in fields}
        # Attention's rounding reaches the K/V of every later layer, through the hidden states.
        config["attention_backend"] = self.runner.attention_backend()
        self.prefix_cache  # noqa: B018 -- brings the watcher's view of the adapters up to date
        adapters = repr(self.runner.weights_watcher.adapter_state())  # which adapters run, and their scales
        kernel = self.linear_kernel
        if self.device.type == "cpu":  # where the kinds' layouts and the streamed decode rows apply
            kernel = rounding_identity(kernel, self.dtype)
        return model_fingerprint(self, {**config, "dtype": str(self.dtype)}, kernel, adapters=adapters,
                                 hardware=hardware_identity(self.device), modules=module_identity(self))

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
        cache: PagedKVCache | None = None,  # transformers 5.24's name for past_key_values, named here:
        **kwargs,  # generate() checks its arguments against forward's names where a wrapper hides them (PEFT)
    ) -> CausalLMOutputWithPast | tuple:
        """As ``LlamaForCausalLM.forward``, over the paged cache.

        Positions count each row's real tokens (padding takes none), as ``generate()`` does;
        other ``position_ids`` are honoured. Logits and hidden states at padded positions are
        zero. A fresh prompt reuses its cached prefix up to the first position whose logits are
        asked for (``logits_to_keep``; 0 means all of them), or none of it when every position's
        hidden states are asked for, the positions are the caller's, the input is
        ``inputs_embeds``, or the forward records gradients (training) or drops activations
        (training mode with dropout): those sessions compute every token and, except for a forward
        that records gradients without dropout, are never shared with later prompts.
        """
        past_key_values = take_cache_argument(past_key_values, cache, kwargs)
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **{CACHE_ARG: past_key_values}, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        output_attentions = kwargs.pop("output_attentions", None)
        if self.config.output_attentions if output_attentions is None else output_attentions:
            raise ValueError("TrellisLlama's paged attention kernels never form the attention weights: "
                             "output_attentions is not supported (load the model with attn_implementation='eager')")
        inputs = self._check_inputs(input_ids, inputs_embeds, attention_mask, past_key_values)
        _refuse_adapters_per_row(self.runner.weights_watcher.adapter_layers)
        num_rows, num_cols = inputs.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and any(getattr(m, "gradient_checkpointing", False) for m in self.modules()):
            use_cache = False  # as transformers: checkpointed layers run twice, a cache would see them twice
        runner = self.runner
        with runner.lock:
            manager = runner.prefix_cache
            cache = past_key_values if past_key_values is not None else PagedKVCache(manager)
            if cache.manager is not manager:
                raise RuntimeError("this past_key_values belongs to another KV cache: another model's, or this model's "
                                   "before it was rebuilt (its device, dtype, weights or cache settings changed since); "
                                   "start a new generation")
            if cache.released:
                raise ValueError("this past_key_values was released (release() ended its sessions); start a new "
                                 "generation")
            num_layers = min(self.config.num_hidden_layers, len(self.model.layers))  # what this forward runs
            if not cache.is_empty and num_layers > cache.num_layers:
                raise ValueError(f"this past_key_values was computed by the first {cache.num_layers} decoder layers "
                                 "(config.num_hidden_layers was lower, as assistant_early_exit sets it for its drafts): "
                                 f"the K/V of the other layers were never computed, so {num_layers} layers cannot "
                                 "continue it; start a new generation")
            cache.check_past_mask(attention_mask, num_cols)
            real = self._padding_mask(attention_mask, num_cols)  # [B, S] bool, None if nothing is padding
            _check_labels_after_padding(labels, real, kwargs.get("shift_labels"), kwargs.get("ignore_index", -100))
            keep_cols, keep_mask = self._logit_columns(logits_to_keep, num_rows, num_cols, inputs.device)  # [B, K]
            if inputs_embeds is None:
                rows = input_ids.tolist() if real is None else [row[mask].tolist() for row, mask in zip(input_ids, real)]
                runner.check_token_ids(rows)
                embeds = None
            else:  # no token ids: the sessions count their tokens with a placeholder id and are never shared
                counts = [num_cols] * num_rows if real is None else real.sum(1).tolist()
                rows = [[-1] * n for n in counts]
                embeds = inputs_embeds.flatten(0, 1) if real is None else inputs_embeds[real]  # [T, H], packed
            fresh = cache.is_empty
            past = [0] * num_rows if fresh else [len(seq.token_ids) for seq in cache.seqs]
            runner.check_positions(max((p + n for p, n in zip(past, self._kept_tokens(rows, real, cache))), default=0))
            positions = self._caller_positions(position_ids, real, past, num_rows, num_cols)
            if positions is not None:
                runner.check_caller_positions(positions)
            reusable = None
            if fresh:
                # Reuse at most the real tokens before the first column whose outputs are wanted.
                first_kept = 0 if output_hidden_states else int(keep_cols.min()) if keep_cols.numel() else num_cols
                reusable = [first_kept] * num_rows if real is None else real[:, :first_kept].sum(1).tolist()
            step = runner.forward_rows(manager, cache.seqs, rows, reusable, positions=positions, inputs_embeds=embeds,
                                       output_hidden_states=output_hidden_states, **kwargs)
            cache.num_layers = num_layers if fresh else min(cache.num_layers, num_layers)
            skipped = torch.tensor([s.num_prefix_hit if fresh else 0 for s in cache.seqs], device=inputs.device)
            cache.record_columns(real, num_rows, num_cols)
            logits = runner.unpack(step.hidden, step.batch, real, keep_cols, skipped, runner.logits)
            if keep_mask is not None:
                logits = logits[keep_mask]  # [N, V], row by row, as transformers flattens a mask's positions
            hidden_states = step.hidden_states  # [1, T, H] each: one unpadded row's own, on the autograd graph
            if hidden_states is not None and (num_rows > 1 or real is not None):
                every_col = torch.arange(num_cols, device=inputs.device).expand(num_rows, -1)
                hidden_states = tuple(runner.unpack(h[0], step.batch, real, every_col, skipped) for h in hidden_states)
            if not use_cache and past_key_values is None:  # a caller's cache goes on, as transformers' would
                cache.release()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states,
                                        **{CACHE_ARG: cache if use_cache else None})
        return output if (self.config.return_dict if return_dict is None else return_dict) else output.to_tuple()

    @staticmethod
    def _check_inputs(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                      attention_mask: torch.Tensor | None, cache: object) -> torch.Tensor:
        """The input (token ids ``[B, S]`` or embeddings ``[B, S, H]``), refusing what cannot be served."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is not None and not isinstance(cache, PagedKVCache):
            raise TypeError(f"past_key_values must be a PagedKVCache from this model, got {type(cache).__name__}")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        elif inputs_embeds.dim() != 3:
            raise ValueError(f"inputs_embeds must be [batch, seq_len, hidden], got shape {tuple(inputs_embeds.shape)}")
        inputs = input_ids if input_ids is not None else inputs_embeds
        if inputs.shape[0] == 0:
            raise ValueError(f"the batch is empty: input of shape {tuple(inputs.shape)}")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"custom {attention_mask.dim()}D attention masks are not supported: the paged attention is "
                             "causal within each row; pass a 2D padding mask [batch, seq_len]")
        if attention_mask is not None and (attention_mask.shape[0] != inputs.shape[0]
                                           or attention_mask.shape[1] < inputs.shape[1]):
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not cover the input of "
                             f"shape {tuple(inputs.shape[:2])}")
        return inputs

    @staticmethod
    def _kept_tokens(rows: list[list[int]], real: torch.Tensor | None, cache: PagedKVCache) -> list[int]:
        """How many of each row's new tokens must fit the model's positions: all of them, but
        those in the columns from which ``generate()`` discards what is computed (drafts past its
        max_length, ``cache.discard_from``)."""
        if cache.discard_from is None:
            return [len(row) for row in rows]
        kept_cols = max(cache.discard_from - cache.seen_columns, 0)
        return [min(len(row), kept_cols) for row in rows] if real is None else real[:, :kept_cols].sum(1).tolist()

    @staticmethod
    def _caller_positions(position_ids: torch.Tensor | None, real: torch.Tensor | None, past: list[int],
                          num_rows: int, num_cols: int) -> list[list[int]] | None:
        """The caller's positions of each row's real tokens, or None where they are Trellis' own
        (each row's real tokens counted on from its past, as ``generate()`` also passes them)."""
        if position_ids is None:
            return None
        if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex:
            raise TypeError(f"position_ids must hold integer positions, got {position_ids.dtype}")
        if position_ids.dim() != 2 or position_ids.shape[1] != num_cols or position_ids.shape[0] not in (1, num_rows):
            raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} do not match the input "
                             f"({num_rows}, {num_cols})")
        given = position_ids.expand(num_rows, num_cols).to("cpu", torch.long)  # [B, S]
        rank = torch.arange(num_cols).expand(num_rows, num_cols) if real is None else real.cpu().long().cumsum(1) - 1
        own = torch.tensor(past)[:, None] + rank  # [B, S]
        mask = torch.ones_like(given, dtype=torch.bool) if real is None else real.cpu()
        if torch.equal(given[mask], own[mask]):
            return None
        return [row[row_mask].tolist() for row, row_mask in zip(given, mask)]

    @staticmethod
    def _padding_mask(attention_mask: torch.Tensor | None, num_cols: int) -> torch.Tensor | None:
        """Which tokens are real ``[B, S]``; None when all are (the common case, given fast paths)."""
        if attention_mask is None:
            return None
        real = attention_mask[:, -num_cols:].bool()
        return None if real.all() else real

    @staticmethod
    def _logit_columns(logits_to_keep: int | torch.Tensor, num_rows: int, num_cols: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The columns ``[B, K]`` whose logits ``logits_to_keep`` asks for, as transformers'
        ``slice_logits_to_keep`` reads it, and for a boolean ``[B, S]`` mask the mask over those
        columns (the logits are then the kept positions', flattened ``[N, V]``), else None."""
        if not isinstance(logits_to_keep, (int, torch.Tensor)):  # (a NumPy int indexes one column in transformers)
            raise TypeError(f"logits_to_keep must be an int or a tensor, got {type(logits_to_keep).__name__} "
                            f"{logits_to_keep!r}: pass int() of a count of last columns, or a tensor of columns")
        if isinstance(logits_to_keep, int):
            # transformers' slice(-k, None): 0 keeps every column, k > 0 the last k, k < 0 all but the first -k.
            return torch.arange(num_cols, device=device)[-logits_to_keep:].expand(num_rows, -1), None
        keep = logits_to_keep.to(device)
        if keep.dtype == torch.bool:
            if keep.shape != (num_rows, num_cols):
                raise ValueError(f"a boolean logits_to_keep must be [batch, seq_len] = ({num_rows}, {num_cols}), "
                                 f"got shape {tuple(keep.shape)}")
            cols = keep.any(0).nonzero().flatten()  # every column some row keeps
            return cols.expand(num_rows, -1), keep[:, cols]
        if keep.dtype.is_floating_point or keep.dtype.is_complex or keep.dim() not in (1, 2) or (
                keep.dim() == 2 and keep.shape[0] != num_rows):
            raise ValueError("logits_to_keep must be an int, a 1-D tensor of columns, a [batch, K] tensor of columns "
                             f"or a [batch, seq_len] boolean mask; got a {keep.dtype} tensor of shape {tuple(keep.shape)}")
        if keep.numel() and not (-num_cols <= int(keep.min()) and int(keep.max()) < num_cols):
            bad = int(keep.min()) if int(keep.min()) < -num_cols else int(keep.max())
            raise ValueError(f"logits_to_keep column {bad} is out of range for an input of {num_cols} columns")
        return (keep.long() % num_cols).expand(num_rows, -1), None

    # --- generation ------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """``LlamaForCausalLM.generate`` over the paged cache; prompts reuse cached prefixes, and
        each finished row's full blocks (prompt and answer) are cached for the next turn."""
        use_cache = self._generation_setting("use_cache", generation_config, kwargs) is not False
        implementation = self._generation_setting("cache_implementation", generation_config, kwargs)
        if implementation is not None and self.config._attn_implementation == ATTN_IMPLEMENTATION and use_cache:
            raise ValueError(f"TrellisLlama keeps its K/V in the paged prefix cache, not in a {implementation!r} cache; "
                             "drop cache_implementation, or load the model with attn_implementation='sdpa'")
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            return super().generate(inputs, generation_config, **kwargs)
        _refuse_virtual_token_caches(self.prepare_inputs_for_generation)
        self._check_generation_inputs(inputs if inputs is not None else kwargs.get("input_ids"),
                                      kwargs.get("attention_mask"), generation_config, kwargs)
        if CACHE_ARG == "cache" and kwargs.get("cache") is not None and kwargs.get("past_key_values") is not None:
            raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")  # generate() would pick one
        given = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        # The whole call holds the lock: transformers' early-exit drafter lowers the layer count for
        # a while, which no other thread's forward may see. The lock of a TrellisLlama assistant (or
        # of the one it wraps: a PEFT model) is taken with it, both in one order: two models drafting
        # for each other from two threads would otherwise each hold its own lock and wait for the other's.
        assistant = _trellis_model_in(kwargs.get("assistant_model"))
        models = [self, *([assistant] if assistant is not None and assistant is not self else [])]
        with contextlib.ExitStack() as locks:
            for model in sorted(models, key=id):
                locks.enter_context(model.runner.lock)
            # Read under the lock: another thread's early-exit draft may have it lowered until then.
            num_layers = self.config.num_hidden_layers
            own = PagedKVCache(self.prefix_cache) if given is None and use_cache else None
            result = None
            try:
                result = super().generate(inputs, generation_config, **kwargs,
                                          **({CACHE_ARG: own} if own is not None else {}))
                return result
            finally:
                self.config.num_hidden_layers = num_layers  # the drafter restores it only when its draft succeeds
                for cache in (own, given):
                    if isinstance(cache, PagedKVCache):
                        cache.discard_from = None
                if own is not None and getattr(result, CACHE_ARG, None) is not own:
                    own.release()

    def _prepare_attention_mask_for_generation(self, inputs_tensor: torch.Tensor, generation_config,
                                               model_kwargs: dict) -> torch.Tensor:
        """The mask ``generate()`` infers when none is given: ``input_ids != pad_token_id`` where the
        pad id occurs in the input and is no EOS id. A row that then ends with padding is refused,
        as an explicit right-padded mask is (``_check_generation_inputs``)."""
        mask = super()._prepare_attention_mask_for_generation(inputs_tensor, generation_config, model_kwargs)
        if self.config._attn_implementation == ATTN_IMPLEMENTATION:
            _refuse_right_padding(mask, f"holds the pad token {generation_config.pad_token_id}, which generate() takes "
                                        "for padding (it infers attention_mask = input_ids != pad_token_id)",
                                  "pass an attention_mask that marks it as a real token")
        return mask

    def _get_candidate_generator(self, generation_config, input_ids: torch.Tensor, inputs_tensor: torch.Tensor,
                                 logits_processor, model_kwargs: dict, *args, **kwargs):
        """transformers' drafter for assisted, prompt-lookup and early-exit decoding, made as its
        loop starts over ``model_kwargs``' cache handle.

        Its drafts may run past the generation's ``max_length`` (prompt lookup copies what follows
        a match, however little room is left) and ``generate()`` discards those columns' logits and
        K/V. The handle is told where the generation ends, so the verifying forward computes them
        as transformers does (RoPE goes on past ``max_position_embeddings``) instead of refusing
        positions the answer never uses; not with dynamic RoPE, which transformers rescales for the
        whole forward when a position passes the limit.

        Refused: a handle that already holds tokens, under a mask with padding. transformers' first
        assisted forward runs the whole input again over the cache, and its mask then no longer
        lines up with the K/V (holes fall on other tokens): not an answer Trellis can give."""
        cache = model_kwargs.get(CACHE_ARG)
        if isinstance(cache, PagedKVCache):
            mask = model_kwargs.get("attention_mask")  # generate() drops an all-ones mask
            if not cache.is_empty and mask is not None and not bool(mask.all()):
                raise ValueError("assisted or prompt-lookup decoding cannot continue a past_key_values over input "
                                 "with padding (zeros in attention_mask, or pad_token_id inside input_ids): "
                                 "transformers runs its first forward over the whole input again and its mask then "
                                 "masks other tokens; continue without drafts, or start from no past_key_values")
            if not dynamic_rope(self):
                # The last kept column's token is never fed back: what a forward computes there is
                # discarded too.
                cache.discard_from = generation_config.max_length - 1
        drafter = super()._get_candidate_generator(generation_config, input_ids, inputs_tensor, logits_processor,
                                                   model_kwargs, *args, **kwargs)
        assistant = getattr(drafter, "assistant_model", None)
        if assistant is not None:
            early_exit = getattr(generation_config, "assistant_early_exit", None)
            drafting = (f"the model's first {early_exit} layers (assistant_early_exit)" if assistant is self and early_exit
                        else "assistant_model")
            drafter.get_candidates = _errors_named_as_the_drafters(drafter.get_candidates, drafting)
        return drafter

    def _generation_setting(self, name: str, generation_config, kwargs: dict):
        """A generation setting as ``generate()`` resolves it: the call's keyword, else the config
        passed (where it sets one), else the model's own ``generation_config``."""
        if name in kwargs:
            return kwargs[name]
        value = getattr(generation_config, name, None)
        return value if value is not None else getattr(self.generation_config, name, None)

    def _check_generation_inputs(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                                 generation_config, kwargs: dict) -> None:
        """Refuse up front a mask that does not fit the prompt (generate() would first derive
        positions from it), right padding (generate() reads each row's next token from its last
        column), and a prompt that its generation length would carry past the model's positions."""
        embeds = kwargs.get("inputs_embeds") if input_ids is None else None
        if input_ids is None and embeds is None:
            return
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"input_ids must be a [batch, seq_len] tensor of token ids, got {type(input_ids).__name__}")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        prompt = input_ids if input_ids is not None else embeds
        if not isinstance(prompt, torch.Tensor) or prompt.dim() < 2:
            return  # inputs_embeds of another shape: the forward names it
        if prompt.shape[1] == 0:
            raise ValueError("the prompt has no tokens: generate() continues a prompt from its last token; pass at "
                             "least one (e.g. the tokenizer's BOS)")
        if attention_mask is not None:
            if attention_mask.shape != prompt.shape[:2]:
                name = "input_ids" if input_ids is not None else "inputs_embeds"
                raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match {name} of shape "
                                 f"{tuple(prompt.shape[:2])}")
            _refuse_right_padding(attention_mask, "the attention_mask marks as padding",
                                  "pad on the left (tokenizer.padding_side = 'left')")
            chunk = self._generation_setting("prefill_chunk_size", generation_config, kwargs)
            padding = int((attention_mask == 0).sum(1).max()) if chunk else 0
            if chunk is not None and 0 < chunk <= padding < prompt.shape[1]:
                # The first chunk would admit a row with no token: the paged cache holds none.
                raise ValueError(f"prefill_chunk_size={chunk}: a row's first chunk is all padding ({padding} padding "
                                 f"columns); use a chunk longer than the padding, or none")
        longest = int(attention_mask.sum(1).max()) if attention_mask is not None else prompt.shape[1]
        max_new = self._generation_setting("max_new_tokens", generation_config, kwargs)
        # The last new token is never fed back: it needs no position.
        if max_new is not None:
            self.runner.check_positions(longest + max_new - 1)
        elif "max_length" in kwargs or generation_config is not None:
            # max_length counts the prompt's columns (embeddings too); only one set for this call (the
            # model's own default may exceed its positions for prompts that stop early)
            self.runner.check_positions(self._generation_setting("max_length", generation_config, kwargs)
                                        - (prompt.shape[1] - longest) - 1)

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


def _trellis_model_in(model: object) -> TrellisLlama | None:
    """The ``TrellisLlama`` that ``model`` is, or wraps (a PEFT model over one); None if neither."""
    if not isinstance(model, torch.nn.Module):
        return None
    return next((m for m in model.modules() if isinstance(m, TrellisLlama)), None)  # (itself first)


def _errors_named_as_the_drafters(get_candidates: Callable[..., Any], drafter: str) -> Callable[..., Any]:
    """A drafter's bound ``get_candidates``, whose errors say they came from ``drafter``
    (``assistant_model``, or the model's first layers): the drafts run the drafter's own
    ``generate()``, and its refusals (a pad token, a prompt too long for it) would otherwise read
    as the main model's. On an error the drafter's cache handle ends its sessions then, not when
    the error's traceback (which holds the handle) is dropped. The method is held weakly: the
    drafter keeps the wrapper, and a cycle would keep the drafter and that handle alive until the
    garbage collector ran."""
    method = weakref.WeakMethod(get_candidates)

    def drafting(*args: Any, **kwargs: Any) -> Any:
        try:
            return method()(*args, **kwargs)
        except Exception as exc:
            exc.add_note(f"(raised by {drafter} while it drafted candidate tokens)")
            cache = getattr(method().__self__, "assistant_kwargs", {}).get(CACHE_ARG)
            if isinstance(cache, PagedKVCache):
                cache.release()
            raise

    return drafting


def _refuse_virtual_token_caches(prepare_inputs: Callable[..., dict]) -> None:
    """Refuse generating under a peft method that feeds the model K/V of virtual tokens (prefix
    tuning, cartridges): ``PeftModel.generate`` points this model's ``prepare_inputs_for_generation``
    at its own, which swaps the cache for one holding those K/V. Trellis computes every K/V it
    attends over from the tokens in its paged cache."""
    config = getattr(getattr(prepare_inputs, "__self__", None), "active_peft_config", None)
    method = getattr(config, "peft_type", None)
    if method in ("PREFIX_TUNING", "CARTRIDGE"):  # peft's PeftType is a str enum
        raise TypeError(f"peft's {method.lower().replace('_', ' ')} is not supported: it attends over K/V of "
                        "virtual tokens in a cache of its own, and Trellis keeps every K/V in its paged cache; "
                        "prompt tuning (virtual tokens as input embeddings) and LoRA are supported")


def _refuse_adapters_per_row(adapter_layers: list[torch.nn.Module]) -> None:
    """Refuse peft's ``adapter_names`` (an adapter for each row: ``PeftModel.generate(...,
    adapter_names=[...])`` hooks it into every LoRA layer's forward) beyond one: the runner packs
    every row into one sequence, so peft would find one input for all the names."""
    for layer in adapter_layers:
        for hook in layer._forward_pre_hooks.values():
            names = getattr(hook, "keywords", {}).get("adapter_names")
            if names is not None and len(names) > 1:
                raise ValueError(f"peft's adapter_names={list(names)} (an adapter for each row, beams included) is not "
                                 "supported: Trellis runs a batch's rows as one packed sequence; generate each "
                                 "adapter's rows in a call of their own (set_adapter), one row for adapter_names")


def _refuse_right_padding(attention_mask: torch.Tensor, cause: str, remedy: str) -> None:
    """Refuse a generation whose rows end with padding (``attention_mask`` ``[B, S]``, 0 at
    padding): ``generate()`` continues each row from its last column, whose logits transformers
    computes from the pad token (and warns), while Trellis computes no padding. ``cause`` says why
    the last column is padding, ``remedy`` what to do instead."""
    if bool(((attention_mask[:, -1] == 0) & (attention_mask.sum(1) > 0)).any()):
        raise ValueError(f"generate() would continue a row from its last column, which {cause}: transformers computes "
                         f"that column from the pad token (and warns of right padding), Trellis computes no padding; "
                         f"{remedy}")


def _check_labels_after_padding(labels: torch.Tensor | None, real: torch.Tensor | None,
                                shift_labels: torch.Tensor | None, ignore_index: int) -> None:
    """Refuse a label that the loss would predict from a padding column: transformers' logits
    there are no prediction (a pad attending to itself) and Trellis' are zeros, so the losses would
    differ. The first real token after left padding is the usual case; its label should be
    ``ignore_index``. ``shift_labels`` (the loss's targets, column c predicted from column c)
    replaces ``labels[:, 1:]`` in the loss, and so here."""
    if labels is None or real is None:
        return
    targets, shift = (labels[:, 1:], 1) if shift_labels is None else (shift_labels, 0)
    if targets.shape != real[:, shift:].shape:
        return  # a shape mismatch is the loss function's to name
    from_padding = ~real[:, :real.shape[1] - shift].to(targets.device) & (targets != ignore_index)
    if bool(from_padding.any()):
        row, col = from_padding.nonzero()[0].tolist()
        name = "labels" if shift_labels is None else "shift_labels"
        raise ValueError(f"{name}: row {row}'s label at column {col + shift} would be predicted from padding (column "
                         f"{col}), where the model makes no prediction; set the labels of tokens right after padding "
                         f"to {ignore_index} (the loss's ignore_index; e.g. the first real token of a left-padded row)")


def check_weights_loaded(path: object, info: dict) -> None:
    """Refuse a checkpoint that lacks weights of the model: transformers would leave them random."""
    missing = sorted(info.get("missing_keys") or ())
    if not missing:
        return
    hint = ""
    if any(key.endswith("weight_blocks") for key in info.get("unexpected_keys") or ()):
        hint = (" It holds quantized blocks (saved from a keep_quantized=True model), which transformers cannot "
                "read: load the GGUF with keep_quantized=True instead.")
    raise ValueError(f"{path} lacks {len(missing)} weights of the model (e.g. {', '.join(missing[:3])}); "
                     f"transformers would leave them randomly initialised.{hint}")


def _contiguous_state_dict(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> dict:
    for name, tensor in state_dict.items():
        if not tensor.is_contiguous():
            state_dict[name] = tensor.contiguous()
    return state_dict
