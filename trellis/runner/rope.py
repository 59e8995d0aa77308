"""What kind of RoPE a model runs, as its rotary embedding names it (``rope_type``): the kinds that
Trellis must treat apart (dynamic and LongRoPE change their frequencies with the positions)."""

from __future__ import annotations

import torch


def rope_types(model: torch.nn.Module) -> frozenset[str]:
    """The ``rope_type`` of ``model.model.rotary_emb`` (per layer type where transformers keeps a
    dict of them; "default" where the module names none, a wrapped or replaced one)."""
    rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
    return frozenset(rope_type.values() if isinstance(rope_type, dict) else [rope_type])


def dynamic_rope(model: torch.nn.Module) -> bool:
    """Whether the frequencies follow the longest position seen (``dynamic``, ``llama3``'s dynamic
    variants): transformers rescales them for a whole forward past the model's positions."""
    return any("dynamic" in kind for kind in rope_types(model))


def long_rope(model: torch.nn.Module) -> bool:
    """Whether the model runs LongRoPE, whose frequencies switch past ``original_max_position_embeddings``."""
    return "longrope" in rope_types(model)
