"""CPU weights on transparent huge pages.

A decode step reads every weight once (270 MB a step for SmolLM2 in bf16), at memory speed. On
the default 4 KiB pages that stream crosses a page every 4 KiB: a TLB miss each time, and the
CPU's hardware prefetchers stop at page boundaries. On 2 MiB pages there are 512 times fewer
boundaries: on a 2-core AMX Xeon a SmolLM2 decode step of four sessions in bf16 took 17.6-18.6
against 18.8-19.9 ms, one session's in fp32 27.9-28.9 against 29.8-30.8 (docs/architecture.md).

``place_on_huge_pages`` copies CPU tensors (a model's parameters and buffers, Trellis' packed
weight panels) into one private anonymous mapping, aligned to 2 MiB and marked ``MADV_HUGEPAGE``
(Linux, where transparent huge pages are not switched off; elsewhere it leaves them where they are). Each tensor gets a storage of
its own over its slice (``torch.frombuffer``), so version counters, ``state_dict``, pickling and
safetensors' shared-tensor check see separate tensors as before; values, shapes and strides are
unchanged. The mapping is freed when the last tensor over it is; a weight replaced later is placed
by the next call, in a new mapping with the others, so that the old one is freed. The runner
places a CPU model's weights, then its packed copies, whenever it lays them out
(``PagedModelRunner.set_linear_kernel``).

Only the weights: the KV pool stays on default pages, where huge pages made cold prompts slower
(each new block's first touch zeroes a whole 2 MiB page; docs/architecture.md).
"""

from __future__ import annotations

import functools
import mmap
import sys
import threading
import weakref
from collections.abc import Iterable, Iterator

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64  # every tensor on a cache line, as PyTorch's allocator puts them

# The live mappings: (start address, end address, weak reference to the mapping). Two models may
# lay out their weights at once (a prefix-cache reset in one thread, a load in another).
_arenas: list[tuple[int, int, weakref.ref]] = []
_arenas_lock = threading.Lock()


@functools.cache
def available() -> bool:
    """Whether huge pages can back the weights here: Linux with ``MADV_HUGEPAGE`` and transparent
    huge pages not set to ``never`` (``always`` or ``madvise``)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            return "[never]" not in setting.read()
    except OSError:
        return False


def placed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives in a mapping ``place_on_huge_pages`` made."""
    address = tensor.data_ptr()
    with _arenas_lock:
        return any(start <= address < end for start, end, arena in _arenas if arena() is not None)


def place_on_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Copy ``tensors`` (those on the CPU) into one new mapping on huge pages, in place
    (``tensor.data``), where any of them is not placed yet; returns how many moved. The placed
    ones move with them: a mapping is freed only when no tensor is left in it, and a few survivors
    (a model's embedding and norms, once its linear weights were laid out anew) would keep all of
    it resident. A tensor that shares its storage with another of them (a view, a slice of a fused
    weight) or does not fill it stays, as do all when fewer bytes than one huge page would move
    (there is no huge page to gain)."""
    if not available():
        return 0
    tensors = list(_movable(tensors))
    if all(placed(t) for t in tensors):
        return 0
    sizes = [-(-t.untyped_storage().nbytes() // _ALIGN) * _ALIGN for t in tensors]
    if sum(sizes) < HUGE_PAGE:
        return 0
    arena = mmap.mmap(-1, sum(sizes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = torch.frombuffer(arena, dtype=torch.uint8, count=1).data_ptr()
    start = -base % HUGE_PAGE  # the first 2 MiB boundary in the mapping
    arena.madvise(mmap.MADV_HUGEPAGE, start, len(arena) - start)
    with _arenas_lock:
        _arenas[:] = [entry for entry in _arenas if entry[2]() is not None]
        _arenas.append((base, base + len(arena), weakref.ref(arena)))
    offset = start
    for tensor, size in zip(tensors, sizes):
        slice_ = torch.frombuffer(arena, dtype=tensor.dtype, count=tensor.numel(), offset=offset)
        moved = slice_.as_strided(tensor.shape, tensor.stride())
        moved.copy_(tensor.detach())
        tensor.data = moved  # keeps the Parameter (optimizers, tied weights) and its requires_grad
        offset += size
    return len(tensors)


def _movable(tensors: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The CPU tensors (each once) that alone fill their storage."""
    unique = {id(t): t for t in tensors if t.device.type == "cpu"}
    users: dict[int, int] = {}
    for tensor in unique.values():
        key = tensor.untyped_storage().data_ptr()
        users[key] = users.get(key, 0) + 1
    for tensor in unique.values():
        storage = tensor.untyped_storage()
        dense = tensor.is_contiguous() or (tensor.dim() == 2 and tensor.t().is_contiguous())  # or input-major
        if (users[storage.data_ptr()] == 1 and dense and tensor.storage_offset() == 0 and tensor.numel() > 0
                and storage.nbytes() == tensor.numel() * tensor.element_size()):
            yield tensor
