"""Messages between the stages of a grid, over a ``torch.distributed`` process group.

The stages form a ring: 0 → 1 → … → W-1 → 0. Each step travels it twice over, on two tags:

- the **plan** (tag ``PLAN``): a fixed header and one int64 payload with the step's packed token
  ids, positions, slot mapping, block table, K/V lengths, query bounds and the block copies
  (copy-on-write) to make first. Each stage forwards it before computing, so the next one plans
  its attention while this one runs its layers. The last stage does not send it back.
- the **activations** (tag ``HIDDEN``): ``[T, hidden]`` in the model's dtype, from stage to
  stage, and from the last stage (after the final norm) back to the coordinator.

Point-to-point messages between two ranks on one tag arrive in the order they were sent, so a
stage needs no step ids: it takes plans and activations in order.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

PLAN, HIDDEN = 1, 2
STEP, PING, STOP = 1, 2, 3  # plan kinds
HEADER = 6  # kind, tokens, sequences, blocks per row, block copies, reserved


class GridError(RuntimeError):
    """A stage of the grid failed, hung or could not be reached: the grid serves nothing more."""


@dataclass
class StepPlan:
    """What every stage needs to run one step over its own layers and its own KV pool."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: list[int]  # [B]
    cu_seqlens_q: list[int]  # [B+1]
    copies: list[tuple[int, int]]  # (source block, destination block), made before the step

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(header, payload) int64 tensors."""
        num_tokens, (num_seqs, max_blocks) = self.input_ids.shape[0], self.block_table.shape
        header = torch.tensor([STEP, num_tokens, num_seqs, max_blocks, len(self.copies), 0], dtype=torch.int64)
        bounds = torch.tensor(self.seq_lens + self.cu_seqlens_q + [b for pair in self.copies for b in pair],
                              dtype=torch.int64)
        payload = torch.cat([self.input_ids.cpu(), self.positions.cpu(), self.slot_mapping.cpu(),
                             self.block_table.cpu().flatten().long(), bounds])
        return header, payload

    @staticmethod
    def payload_size(header: torch.Tensor) -> int:
        _, tokens, seqs, blocks, copies, _ = header.tolist()
        return 3 * tokens + seqs * blocks + seqs + seqs + 1 + 2 * copies

    @staticmethod
    def decode(header: torch.Tensor, payload: torch.Tensor, device: torch.device) -> StepPlan:
        _, tokens, seqs, blocks, copies, _ = header.tolist()
        parts = payload.split([tokens, tokens, tokens, seqs * blocks, seqs, seqs + 1, 2 * copies])
        pairs = parts[6].tolist()
        return StepPlan(parts[0].to(device), parts[1].to(device), parts[2].to(device),
                        parts[3].view(seqs, blocks).int().to(device), parts[4].tolist(), parts[5].tolist(),
                        list(zip(pairs[::2], pairs[1::2])))


class Link:
    """This rank's sends to the next stage and receives from the previous one, with timeouts.

    Transport failures (a peer that exited, a timeout) raise ``GridError``; after one, the process
    group is unusable (a gloo group cannot drop a member) and the grid must be restarted.
    """

    def __init__(self, group: dist.ProcessGroup, rank: int, world_size: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, timeout: float) -> None:
        self.group, self.rank, self.world_size = group, rank, world_size
        self.next, self.prev = (rank + 1) % world_size, (rank - 1) % world_size
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.timeout = datetime.timedelta(seconds=timeout)
        self._sends: list[tuple[dist.Work, torch.Tensor]] = []  # in flight; the tensors must outlive them
        self.bytes_sent = 0

    def _send(self, tensor: torch.Tensor, tag: int) -> None:
        self._reap()
        tensor = tensor.contiguous()
        self._sends.append((self._call(lambda: self.group.send([tensor], self.next, tag)), tensor))
        self.bytes_sent += tensor.nbytes

    def _recv(self, tensor: torch.Tensor, tag: int, timeout: datetime.timedelta | None = None) -> torch.Tensor:
        work = self._call(lambda: self.group.recv([tensor], self.prev, tag))
        self._call(lambda: work.wait(timeout or self.timeout))
        return tensor

    def _reap(self) -> None:
        """Wait for every pending send (a gloo send completes once its bytes are written)."""
        for work, _ in self._sends:
            self._call(lambda work=work: work.wait(self.timeout))
        self._sends.clear()

    def _call(self, operation):
        try:
            return operation()
        except RuntimeError as exc:
            peers = " or ".join(f"stage {r}" for r in sorted({self.next, self.prev}))
            raise GridError(f"stage {self.rank}: the link to {peers} failed: {str(exc).splitlines()[0][:300]}") from exc

    # --- plans --------------------------------------------------------------------------------

    def send_plan(self, header: torch.Tensor, payload: torch.Tensor | None = None) -> None:
        self._send(header.to(self.device), PLAN)
        if payload is not None:
            self._send(payload.to(self.device), PLAN)

    def send_signal(self, kind: int) -> None:
        self.send_plan(torch.tensor([kind, 0, 0, 0, 0, 0], dtype=torch.int64))

    def recv_plan(self, timeout: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next (header, payload); payload None for a signal (``PING``, ``STOP``)."""
        wait = datetime.timedelta(seconds=timeout)
        header = self._recv(torch.empty(HEADER, dtype=torch.int64, device=self.device), PLAN, wait).cpu()
        if header[0].item() != STEP:
            return header, None
        payload = torch.empty(StepPlan.payload_size(header), dtype=torch.int64, device=self.device)
        return header, self._recv(payload, PLAN).cpu()

    # --- activations --------------------------------------------------------------------------

    def send_hidden(self, hidden: torch.Tensor) -> None:
        self._send(hidden, HIDDEN)

    def recv_hidden(self, num_tokens: int) -> torch.Tensor:
        return self._recv(torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device), HIDDEN)

    def close(self) -> None:
        try:
            self._reap()
        except GridError:
            pass  # closing after a failure: nothing left to deliver to
