"""The model options of the evaluation scripts and benchmarks: the shared ones, plus batching."""

from __future__ import annotations

import argparse

from trellis import model_options
from trellis.model_options import load_model

__all__ = ["add_model_arguments", "load_model", "non_negative_int", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse type: an integer above zero."""
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be a positive integer, got 0")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of zero or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    model_options.add_model_arguments(parser, default_dtype="float32")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=2048,
                        help="new tokens packed into one forward")
