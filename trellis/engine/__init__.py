"""Continuous batching: many sessions of one model served together, one packed forward per step."""

from trellis.engine.engine import Engine, QueueFullError
from trellis.engine.sampling import SamplingParams
from trellis.engine.scheduler import Scheduler
from trellis.engine.session import Session, TokenLogprobs, TrellisGenerationOutput

__all__ = ["Engine", "QueueFullError", "SamplingParams", "Scheduler", "Session", "TokenLogprobs", "TrellisGenerationOutput"]
