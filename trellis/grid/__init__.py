"""The grid: one model served by several processes or machines, each holding a range of layers.

Rank 0 (the coordinator) holds the engine, the radix tree and block manager, the embedding, the
first layers and the LM head; ranks 1..W-1 hold the next ranges, the last one the final norm.
Every stage's KV pool is indexed by the same block ids, so one block table serves them all and a
prefix hit saves work on every stage. Steps travel the ring over ``torch.distributed``
point-to-point messages (gloo on CPU, NCCL on CUDA). See docs/grid.md.
"""

from trellis.grid.launch import GridOptions, start_coordinator, start_stage
from trellis.grid.local import LocalGrid
from trellis.grid.placement import Placement, parse_layers, split_by_memory
from trellis.grid.rendezvous import Endpoint
from trellis.grid.runner import GridRunner
from trellis.grid.shared_host import shared_host_environment
from trellis.grid.stage import run_stage
from trellis.grid.transport import GridError

__all__ = ["Endpoint", "GridError", "GridOptions", "GridRunner", "LocalGrid", "Placement", "parse_layers",
           "run_stage", "shared_host_environment", "split_by_memory", "start_coordinator", "start_stage"]
