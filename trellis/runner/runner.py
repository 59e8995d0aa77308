"""``PagedModelRunner``: an unchanged transformers Llama run over the paged KV cache, one packed
step at a time.

The runner owns what every caller of the model shares: the KV cache (rebuilt empty whenever its
K/V would be stale), the input checks, packing a step's new tokens into one ``[1, T]`` sequence,
the forward itself (the lean decoder path of ``decoder.py`` where the model is eligible, else
transformers' decoder, whose attention is the registered ``"trellis"`` function reading the
step's ``PagedBatch``; on CUDA, decode steps replayed from graphs of that forward,
``cuda_graphs.py``), picking logits, and the lock that keeps forwards on the shared pool one
at a time. The engine, the eval scorers and the Hugging Face façade
(``TrellisLlama``) all run the model through it.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast

from trellis import ops
from trellis.cache.block_pool import BlockPool, check_block_size
from trellis.cache.interrupts import InterruptDeferringLock
from trellis.cache.manager import KVCacheManager, PagedSequence
from trellis.runner import cpu_linear, cuda_graphs
from trellis.runner.attention import ATTN_IMPLEMENTATION
from trellis.runner.batch import PagedBatch, build_batch
from trellis.runner.decoder import LeanDecoder
from trellis.runner.host_memory import keep_freed_memory
from trellis.runner.huge_pages import place_on_huge_pages
from trellis.runner.quantized_linear import QuantizedLinear
from trellis.runner.rope import dynamic_rope, long_rope
from trellis.runner.weights_watcher import WeightsWatcher, registration_count, watch_registrations
from trellis.utils import head_dim_of, is_positive_int, outside_vocabulary, store_as_ints

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the compiled attention kernels take
LM_HEAD_ROWS = 256  # rows per LM head matmul when scoring many positions: keeps the [rows, vocab] logits small


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
        if self.num_blocks is not None and not is_positive_int(self.num_blocks):
            raise ValueError(f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        if self.kv_cache_memory is not None and not is_positive_int(self.kv_cache_memory):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory!r}")
        if self.backend is not None and self.backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {ops.BACKENDS}")
        store_as_ints(self, ("block_size", "num_blocks", "kv_cache_memory"))


def free_memory(device: torch.device) -> int:
    """Bytes free for weights and KV on ``device``: CUDA's free memory, else available RAM (8 GiB
    where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def default_kv_cache_memory(device: torch.device) -> int:
    """Bytes for the KV pool when the user sets neither ``num_blocks`` nor ``kv_cache_memory``:
    half the free memory of a CUDA device, else a quarter of free RAM, at most 4 GiB."""
    free = free_memory(device)
    return free // 2 if device.type == "cuda" else min(free // 4, 4 << 30)


class PagedModelRunner:
    """Runs ``model`` (a ``LlamaForCausalLM`` loaded with ``attn_implementation="trellis"``)
    over its paged KV cache.

    Thread-safety: hold ``lock`` around any sequence of cache changes and forwards that must not
    interleave with another thread's (it is re-entrant; the methods here take it too).
    """

    pipeline_depth = 1  # steps worth keeping in flight at once (a grid's stages each work on one)
    failure: str | None = None  # why the runner can run nothing more (a grid that lost a stage)
    holds_every_layer = True  # whether this process's pool holds every layer's K/V (not a grid's coordinator)

    def __init__(self, model: LlamaForCausalLM, settings: CacheSettings | None = None) -> None:
        self.model = model
        self.settings = settings or CacheSettings()
        self.linear_kernel = cpu_linear.linear_kernel_of(model.lm_head) or "blas"
        # Whether the user chose ``linear_kernel``; if not, it follows the model's dtype (follow_dtype).
        self.linear_kernel_chosen = False
        self.lock = threading.RLock()
        # Threads asking for the cache together get one and the same. Ctrl-C waits for its hold to
        # end: a KeyboardInterrupt between a `with` body's return and the lock's release (CPython
        # runs that exit outside the statement's handler) would leave it held for good.
        self._cache_lock = InterruptDeferringLock()
        self._manager: KVCacheManager | None = None
        self._manager_key: tuple | None = None  # what the cached K/V were computed with
        self._invariant, self._invariant_key = False, None  # batch_invariant(), and the weights state it read
        self._default_budget: tuple[torch.device, int] | None = None  # (device, bytes): _kv_budget's reading
        self.weights_watcher = WeightsWatcher(model)
        self.lean = LeanDecoder(model, self.checked_weights_state)
        # The lean decoder path (decoder.py) wherever the model is eligible; False runs transformers'
        # decoder forward for every step.
        self.use_lean_decoder = True
        # Decode steps on a GPU replayed from CUDA graphs where they reproduce the step
        # (cuda_graphs.py); False runs every step eagerly.
        self.use_cuda_graphs = True
        self._decode_graphs: cuda_graphs.DecodeGraphs | None = None  # over the current pool
        self._dropout_modules: list[torch.nn.Module] = []  # modules with a dropout rate (drops_out)
        self._dropout_key = -1  # the registration count they were listed at
        self._graphs_modules: tuple | None = None  # the decoder's modules they were made over (``modules_state``)

    # --- settings ----------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def configure(self, settings: CacheSettings) -> None:
        """New pool geometry or kernels; takes effect, with an empty cache, at the next forward. A
        backend that cannot run this model here is refused first, and nothing changes."""
        with self.lock, self._cache_lock:
            old, self.settings = self.settings, settings
            try:
                self.attention_backend()
            except BaseException:
                self.settings = old
                raise
            self._manager, self._decode_graphs = None, None
            self._default_budget = None

    def set_linear_kernel(self, kind: str, chosen: bool = True) -> int:
        """What runs the linear layers in CPU fp32 and bf16 inference (see ``cpu_linear``); the
        cache starts empty afterwards (its K/V came from other matmuls). Returns the layers that
        changed kind. ``chosen``: the user's choice, kept when the model changes dtype; else the
        default, which ``follow_dtype`` replaces with the new dtype's. The CPU weights are then
        prepared for it (``_prepare_cpu_weights``)."""
        with self.lock:
            changed = cpu_linear.set_linear_kernel(self.model, kind)
            self._prepare_cpu_weights()
            self.linear_kernel, self.linear_kernel_chosen = kind, chosen
            return changed

    def _prepare_cpu_weights(self) -> None:
        """Lay the CPU weights out for serving, so that no request pays for it: onto huge pages
        (``huge_pages``), then the packed copies made from them (``cpu_linear.make_packed``; a copy
        follows its weight's storage, so the weights move first) and placed too."""
        if self.device.type == "cpu":
            keep_freed_memory()  # (process-wide, once: a prefill's activations then reuse mapped pages)
        place_on_huge_pages(chain(self.model.parameters(), self.model.buffers()))
        place_on_huge_pages(cpu_linear.make_packed(self.model))

    def check_conversion(self, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Before ``_apply`` converts the model's tensors with ``convert`` (``.to()``, ``.half()``, ...):
        raises where this runner cannot follow (a grid's); a model in one process can go anywhere."""

    def follow_dtype(self) -> None:
        """After the model's dtype may have changed (``.to()``, loading): the default kind for that
        dtype, unless the user chose one (fp32's default is not always bf16's), and the
        weights laid out as the kind reads them in that dtype."""
        chosen = self.linear_kernel_chosen
        kind = self.linear_kernel if chosen else self._default_linear_kernel()
        self.set_linear_kernel(kind, chosen=chosen)

    def _default_linear_kernel(self) -> str:
        """``cpu_linear.default_linear_kernel`` for the model's dtype, unless that is ``"packed"`` and
        its copy of the weights would take more than half the free memory (a model of billions of
        parameters in fp32): then the fastest kind without a copy, and a warning says so."""
        dtype = self.model.dtype
        kind = cpu_linear.default_linear_kernel(dtype)
        if kind != "packed" or self.device.type != "cpu":
            return kind
        copy, free = cpu_linear.packed_copy_bytes(self.model), free_memory(self.device)
        if copy <= free // 2:
            return kind
        unpacked = cpu_linear.unpacked_linear_kernel(dtype)
        warnings.warn(f"trellis: the 'packed' linear kernel would add a {copy / 2**30:.1f} GiB copy of the weights, "
                      f"more than half of the {free / 2**30:.1f} GiB of free memory; running {unpacked!r}, which adds "
                      f"none (slower; linear_kernel='packed' keeps the copy)", stacklevel=2)
        return unpacked

    def choose_linear_kernel(self, kind: str | None) -> None:
        """After loading: ``kind`` where the caller names one (a choice, kept when the dtype
        changes), else ``follow_dtype``; either way the loaded weights take the kind's layout."""
        if kind is None:
            self.follow_dtype()
        else:
            self.set_linear_kernel(kind)

    def attention_backend(self) -> str:
        """The kernels attention runs on: the configured backend, else the fastest for the device
        and dtype (the compiled kernels take fp32, fp16 and bf16; the reference any float) and for
        the model's head size (Triton's kernels take powers of two from 16 to 256)."""
        backend, head_dim = self.settings.backend, head_dim_of(self.config)
        if backend is None:
            if self.model.dtype not in _KERNEL_DTYPES:
                return "reference"
            backend = ops.default_backend(self.device)
            if not (ops.fits_head_dim(backend, head_dim) or ops.forced_backend()):
                return "reference"
        elif backend != "reference" and self.model.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"the {backend} kernels take float32, float16 and bfloat16, not "
                             f"{str(self.model.dtype).removeprefix('torch.')}: use backend='reference'")
        if not ops.fits_head_dim(backend, head_dim):
            raise ValueError(f"the {backend} kernels need a power-of-two head_dim from 16 to 256, this model's is "
                             f"{head_dim}: use backend='reference'")
        return ops.resolve_backend(backend, self.device)  # refuses one that cannot run on this device

    # --- the KV cache ------------------------------------------------------------------------

    @property
    def prefix_cache(self) -> KVCacheManager:
        """The paged KV cache. Rebuilt empty whenever the K/V it holds would be stale: a new
        device, dtype, linear kernel or cache settings; a parameter or buffer (RoPE's
        ``inv_freq``) changed in place, replaced or given another storage; a module added,
        moved or removed; a hook, instance forward or module class changed (``ModelStructure``);
        an RMSNorm eps, attention or RoPE scale or config field changed; another PEFT
        adapter state (active, enabled, merged, scale). Sessions of the old cache can no longer run.

        Edits it cannot see, because they bypass the tensor's version counter: in-place writes
        through ``.data`` (``p.data.mul_(2)``, ``p.data.copy_(w)``), NumPy (``p.detach().numpy()``),
        DLPack or a raw pointer. After one, call ``prefix_cache.reset()``: it forgets the cached
        prefixes and every copy derived from the weights (the packed linear kernel's). See
        ``weights_watcher``.
        """
        with self._cache_lock:
            state = self.weights_watcher.state()
            # peft unmerges a disabled but merged adapter inside its layer's next forward: the weights
            # would change part-way through this forward, after its key, and its sessions be refused
            # at the next one. Unmerged now, as that forward would unmerge them.
            merged = [layer for layer in self.weights_watcher.adapter_layers
                      if layer.disable_adapters and getattr(layer, "merged", False)]
            for layer in merged:
                layer.unmerge()
            if merged:
                state = self.weights_watcher.state()
            # (The watcher's state last: checked_weights_state reads it there.)
            key = (self.device, self.model.dtype, self.linear_kernel, state)
            if self._manager is None or key != self._manager_key:
                # peft merges adapters into their base weights through ``.data``, unseen by the
                # packed copies' own key; merging changes the key. (Repacking every layer instead
                # would take seconds on SmolLM2.)
                for layer in self.weights_watcher.adapter_layers:
                    cpu_linear.drop_packed(layer)
                self._check_kv_dtype()
                self._decode_graphs = None  # they read the old pool (and the old weights)
                self._manager, self._manager_key = KVCacheManager(self._new_pool(), self.lock), key
                self._manager.on_reset.append(self._forget_derived_state)
            return self._manager

    @property
    def built_cache(self) -> KVCacheManager | None:
        """The cache as last built, without the weights check of ``prefix_cache`` (which may rebuild
        it): what a finalizer may touch. None before the first."""
        return self._manager

    def batch_invariant(self, backend: str) -> bool:
        """Whether a forward must compute each token the same, bit for bit, whatever else it holds:
        where a layer rounds its input to 8 bits (``QuantizedLinear.q8_activations``), a last-bit
        difference (a token's attention summed in another order in a decode step than in a
        prefill) can tip a rounding, and a cache hit would change an answer. Its linear layers
        compute a row alike in any batch; attention then runs a batch-invariant plan, which only
        the C++ backend makes (``backend``: the one attention runs on, ``attention_backend()``).
        Read again when the weights watcher's state (which watches the setting) changes."""
        state = self.checked_weights_state()
        if state != self._invariant_key:
            self._invariant = any(isinstance(m, QuantizedLinear) and m.q8_activations for m in self.model.modules())
            self._invariant_key = state
        if self._invariant and backend != "cpp":
            raise ValueError(f"layers that round their inputs to 8 bits (q8_activations) run on the C++ CPU kernels "
                             f"only; this model runs attention on {backend!r}")
        return self._invariant

    def checked_weights_state(self) -> int:
        """The weights watcher's state as ``prefix_cache`` last checked it: a forward runs on the
        manager that check handed out, so its K/V and the lean decoder's listed weights
        (``LeanDecoder._cpp_loop_arguments``) hold for the same weights. Before any check, a fresh one.
        (Reading the state again costs 0.2-0.5 ms a SmolLM2 step, with the caches cold after a forward.)"""
        key = self._manager_key
        return key[-1] if key is not None else self.weights_watcher.state()

    def _check_kv_dtype(self) -> None:
        """The pool keeps K/V in the model's dtype (transformers' ``model.dtype``: its first
        parameter's, the embedding's on the first stage); refuse a model whose K/V projections
        compute another. (Weights of a byte, fp8 ones, compute in their layer's activation dtype.)"""
        dtype = self.model.dtype
        for layer in self.model.model.layers:
            attn = getattr(layer, "self_attn", None)
            for projection in (getattr(attn, "k_proj", None), getattr(attn, "v_proj", None)):
                weight = getattr(projection, "weight", None)
                if (isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.element_size() > 1
                        and weight.dtype != dtype):
                    raise ValueError(f"the decoder layers compute K/V in {weight.dtype}, but the model's dtype (its "
                                     f"first parameter's) is {dtype}, which the KV cache takes: convert the whole "
                                     f"model (model.to({weight.dtype}))")

    def _forget_derived_state(self) -> None:
        """What ``prefix_cache.reset()`` forgets besides the cached prefixes: the packed weight
        copies (made afresh from the weights as they are), and the watcher's listing of the model
        (taken afresh at the next key)."""
        cpu_linear.drop_packed(self.model)
        self._prepare_cpu_weights()
        self.weights_watcher.forget()
        self._decode_graphs = None

    def pool_geometry(self) -> tuple[int, int, int]:
        """The pool's layers, KV heads and head dim. Every decoder layer, whatever
        ``config.num_hidden_layers`` says now: a forward runs the first that many (an early-exit
        drafter lowers it for a while), never more than the model has."""
        return len(self.model.model.layers), self.config.num_key_value_heads, head_dim_of(self.config)

    def layer_ids(self) -> list[int]:
        """The index each decoder layer's attention keeps its K/V under (its ``layer_idx``, as
        transformers' caches take it): the layer's position as built, which it keeps when layers
        before it are deleted (``del model.model.layers[i]``)."""
        ids = [getattr(getattr(layer, "self_attn", None), "layer_idx", i)
               for i, layer in enumerate(self.model.model.layers)]
        shared = sorted(i for i, count in Counter(ids).items() if count > 1)
        if shared:
            raise ValueError(f"decoder layers share the layer_idx {shared}: each layer's attention keeps its K/V "
                             "under its own layer_idx; give every layer a distinct one")
        return ids

    def _new_pool(self) -> BlockPool:
        settings = self.settings
        geometry = self.pool_geometry()
        num_blocks = settings.num_blocks
        if num_blocks is None:
            budget = settings.kv_cache_memory or self._kv_budget()
            block_bytes = BlockPool.bytes_per_block(settings.block_size, *geometry, self.model.dtype)
            if settings.kv_cache_memory is not None and budget < block_bytes:
                raise ValueError(f"kv_cache_memory of {budget} bytes holds no block: one block of "
                                 f"{settings.block_size} tokens takes {block_bytes} bytes of K/V")
            num_blocks = max(1, budget // block_bytes)
        return BlockPool(num_blocks, settings.block_size, *geometry, dtype=self.model.dtype, device=self.device,
                         layer_ids=self.layer_ids())

    def _kv_budget(self) -> int:
        """``default_kv_cache_memory``; off CUDA read once per device and settings: a pool rebuilt
        (new weights, dtype) is sized while the old one still holds its memory, which would shrink
        it at every rebuild. (A GPU's budget is half its free memory: asked for again beside the old
        pool, which the engine may still hold, it could not be had, so a GPU reads it afresh.)"""
        if self.device.type == "cuda":
            return default_kv_cache_memory(self.device)
        if self._default_budget is None or self._default_budget[0] != self.device:
            self._default_budget = (self.device, default_kv_cache_memory(self.device))
        return self._default_budget[1]

    # --- input checks ------------------------------------------------------------------------

    def check_token_ids(self, rows: Sequence[Sequence[int]]) -> None:
        for row in rows:
            if (problem := outside_vocabulary(row, self.config.vocab_size)) is not None:
                raise ValueError(problem)

    def max_positions(self) -> int:
        """The longest sequence answered as transformers answers it: ``max_position_embeddings``,
        or with LongRoPE scaling at most ``original_max_position_embeddings``. Past that length
        transformers' LongRoPE turns every token of a forward to its long-context frequencies, so a
        token's K/V depend on how long the forward that computed it was: cached K/V (a prefix hit,
        the steps of a generation, sessions of other lengths in one batch) would not be the K/V
        that transformers' forward over the whole sequence computes."""
        limit = self.config.max_position_embeddings
        if long_rope(self.model):  # as longrope_frequency_update reads it
            limit = min(limit, self.config.rope_parameters["original_max_position_embeddings"])
        return limit

    def check_positions(self, length: int) -> None:
        limit = self.max_positions()
        if length <= limit:
            return
        if limit < self.config.max_position_embeddings:
            raise ValueError(f"a sequence of {length} tokens exceeds the {limit} positions Trellis answers this model "
                             f"at: past original_max_position_embeddings ({limit}) LongRoPE switches every token to its "
                             "long-context frequencies, which cached K/V cannot follow")
        raise ValueError(f"a sequence of {length} tokens exceeds the model's {limit} positions "
                         "(max_position_embeddings)")

    def check_caller_positions(self, positions: Sequence[Sequence[int]]) -> None:
        """Refuse a caller's position past the model's with dynamic RoPE: there transformers
        rescales its frequencies for the whole forward, and keeps them for later forwards, a new
        ``inv_freq`` that neither cached K/V nor other sessions follow."""
        limit = self.config.max_position_embeddings
        highest = max((max(row) for row in positions if row), default=-1)
        if highest >= limit and dynamic_rope(self.model):
            raise ValueError(f"position_ids reach {highest}, past the model's {limit} positions "
                             "(max_position_embeddings): with dynamic RoPE transformers then rescales the frequencies "
                             "of every token and keeps them for later forwards, which cached K/V cannot follow; pass "
                             f"positions below {limit}")

    def mark_unshareable(self, manager: KVCacheManager, seqs: Sequence[PagedSequence], random: bool) -> None:
        """Sessions whose next forward computes K/V that a later prompt of the same tokens would
        not get share none of them: one with dropout (``random``), one over fewer layers than the
        pool holds (an early-exit draft's), one at LongRoPE's long frequencies."""
        if (random or self.config.num_hidden_layers < len(manager.pool.layers)
                or self.long_rope_forward(len(seq.token_ids) for seq in seqs)):
            for seq in seqs:
                seq.shareable = False

    def long_rope_forward(self, lengths: Iterable[int]) -> bool:
        """Whether LongRoPE runs a forward over sequences of these lengths at its long-context
        frequencies: a token at or past ``original_max_position_embeddings`` (a prompt-lookup draft
        that ``generate()`` discards may reach there, within ``max_positions`` for what it keeps),
        and transformers then rotates every token of that forward so, cached ones included. Such
        a forward reuses no cached K/V, and its sessions share none (``forward_rows``, ``forward``).
        (Caller positions make sessions private anyway.)"""
        if not long_rope(self.model):
            return False
        original = self.config.rope_parameters["original_max_position_embeddings"]
        return any(length > original for length in lengths)

    def drops_out(self) -> bool:
        """Whether a forward now would drop activations at random: a module in training mode with
        a dropout rate above zero (``nn.Dropout`` and its kin, a LoRA adapter's among them), or an
        attention whose ``attention_dropout`` transformers applies in training. Such a forward's K/V
        are one random draw: its sessions reuse and share nothing, and it runs transformers' modules
        (the lean path and CUDA graphs apply no dropout)."""
        if self._dropout_key != registration_count():
            modules = list(self.model.modules())
            watch_registrations(modules)  # a module added later (an adapter) lists them again
            self._dropout_modules = [m for m in modules if _dropout_rate(m) is not None]
            self._dropout_key = registration_count()
        return any(m.training and _dropout_rate(m) > 0 for m in self._dropout_modules)

    # --- forwards ----------------------------------------------------------------------------

    def forward(self, manager: KVCacheManager, seqs: Sequence[PagedSequence],
                positions: Sequence[Sequence[int]] | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> StepOutput:
        """One packed forward over the uncomputed tokens of ``seqs``, sessions of ``manager`` (the
        ``prefix_cache`` they were admitted to) with their blocks already reserved.

        Writes their K/V into the pool, marks them computed and shares their full blocks with the
        radix cache. Sequence ``i``'s new tokens sit at positions ``positions[i]`` (default: right
        after its computed ones) and are embedded by the model, or taken from ``inputs_embeds``
        (``[T, H]``, packed). ``kwargs`` go to transformers' decoder (``output_hidden_states``).

        A forward that runs fewer layers than the pool holds (``config.num_hidden_layers``
        lowered, as transformers' early-exit drafter does) writes the K/V of those layers only:
        its sessions are never cached. What they took from the cache stays right for them (a
        layer's K/V depend on the layers before it only).
        """
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"the model runs {self.config._attn_implementation!r} attention, not the paged "
                               f"{ATTN_IMPLEMENTATION!r} one; load it with attn_implementation={ATTN_IMPLEMENTATION!r}")
        refuse_autocast(self.device, self.model.dtype)
        with self.lock:
            random = self.drops_out()
            self.mark_unshareable(manager, seqs, random)
            backend = self.attention_backend()
            batch = build_batch(seqs, manager.pool, self.config.num_attention_heads, backend, positions,
                                self.batch_invariant(backend))
            replayed = inputs_embeds is None and not _asks(kwargs) and not random
            hidden = self.replay_decode(manager.pool, batch) if replayed else None
            hidden_states = None
            if hidden is None:
                out = run_decoder(self.model, batch, inputs_embeds, lean=not random, **kwargs)
                hidden, hidden_states = out.last_hidden_state[0], out.hidden_states
            mark_step_computed(manager, seqs, hidden, batch)
            return StepOutput(hidden, batch, hidden_states)

    def replay_decode(self, pool: BlockPool, batch: PagedBatch) -> torch.Tensor | None:
        """The decoder's final hidden states ``[B, H]`` of a decode step over ``pool``, replayed
        from a CUDA graph (``cuda_graphs``), or None where no graph reproduces it: the step then
        runs eagerly. (The caller has checked that nothing but the hidden states is asked for.)"""
        capture = cuda_graphs.capture_on(batch.input_ids.device)
        if (capture is None or not self.use_cuda_graphs or batch.plan.backend != "triton" or torch.is_grad_enabled()
                or not cuda_graphs.is_decode_step(batch) or not self.lean.stock()
                or cuda_graphs.host_rope(self.model)):
            return None
        graphs, modules = self._decode_graphs, self.lean.modules_state()
        if graphs is None or self._graphs_modules != modules:  # a module, hook or class changed
            width = cuda_graphs.table_width(pool, self.config.max_position_embeddings)
            graphs = cuda_graphs.DecodeGraphs(lambda step: run_decoder(self.model, step).last_hidden_state[0], pool,
                                              width, capture)
            self._decode_graphs, self._graphs_modules = graphs, modules
        # (None: the step runs eagerly)
        return graphs.run(batch, self.config.num_hidden_layers) if graphs.fits(batch) else None

    def submit(self, manager: KVCacheManager, seqs: Sequence[PagedSequence]) -> PendingStep:
        """Start ``forward(manager, seqs)``; its ``result()`` is the step's output. Here the forward
        runs at once; a grid returns while later stages still work, so that ``pipeline_depth``
        steps can be in flight together. The sessions count as computed once ``result()`` returns."""
        return PendingStep(self.forward(manager, seqs))

    def forward_rows(self, manager: KVCacheManager, seqs: list[PagedSequence], rows: Sequence[Sequence[int]],
                     max_reuse: Sequence[int] | None = None, positions: Sequence[Sequence[int]] | None = None,
                     inputs_embeds: torch.Tensor | None = None, **kwargs) -> StepOutput:
        """Run ``rows`` as the next tokens of ``seqs`` (row ``i`` continues session ``i``); an empty
        ``seqs`` is filled, in place, with sessions admitted over ``rows``, row ``i`` reusing at most
        ``max_reuse[i]`` cached tokens. A failure leaves ``seqs`` and the cache as they were.

        Caller-given ``positions`` or ``inputs_embeds`` (``rows`` then only count the tokens) make
        K/V that a later prompt of the same token ids would not reproduce: those sessions reuse
        nothing and are never cached. So does a forward that tracks gradients, whose attention must
        see every key as a function of the parameters; and a first forward that LongRoPE computes
        at its long frequencies (``long_rope_forward``) reuses nothing.
        """
        with self.lock:  # (forward reads drops_out again under the same hold: the two agree)
            private = positions is not None or inputs_embeds is not None or self.drops_out()
            fresh = not seqs
            if fresh:
                if private or self.tracks_gradients() or self.long_rope_forward(len(row) for row in rows):
                    max_reuse = [0] * len(rows)
                with manager.lock:  # the sessions in the caller's list before a Ctrl-C the admission held back
                    seqs[:] = manager.admit_batch(rows, max_reuse if max_reuse is not None else [len(r) for r in rows])
            else:
                manager.extend_batch(seqs, rows)
            if private:
                for seq in seqs:
                    seq.shareable = False
            try:
                return self.forward(manager, seqs, positions, inputs_embeds, **kwargs)
            except BaseException:
                manager.rollback_batch(seqs, None if fresh else [len(row) for row in rows])
                if fresh:
                    seqs.clear()
                raise

    def tracks_gradients(self) -> bool:
        """Whether a forward now would record autograd history (training, or inference outside no_grad)."""
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, H]`` final hidden states to ``[R, V]`` logits."""
        return self.model.lm_head(hidden)

    def chunked_logits(self, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """The logits of ``hidden`` ``[R, H]``, ``LM_HEAD_ROWS`` rows at a time: (first row, ``[r, V]``),
        so that scoring many positions never holds all their ``[R, V]`` logits at once."""
        for offset in range(0, hidden.shape[0], LM_HEAD_ROWS):
            yield offset, self.logits(hidden[offset : offset + LM_HEAD_ROWS])

    def unpack(self, packed: torch.Tensor, batch: PagedBatch, real: torch.Tensor | None, cols: torch.Tensor,
               skipped: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The rows ``[B, K, X]`` of a padded ``[B, S]`` input at row ``i``'s columns ``cols[i]``
        (``cols`` ``[B, K]``, each in ``[0, S)``), from ``packed`` ``[T, X]`` values of its new real
        tokens (``real`` ``[B, S]`` bool, None if all are real), each passed through ``transform``
        (e.g. ``logits``) first; row ``i``'s first ``skipped[i]`` real tokens were served by the
        cache. Zero where padding."""
        transform = transform or (lambda rows: rows)
        row_starts = batch.cu_seqlens_q[:-1].long()  # [B]
        if real is None:  # row i's column c is packed token row_starts[i] + c - skipped[i]
            return transform(packed[(row_starts - skipped)[:, None] + cols])
        rank = real.long().cumsum(1) - 1  # [B, S] index of each real token among its row's new tokens
        index_of = row_starts[:, None] + rank - skipped[:, None]  # [B, S] its index in the packed batch
        kept_real = real.gather(1, cols)  # [B, K]
        values = transform(packed[index_of.gather(1, cols)[kept_real]])  # [R, X]
        out = values.new_zeros(*cols.shape, values.shape[-1])
        out[kept_real] = values
        return out


@dataclass
class StepOutput:
    """What one forward returns: the final hidden states ``[T, H]`` of the new tokens, packed
    (sequence i's are ``hidden[cu_seqlens_q[i]:cu_seqlens_q[i+1]]``; ``logits`` turns the rows you
    need into logits), the batch, and every layer's input and the final output when asked for."""

    hidden: torch.Tensor
    batch: PagedBatch
    hidden_states: tuple[torch.Tensor, ...] | None = None  # each [1, T, H], as the decoder returned them


def run_decoder(model: LlamaForCausalLM, batch: PagedBatch, inputs_embeds: torch.Tensor | None = None, *,
                lean: bool = True, **kwargs) -> BaseModelOutputWithPast:
    """The decoder (``model.model``) over a packed batch: its tokens, or ``inputs_embeds`` ``[T, H]``
    in their place; attention reads the batch. The lean path (``decoder.py``) where ``lean`` allows
    it, the model's runner finds it eligible and ``kwargs`` are all None or False (they ask for
    nothing); else transformers' forward, given ``kwargs`` (a tensor among them too: a
    ``cache_position``)."""
    runner = getattr(model, "runner", None)
    if lean and isinstance(runner, PagedModelRunner) and runner.use_lean_decoder and not _asks(kwargs):
        hidden = runner.lean.run(batch, inputs_embeds)  # [T, H], or None where the model is not eligible
        if hidden is not None:
            return BaseModelOutputWithPast(last_hidden_state=hidden[None])
    tokens = {"input_ids": batch.input_ids[None]} if inputs_embeds is None else {"inputs_embeds": inputs_embeds[None]}
    return model.model(**tokens, position_ids=batch.positions[None], paged_batch=batch, use_cache=False, **kwargs)


def refuse_autocast(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a forward under ``torch.autocast``: transformers would then compute some layers in
    another dtype than the model's, and the paged kernels (which store and read K/V in the pool's
    one dtype) and the fused CPU layers (which run in the model's) cannot follow it."""
    if torch.is_autocast_enabled(device.type):
        raise ValueError(f"torch.autocast is not supported: Trellis runs every layer in the model's dtype "
                         f"({str(dtype).removeprefix('torch.')}); convert the model to the dtype you want instead "
                         "(from_pretrained(dtype=...) or model.to(dtype))")


def mark_step_computed(manager: KVCacheManager, seqs: Sequence[PagedSequence], hidden: torch.Tensor,
                       batch: PagedBatch) -> None:
    """Record that a step's forward computed its sessions, as one change of the cache (a Ctrl-C
    comes before or after all of them). A session whose last final hidden state (of ``hidden``,
    ``[T, H]`` packed as ``batch``) is not finite is never shared: a NaN reaches every K/V of its
    session's forward, earlier positions' too (in transformers' attention as in Trellis': a
    masked-out probability of 0 times a NaN value is NaN), and another prompt must not reuse them."""
    last = batch.cu_seqlens_q[1:].long() - 1  # [B], each session's last row
    for seq, finite in zip(seqs, torch.isfinite(hidden[last]).all(-1).tolist(), strict=True):
        if not finite:
            seq.shareable = False
    with manager.lock:
        for seq in seqs:
            manager.mark_computed(seq)


def _dropout_rate(module: torch.nn.Module) -> float | None:
    """The rate at which ``module`` drops activations in training: ``nn.Dropout``'s (and its kin's)
    ``p``, an attention's ``attention_dropout``; None for modules that drop nothing. (Through the
    module's dict: ``nn.Module.__getattr__`` is slow for names it lacks.)"""
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        return module.p
    rate = vars(module).get("attention_dropout")
    return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) else None


def _asks(kwargs: dict) -> bool:
    """Whether the decoder's keyword arguments ask for anything (all None or False ask for nothing)."""
    return any(value is not None and value is not False for value in kwargs.values())


class PendingStep:
    """A forward started by ``submit``."""

    def __init__(self, output: StepOutput) -> None:
        self._output = output

    def result(self) -> StepOutput:
        return self._output


def runner_of(model: object) -> PagedModelRunner:
    """The runner of a ``TrellisLlama`` (its ``runner``), or ``model`` itself if it is one."""
    runner = model if isinstance(model, PagedModelRunner) else getattr(model, "runner", None)
    if not isinstance(runner, PagedModelRunner):
        raise TypeError(f"expected a TrellisLlama or a PagedModelRunner, got {type(model).__name__}")
    return runner
