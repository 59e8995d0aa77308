"""Decode steps replayed from CUDA graphs.

On a GPU, a decode step of a small model is bound by the host: transformers' Llama forward
launches some twenty kernels a layer from Python (~0.7 ms a TinyLlama layer on the host of an
H200 machine, against tens of µs of GPU work). ``DecodeGraphs`` records a step's launches once in a
CUDA graph and then replays them in one call. One graph per decode shape (the number of sequences,
of layers run, and the Triton plan's launch numbers: the decode kernel's split count), captured the
first time a step of that shape runs, over static input buffers that each step's batch is copied
into. A graph replays the kernels that an eager step of its shape launches, with the same shapes
and launch numbers, so a replayed step computes what the eager step computes.

The runner replays only what a graph reproduces (``PagedModelRunner.replay_decode``): a decoder
that is transformers' Llama as built, with no hooks and no forwards set on instances
(``LeanDecoder.stock``: a hook would not run on replay), and a RoPE that does not read the step's
positions on the host (dynamic and LongRoPE scaling do); attention on the Triton backend; no
gradients; a step in which every sequence has one new token, embedded from its id, and nothing else
is asked for. A graph reads the pool's K/V, the weights and the static buffers at the addresses they
had at capture: the runner drops its graphs with its cache (a new pool; weights replaced, which
rebuilds the cache) and whenever the decoder's modules change (a module replaced, a hook set, a
class or forward changed: ``LeanDecoder.modules_state``).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

import torch

from trellis.cache.block_pool import BlockPool
from trellis.runner.batch import PagedBatch
from trellis.runner.rope import rope_types
from trellis.utils import cdiv

# Records ``step`` (a function of the static buffers) on a device, its tensors in a memory pool
# shared by the graphs of one ``DecodeGraphs``; returns a function that replays it.
Capture = Callable[[Callable[[], None], torch.device, object], Callable[[], None]]

MAX_BATCH = 128  # sequences a captured step takes at most; larger decode steps run eagerly
MAX_GRAPHS = 64  # graphs kept at once, the least recently replayed dropped first
_HOST_ROPE = ("dynamic", "longrope")  # RoPE types that update their frequencies from the positions on the host


def capture_cuda_graph(step: Callable[[], None], device: torch.device, memory_pool: object) -> Callable[[], None]:
    """``step`` run once on a side stream (Triton compiles, cuBLAS sets up its workspace), then
    recorded in a CUDA graph whose intermediates live in ``memory_pool``; returns its replay."""
    with torch.cuda.device(device):
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls another thread makes meanwhile (a second model) are not captured.
        # On this device's side stream: torch's default capture stream is one per process, made on
        # whichever device captured first (a model moved to another GPU would record nothing).
        with torch.cuda.graph(graph, pool=memory_pool, stream=side, capture_error_mode="thread_local"):
            step()

    def replay() -> None:
        with torch.cuda.device(device):  # on the graph's device's stream, whichever device is current
            graph.replay()

    return replay


def host_rope(model: torch.nn.Module) -> bool:
    """Whether the model's RoPE reads the positions on the host (``dynamic_rope_update``)."""
    return any(kind in t for t in rope_types(model) for kind in _HOST_ROPE)


def is_decode_step(batch: PagedBatch) -> bool:
    """Every sequence of the batch has exactly one new token."""
    return batch.host_cu_seqlens_q == list(range(len(batch.host_cu_seqlens_q)))


class DecodeGraphs:
    """The captured decode steps of one model over one pool.

    ``forward(batch)`` is the eager decoder forward (``[T, H]`` final hidden states) that a graph
    records; ``max_blocks`` the widest block table a step may have (longer sequences run eagerly).
    """

    def __init__(self, forward: Callable[[PagedBatch], torch.Tensor], pool: BlockPool, max_blocks: int,
                 capture: Capture = capture_cuda_graph, max_batch: int = MAX_BATCH,
                 max_graphs: int = MAX_GRAPHS) -> None:
        self._forward = forward
        self._capture = capture
        self._kv_layers = pool.layers  # what the graphs read and write (a batch over another pool runs eagerly)
        self.max_batch, self.max_blocks, self.max_graphs = max_batch, max_blocks, max_graphs
        device = pool.kv.device
        self.device = device
        # The static buffers every graph reads (rows 0 .. B - 1 for a step of B sequences). Ordinary
        # tensors even when the first step runs under inference_mode: later steps outside it write them.
        with torch.inference_mode(False):
            self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
            self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
            self.slot_mapping = torch.zeros(max_batch, dtype=torch.int64, device=device)
            self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
            self.cu_seqlens_q = torch.arange(max_batch + 1, dtype=torch.int32, device=device)  # one query each
            self.block_table = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        # One pool for every graph's tensors: a step's intermediates are dead once it ends, so graphs
        # may overwrite each other's, replayed in any order, one at a time; each graph's output stays
        # alive (held below), so no later capture takes its memory.
        self._memory_pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        # shape -> (replay, [the output it writes, ``[B, H]``])
        self._replays: OrderedDict[tuple, tuple[Callable[[], None], list[torch.Tensor]]] = OrderedDict()
        self.captures = 0  # graphs recorded so far (tests and benchmarks read it)
        self.failure: str | None = None  # why a capture failed; then every step runs eagerly

    def fits(self, batch: PagedBatch) -> bool:
        """Whether a graph can take this decode step: no capture has failed, the sequences and
        block table fit the buffers, and it runs over this object's pool."""
        return (self.failure is None and batch.kv_layers is self._kv_layers
                and len(batch.host_seq_lens) <= self.max_batch and batch.block_table.shape[1] <= self.max_blocks)

    def run(self, batch: PagedBatch, num_layers: int) -> torch.Tensor | None:
        """The decoder's final hidden states ``[B, H]`` of a decode step that ``fits``, running
        ``num_layers`` layers, from the graph of its shape (captured now if it is the first step of
        that shape); None where the capture failed (the step must then run eagerly: its K/V
        writes, if any ran, are rewritten)."""
        size, width = len(batch.host_seq_lens), batch.block_table.shape[1]
        key = (size, num_layers, *batch.plan.backend_plan.tolist())
        self.input_ids[:size].copy_(batch.input_ids)
        self.positions[:size].copy_(batch.positions)
        self.slot_mapping[:size].copy_(batch.slot_mapping)
        self.seq_lens[:size].copy_(batch.seq_lens)
        # (Entries past a sequence's blocks keep older steps' ids: the kernels read none past its length.)
        self.block_table[:size, :width].copy_(batch.block_table)
        graph = self._replays.get(key)
        if graph is None:
            graph = self._record(key, batch)
            if graph is None:
                return None
        else:
            self._replays.move_to_end(key)
        replay, output = graph
        replay()
        return output[0].clone()  # the next replay of this graph overwrites it

    def _record(self, key: tuple, batch: PagedBatch) -> tuple[Callable[[], None], list[torch.Tensor]] | None:
        size = key[0]
        sequences = {"block_table": self.block_table[:size], "seq_lens": self.seq_lens[:size],
                     "cu_seqlens_q": self.cu_seqlens_q[:size + 1]}
        static = replace(batch, input_ids=self.input_ids[:size], positions=self.positions[:size],
                         slot_mapping=self.slot_mapping[:size], plan=replace(batch.plan, **sequences), **sequences)
        output: list[torch.Tensor] = []  # the last run's, i.e. the recorded one's: what replays write

        def step() -> None:
            output[:] = [self._forward(static)]

        try:
            replay = self._capture(step, self.device, self._memory_pool)
        except RuntimeError as exc:  # (CUDA's errors are) e.g. an op that reads the device back while capturing
            self.failure = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"trellis: decode steps run without CUDA graphs from now on: capturing one failed "
                          f"({self.failure})", stacklevel=2)
            return None
        self.captures += 1
        self._replays[key] = replay, output
        while len(self._replays) > self.max_graphs:
            self._replays.popitem(last=False)
        return replay, output


def table_width(pool: BlockPool, max_positions: int) -> int:
    """The block table width a graph provides for: a sequence of the model's longest, or the whole pool."""
    return min(pool.num_blocks, cdiv(max_positions, pool.block_size))


def capture_on(device: torch.device) -> Capture | None:
    """How decode steps on ``device`` are captured: CUDA graphs on a CUDA device; None elsewhere."""
    return capture_cuda_graph if device.type == "cuda" else None
