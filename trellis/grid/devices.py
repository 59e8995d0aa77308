"""Which device each stage of a grid runs on, and the devices a grid cannot use.

On CUDA every stage needs a GPU of its own (NCCL refuses two ranks on one GPU): a plain
``--device cuda`` gives stage ``LOCAL_RANK`` (torchrun sets it; ``LocalGrid`` gives each of its
stages its rank) ``cuda:LOCAL_RANK``. MPS is refused: off CUDA the grid's transport is gloo, which
sends CPU tensors only.
"""

from __future__ import annotations

import os

import torch

from trellis.models.loading import device_named, resolve_device


def check_grid_device(device: str) -> None:
    """Refuse a ``--device`` that no stage of a grid can run on (``"auto"`` where it picks MPS too)."""
    try:
        named = device_named(device)
    except RuntimeError as exc:  # torch's own message for a string that names no device
        raise ValueError(f"--device {device!r} names no device: {exc}") from None
    if named.type == "mps":
        raise ValueError("the grid cannot run on MPS (--device mps, or auto on a Mac): off CUDA its stages talk "
                         "over gloo, which sends CPU tensors only; use --device cpu")


def stage_device(device: str) -> torch.device:
    """This stage's device, made current (NCCL and the Triton launches use the current CUDA device)."""
    chosen = resolve_device(device)
    if chosen.type != "cuda":
        return chosen
    if chosen.index is None:
        chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    count = torch.cuda.device_count()
    if chosen.index >= count:
        raise ValueError(f"this stage would run on {chosen} (--device {device}, LOCAL_RANK "
                         f"{os.environ.get('LOCAL_RANK', 'unset')}), and this machine has {count} CUDA devices")
    torch.cuda.set_device(chosen)
    return chosen


def check_local_stages(device: str, stages: int) -> None:
    """Refuse, before any stage starts, ``stages`` processes on this machine that cannot have a
    GPU each: one named GPU for all of them, or more CUDA stages than GPUs."""
    chosen = resolve_device(device)
    if chosen.type != "cuda":
        return
    if chosen.index is not None:
        raise ValueError(f"--device {device} would put all {stages} stages on one GPU, which NCCL refuses; "
                         "give --device cuda (stage r runs on cuda:r)")
    count = torch.cuda.device_count()
    if stages > count:
        raise ValueError(f"{stages} stages on CUDA need a GPU each, and this machine has {count}; "
                         f"start at most {count} (--stages), or run the grid on --device cpu")
