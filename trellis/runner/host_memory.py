"""Freed memory kept in the process (Linux, glibc), so that a CPU prefill's activations reuse
pages already mapped.

glibc's malloc serves an allocation above its mmap threshold with fresh pages from the kernel, and
gives the top of its heap back to the kernel once more than its trim threshold is free there; both
thresholds start low (128 and 256 KiB) and rise only as such blocks are freed. A prefill allocates
and frees activations of a few MiB, layer after layer, so their pages keep going back to the
kernel and coming back zeroed, one minor fault each: 10-12 thousand faults in each cold 512-token
SmolLM2 prompt on a 2-core AMX Xeon, 161-165 ms a prompt in bf16. With both thresholds fixed high
(``mallopt``: mmap only above 32 MiB, glibc's largest; no trimming below 1 GiB free), a prompt
after the first faults no page in: 134 ms (fp32 376 → 372 ms; decode steps fault nothing either way).

The price: the process keeps the memory its largest step freed, as a caching allocator would,
instead of giving it back. Process-wide, done once, when a model's weights are laid out on the
CPU (``PagedModelRunner``); ``TRELLIS_KEEP_FREED_MEMORY=0`` leaves malloc as it is. Without glibc
(macOS, musl) nothing changes. ``give_back_freed_memory`` returns it at once where a process
is done with a large load (a grid stage that cut its layers out of a whole model).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 1 << 30  # (mallopt takes an int)


@functools.cache
def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds high, once a process; whether they are set."""
    if os.environ.get("TRELLIS_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # (Setting either one also stops glibc raising both as blocks are freed: set both.)
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def give_back_freed_memory() -> None:
    """Return the heap's free memory to the kernel now (glibc's ``malloc_trim``); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
