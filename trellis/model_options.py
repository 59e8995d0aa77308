"""The command-line options that choose and load a model, shared by the ``trellis`` command,
the evaluation scripts and the benchmarks."""

from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama
from trellis.runner import LINEAR_KERNELS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="a local model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--block-size", type=int, default=32, help="KV cache block size in tokens")
    parser.add_argument("--linear-kernel", choices=LINEAR_KERNELS,
                        help="what runs the linear layers on CPU in fp32: blas, onednn (the default on x86) or "
                             "packed (faster again; a second copy of the weights)")


def load_model(args: argparse.Namespace) -> tuple[TrellisLlama, PreTrainedTokenizerBase]:
    """The model and tokenizer that ``add_model_arguments``' options name."""
    path = args.model or embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = TrellisLlama.from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device,
                                         block_size=args.block_size, linear_kernel=args.linear_kernel)
    return model, tokenizer
