"""Continuous batching: many sessions of one model served together, one packed forward per step."""

from trellis.engine.engine import Engine
from trellis.engine.sampling import SamplingParams
from trellis.engine.session import Session, TrellisGenerationOutput

__all__ = ["Engine", "SamplingParams", "Session", "TrellisGenerationOutput"]
