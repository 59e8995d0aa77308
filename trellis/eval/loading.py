"""The model options of the evaluation scripts and benchmarks: the shared ones, plus batching."""

from __future__ import annotations

import argparse

from trellis import model_options
from trellis.model_options import command_errors, existing_file, load_model, non_negative_int, positive_int

__all__ = ["add_model_arguments", "command_errors", "existing_file", "load_model", "non_negative_int", "positive_int"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    model_options.add_model_arguments(parser, default_dtype="float32")
    parser.add_argument("--max-batch-tokens", type=positive_int, default=2048,
                        help="new tokens packed into one forward")
