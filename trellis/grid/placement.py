"""Which decoder layers each stage of a grid holds.

Stage 0 (the coordinator) also holds the token embedding and the LM head (one tensor when the
model ties them), the last stage the final norm. A placement is either given (``--layers
0-10,11-29``) or split in proportion to each stage's free memory, counting the embedding and
head as stage 0's weights (exo's memory-weighted split): equal machines get equal shares of the
weights, not of the layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """``ranges[r]``: the layers stage ``r`` holds, contiguous and in order, covering the model."""

    ranges: tuple[range, ...]

    def __post_init__(self) -> None:
        expected = 0
        for r, layers in enumerate(self.ranges):
            if len(layers) == 0 or layers.start != expected or layers.step != 1:
                raise ValueError(f"stage {r} must hold a non-empty range of layers starting at layer {expected}, "
                                 f"got {describe_range(layers)}")
            expected = layers.stop

    @property
    def num_layers(self) -> int:
        return self.ranges[-1].stop

    def spec(self) -> str:
        """The ``--layers`` form: ``0-10,11-29``."""
        return ",".join(describe_range(layers) for layers in self.ranges)

    def describe(self) -> str:
        lines = []
        for r, layers in enumerate(self.ranges):
            extras = (["embedding", "lm_head"] if r == 0 else []) + (["final norm"] if r == len(self.ranges) - 1 else [])
            lines.append(f"stage {r}: layers {describe_range(layers)} ({len(layers)})"
                         + (f" + {', '.join(extras)}" if extras else ""))
        return "\n".join(lines)


def describe_range(layers: range) -> str:
    return f"{layers.start}-{layers.stop - 1}" if len(layers) else "none"


def parse_layers(spec: str, num_layers: int, num_stages: int) -> Placement:
    """``"0-10,11-29"`` (one inclusive range per stage, in order) for a model of ``num_layers``."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != num_stages:
        raise ValueError(f"--layers {spec!r} names {len(parts)} stages, the grid has {num_stages}")
    ranges = []
    for part in parts:
        first, sep, last = part.partition("-")
        try:
            start, stop = int(first), int(last if sep else first) + 1
        except ValueError:
            raise ValueError(f"--layers: {part!r} is not a range of layers like 0-14") from None
        if stop > num_layers:  # named before Placement's own checks, which would blame the next stage
            raise ValueError(f"--layers: stage {len(ranges)}'s {part!r} goes past the model's last layer, "
                             f"{num_layers - 1}")
        ranges.append(range(start, stop))
    placement = Placement(tuple(ranges))
    if placement.num_layers != num_layers:
        raise ValueError(f"--layers {spec!r} covers layers 0-{placement.num_layers - 1}; the model has {num_layers} "
                         f"(0-{num_layers - 1})")
    return placement


def split_by_memory(num_layers: int, layer_bytes: int, head_bytes: int, memories: Sequence[int]) -> Placement:
    """Give stage ``r`` a share of the weights proportional to ``memories[r]`` (bytes free):
    ``head_bytes`` (embedding and LM head) on stage 0, ``layer_bytes`` per decoder layer, at least
    one layer per stage."""
    if len(memories) > num_layers:
        raise ValueError(f"{len(memories)} stages for {num_layers} layers: each stage needs a layer")
    if any(m <= 0 for m in memories):
        raise ValueError(f"every stage needs free memory, got {list(memories)}")
    total = head_bytes + num_layers * layer_bytes
    ranges, start, held, mem_before = [], 0, head_bytes, 0
    for r, memory in enumerate(memories):
        mem_before += memory
        target = total * mem_before / sum(memories)  # the weights stages 0..r should hold together
        stages_after = len(memories) - r - 1
        stop = start + 1  # at least one layer here
        while stop < num_layers - stages_after and held + (stop - start + 1) * layer_bytes <= target + layer_bytes / 2:
            stop += 1
        if stages_after == 0:
            stop = num_layers
        held += (stop - start) * layer_bytes
        ranges.append(range(start, stop))
        start = stop
    return Placement(tuple(ranges))
