"""``GridRunner``: the coordinator's runner, which runs each step over every stage of the grid.

It is a ``PagedModelRunner`` over stage 0's model (the embedding, the first layers and the LM
head), so the engine, the eval scorers, the server and ``TrellisLlama.generate`` run on a grid
unchanged. It owns the radix tree and the block manager for all stages: its pool's block ids name
the same blocks in every stage's pool. A step runs stage 0's layers here, sends the plan and the
activations on, and its ``result()`` waits for the last stage's final hidden states ``[T, H]``
(after the norm); the LM head and sampling then run here, next to each session's sampling state.
Only when those arrive is the step's K/V computed on every stage, so only then do its full
blocks enter the radix tree: a step that is lost caches nothing.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from transformers import LlamaForCausalLM

from trellis.cache.block_pool import BlockPool
from trellis.cache.manager import KVCacheManager, PagedSequence
from trellis.grid.placement import Placement
from trellis.grid.transport import PING, STOP, GridError, Link, StepPlan
from trellis.runner.batch import PagedBatch, build_batch
from trellis.runner.runner import (
    CacheSettings,
    PagedModelRunner,
    PendingStep,
    StepOutput,
    mark_step_computed,
    refuse_autocast,
    run_decoder,
)

log = logging.getLogger("trellis.grid")


class CopyRecordingPool(BlockPool):
    """The coordinator's pool: block copies (copy-on-write of forks) are made here and recorded,
    to be made by every other stage before the next step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.copies: list[tuple[int, int]] = []

    def copy_block(self, src: int, dst: int) -> None:
        super().copy_block(src, dst)
        self.copies.append((src, dst))

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.copies = self.copies, []
        return copies


class GridStep(PendingStep):
    """A step sent into the grid; ``result()`` waits for it to come back from the last stage."""

    def __init__(self, runner: GridRunner, manager: KVCacheManager, seqs: Sequence[PagedSequence],
                 batch: PagedBatch) -> None:
        self.runner, self.manager, self.seqs, self.batch = runner, manager, list(seqs), batch
        self.hidden: torch.Tensor | None = None

    def result(self) -> StepOutput:
        self.runner.receive_until(self)
        return StepOutput(self.hidden, self.batch)


class GridRunner(PagedModelRunner):
    """Runs steps over a grid's stages; ``micro_batches`` steps may be in flight (the engine keeps
    that many lanes), so that every stage has work; at most one step a stage is on the ring, as a
    stage's send waits for the next stage to take the one before. ``link`` connects this rank (0)
    to the ring."""

    holds_every_layer = False  # each stage's pool holds its own layers' K/V

    def __init__(self, model: LlamaForCausalLM, settings: CacheSettings, link: Link, placement: Placement,
                 micro_batches: int, heartbeat_s: float = 5.0) -> None:
        if settings.num_blocks is None:
            raise ValueError("a grid's pool size is agreed at start-up: settings.num_blocks must be set")
        super().__init__(model, settings)
        self.link, self.placement = link, placement
        self.pipeline_depth = micro_batches
        self.stage_memory: list[dict[str, int]] = []  # per stage: bytes of weights and of KV pool, at start
        self.steps = 0
        self._in_flight: deque[GridStep] = deque()
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(target=self._ping, args=(heartbeat_s,), name="trellis-grid-ping",
                                           daemon=True)
        self._heartbeat.start()

    def configure(self, settings: CacheSettings) -> None:
        raise ValueError("a grid's KV pool geometry is fixed when the grid starts (every stage shares its block "
                         "ids); restart the grid with other --block-size / --num-blocks")

    def check_conversion(self, convert: Callable[[torch.Tensor], torch.Tensor]) -> None:
        # Every kind of tensor the model holds: an fp32 buffer of a bf16 model (RoPE's inv_freq)
        # changes under .to(torch.bfloat16) too.
        kinds = {(t.dtype, t.device) for t in itertools.chain(self.model.parameters(), self.model.buffers())}
        for dtype, device in kinds:
            converted = convert(torch.empty(0, dtype=dtype, device=device))
            if converted.dtype != dtype or converted.device != device:
                raise ValueError(f"a grid's dtype and device are fixed when it starts (every stage computes in "
                                 f"{str(self.model.dtype).removeprefix('torch.')} on {self.device.type}); restart "
                                 f"the grid with another --dtype or --device")

    def set_linear_kernel(self, kind: str, chosen: bool = True) -> int:
        if kind != self.linear_kernel:
            raise ValueError(f"a grid's linear kernel is fixed when it starts (every stage runs {self.linear_kernel!r}, "
                             f"whose rounding its layers share); restart the grid with --linear-kernel {kind}")
        return 0

    def follow_dtype(self) -> None:
        """Nothing to follow: the dtype and device cannot change (``check_conversion``), and the kernel
        stays the one every stage started with."""

    def _new_pool(self) -> BlockPool:
        return CopyRecordingPool(self.settings.num_blocks, self.settings.block_size, *self.pool_geometry(),
                                 dtype=self.model.dtype, device=self.device, layer_ids=self.layer_ids())

    @property
    def prefix_cache(self) -> KVCacheManager:
        self._check_alive()
        return super().prefix_cache

    def _check_alive(self) -> None:
        if self.failure is not None:
            raise GridError(f"the grid has failed and serves nothing more ({self.failure}); restart it")
        if self._closed.is_set():
            raise GridError("the grid is closed")

    # --- steps -------------------------------------------------------------------------------

    def forward(self, manager: KVCacheManager, seqs: Sequence[PagedSequence],
                positions: Sequence[Sequence[int]] | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> StepOutput:
        return self.submit(manager, seqs, positions, inputs_embeds, **kwargs).result()

    def submit(self, manager: KVCacheManager, seqs: Sequence[PagedSequence],
               positions: Sequence[Sequence[int]] | None = None, inputs_embeds: torch.Tensor | None = None,
               **kwargs) -> GridStep:
        if kwargs.get("output_hidden_states"):
            raise ValueError("output_hidden_states is not served by a grid: most layers run on other stages")
        if self.tracks_gradients():
            raise ValueError("a grid serves inference only: run it under torch.no_grad() (gradients cannot "
                             "flow back through the other stages)")
        if self.drops_out():
            raise ValueError("a grid serves inference only: call model.eval() (in training mode its dropout "
                             "would apply on this stage's layers alone)")
        refuse_autocast(self.device, self.model.dtype)
        if self.config.num_hidden_layers != len(self.model.model.layers):
            raise ValueError("a grid runs every layer of the model on its stages: a forward with another "
                             "config.num_hidden_layers (assistant_early_exit drafts with one) is not served")
        self.mark_unshareable(manager, seqs, random=False)  # (dropout and early exit refused above)
        with self.lock:
            self._check_alive()
            # One more step than there are stages would deadlock the ring: each stage would wait
            # on a send that the next one, itself sending, never takes.
            while len(self._in_flight) >= self.link.world_size:
                self.receive_until(self._in_flight[0])
            batch = build_batch(seqs, manager.pool, self.config.num_attention_heads, self.attention_backend(),
                                positions)
            hidden = run_decoder(self.model, batch, inputs_embeds).last_hidden_state[0]
            # Sent only once stage 0 has computed: a step that fails here leaves the ring untouched.
            plan = StepPlan(batch.input_ids, batch.positions, batch.slot_mapping, batch.block_table,
                            batch.host_seq_lens, batch.host_cu_seqlens_q, manager.pool.take_copies())
            try:
                self.link.send_plan(*plan.encode())
                self.link.send_hidden(hidden)
            except BaseException as exc:
                self._broken(exc)
                raise
            self._last_sent = time.monotonic()
            step = GridStep(self, manager, seqs, batch)
            self._in_flight.append(step)
            return step

    def receive_until(self, step: GridStep) -> None:
        """Take the last stage's outputs, in the order the steps were sent, until ``step``'s is in;
        each step's sessions count as computed when its output arrives."""
        with self.lock:
            while step.hidden is None:
                self._check_alive()
                head = self._in_flight[0]
                try:
                    head.hidden = self.link.recv_hidden(head.batch.input_ids.shape[0])
                except BaseException as exc:
                    self._broken(exc)
                    raise
                self._in_flight.popleft()
                self.steps += 1
                mark_step_computed(head.manager, head.seqs, head.hidden, head.batch)

    # --- failure and shutdown ----------------------------------------------------------------

    def _fail(self, exc: GridError) -> None:
        """The ring is broken (gloo cannot drop a member): fail what is in flight and everything after."""
        if self.failure is None:
            self.failure = str(exc)
            log.error("grid failed: %s", exc)
        self._in_flight.clear()
        self._closed.set()

    def _broken(self, exc: BaseException) -> None:
        """A send or receive that did not finish, a link's failure or an interrupt (Ctrl-C lands as
        a receive returns, its output lost), leaves the ring out of step: the grid fails at once,
        instead of a later step waiting ``step_timeout`` for what will not come."""
        self._fail(exc if isinstance(exc, GridError) else
                   GridError(f"a step was interrupted on the ring ({type(exc).__name__}); restart the grid"))

    def _ping(self, interval: float) -> None:
        """While idle, ping the ring now and then, so that a lost stage is noticed (``failure``, /health)
        and the stages know the coordinator lives."""
        while not self._closed.wait(interval):
            if time.monotonic() - self._last_sent < interval or not self.lock.acquire(timeout=interval):
                continue
            try:
                if not self._closed.is_set():
                    self.link.send_signal(PING)
                    self._last_sent = time.monotonic()
            except GridError as exc:
                self._fail(exc)
            finally:
                self.lock.release()

    def close(self) -> None:
        """Wait for the steps in flight, then stop every stage and the heartbeat."""
        with self.lock:
            if self.failure is None and not self._closed.is_set():
                try:
                    while self._in_flight:
                        self.receive_until(self._in_flight[-1])
                    self.link.send_signal(STOP)
                    self.link.close()
                except GridError:
                    pass  # already recorded as the failure; the stages exit on their own
            self._closed.set()
