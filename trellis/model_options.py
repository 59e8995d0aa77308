"""The command-line options that choose and load a model, shared by the ``trellis`` command,
the evaluation scripts and the benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama
from trellis.models.loading import DTYPES, choose_dtype
from trellis.runner import LINEAR_KERNELS


def model_directory(text: str) -> str:
    """``--model``'s check: a directory that exists (else transformers reads the name as a hub id)
    and holds a model: a ``config.json``, or a GGUF file (the grid's ``--gguf-file``)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no model directory {text!r}")
    if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
        raise argparse.ArgumentTypeError(f"{text!r} holds no model: neither a config.json nor a .gguf file")
    return text


def add_model_arguments(parser: argparse.ArgumentParser, default_dtype: str = "auto") -> None:
    """``default_dtype``: ``"auto"`` for the command (the fastest here, ``preferred_dtype``); the
    evaluation scripts keep ``"float32"``, so that their figures do not depend on the CPU."""
    parser.add_argument("--model", type=model_directory,
                        help="a local model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    parser.add_argument("--dtype", default=default_dtype, choices=["auto", *DTYPES],
                        help="default: %(default)s. auto: bfloat16 on a CPU with native bf16 dot products "
                             "(AVX512_BF16, AMX-BF16, ARM BF16), float32 on other CPUs, the checkpoint's dtype "
                             "on a GPU")
    parser.add_argument("--block-size", type=int, default=32, help="KV cache block size in tokens")
    parser.add_argument("--linear-kernel", choices=LINEAR_KERNELS,
                        help="what runs the linear layers on CPU in fp32 and bf16: blas (the fp32 default on Intel), "
                             "onednn (the fp32 default on other x86 CPUs) or packed (a second copy of the weights; "
                             "the bf16 default on x86)")


def load_model(args: argparse.Namespace) -> tuple[TrellisLlama, PreTrainedTokenizerBase]:
    """The model and tokenizer that ``add_model_arguments``' options name; says which dtype and why."""
    path = args.model or embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    choice = choose_dtype(args.dtype, args.device)
    model = TrellisLlama.from_pretrained(path, dtype=choice.dtype, device=args.device,
                                         block_size=args.block_size, linear_kernel=args.linear_kernel)
    print(f"dtype {str(model.dtype).removeprefix('torch.')} (--dtype {args.dtype}: {choice.reason}); "
          f"linear layers: {model.linear_kernel}", flush=True)
    return model, tokenizer
