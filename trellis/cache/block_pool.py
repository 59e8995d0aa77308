"""A preallocated pool of fixed-size KV blocks shared by every session.

One tensor holds the K and V of every layer: ``kv[num_layers, 2, num_blocks, block_size,
num_kv_heads, head_dim]``. A block id names the same block in every layer, so a session's
block list is valid for the whole model. ``layers[l]`` is the K and V of the layer whose attention
has ``layer_idx`` ``l``: ``layer_ids`` name them, by default ``0 .. num_layers - 1`` (a grid
stage's pool holds its range of the model's layers; a model with layers deleted keeps the indices
its layers were built with). The pool only counts references; who holds them (the radix tree,
live sessions) is the business of the layers above.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trellis.utils import is_positive_int


class OutOfBlocksError(RuntimeError):
    """The pool cannot satisfy an allocation, even after evicting what may be evicted."""


def check_block_size(block_size: int) -> None:
    if not is_positive_int(block_size) or block_size & (block_size - 1) or block_size > 256:
        raise ValueError(f"block_size must be a power of two between 1 and 256, got {block_size!r}")


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layer_ids: Sequence[int] | None = None,
    ) -> None:
        check_block_size(block_size)
        if not is_positive_int(num_blocks):
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        num_blocks, block_size = int(num_blocks), int(block_size)
        layer_ids = range(num_layers) if layer_ids is None else layer_ids
        if len(layer_ids) != num_layers or len(set(layer_ids)) != num_layers:
            raise ValueError(f"layer_ids must name {num_layers} distinct layers, got {list(layer_ids)}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Unused slots are never read (kernels stop at seq_len), so no need to zero the memory. Not an
        # inference tensor even when made under torch.inference_mode (a model's first call there):
        # one refuses in-place writes outside it, and every later call writes the pool.
        try:
            with torch.inference_mode(False):
                self.kv = torch.empty((num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim), dtype=dtype,
                                      device=device)
        except RuntimeError as exc:  # the allocator's (torch.OutOfMemoryError on CUDA): a setting too large
            size = num_blocks * self.bytes_per_block(block_size, num_layers, num_kv_heads, head_dim, dtype)
            raise ValueError(f"a KV pool of {num_blocks} blocks ({size / 2**30:.1f} GiB) cannot be allocated on "
                             f"{device}: lower num_blocks / kv_cache_memory ({exc})") from exc
        # Views made once, keyed by the model's layer index: attention asks for its layer's caches
        # on every forward.
        with torch.inference_mode(False):
            self.layers = {layer: (self.kv[i, 0], self.kv[i, 1]) for i, layer in enumerate(layer_ids)}
        self.ref_counts = [0] * num_blocks
        self.version = 0  # counts changes to ref_counts: a figure derived from them holds while it stays
        # Pop from the end: low block ids are handed out first, which keeps tests readable.
        self._free = list(range(num_blocks - 1, -1, -1))

    @staticmethod
    def bytes_per_block(block_size: int, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_alloc(self, n: int) -> bool:
        return n <= len(self._free)

    def alloc(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with a reference count of one."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocksError(
                f"KV pool exhausted: {n} blocks requested, {len(self._free)} free of {self.num_blocks} "
                f"(block size {self.block_size}); raise num_blocks or the KV memory budget"
            )
        blocks = [self._free.pop() for _ in range(n)]
        self.version += 1
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        self.version += 1
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"incref of free block {b}")
            self.ref_counts[b] += 1

    def decref(self, blocks: list[int]) -> None:
        """Drop one reference from each block; a block whose count reaches zero is free again."""
        self.version += 1
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"decref of free block {b} (double free)")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V in every layer (a shared block's tokens, for a session of its own)."""
        self.kv[:, :, dst] = self.kv[:, :, src]

    def write_blocks(self, blocks: list[int], kv: torch.Tensor) -> None:
        """Write ``kv`` (``[layers, 2, len(blocks), block_size, kv_heads, head_dim]``, e.g. a saved
        cache's) into ``blocks`` in every layer."""
        self.kv.index_copy_(2, torch.tensor(blocks, dtype=torch.int64, device=self.kv.device), kv.to(self.kv.device))

    def check_integrity(self) -> None:
        """free + referenced == total, no negative count, no block both free and referenced."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        referenced = {b for b, c in enumerate(self.ref_counts) if c > 0}
        if any(c < 0 for c in self.ref_counts):
            raise AssertionError("negative reference count")
        if free & referenced:
            raise AssertionError(f"blocks both free and referenced: {sorted(free & referenced)[:8]}")
        if len(free) + len(referenced) != self.num_blocks:
            raise AssertionError(
                f"free ({len(free)}) + referenced ({len(referenced)}) != total ({self.num_blocks})"
            )
