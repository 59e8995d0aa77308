"""The command-line options that choose and load a model, shared by the ``trellis`` command,
the evaluation scripts and the benchmarks, and the argparse types that check options before a
model loads."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from trellis.cache.block_pool import check_block_size
from trellis.models.embedded import embedded_model_dir
from trellis.models.gguf_reading import gguf_parsed_once
from trellis.models.llama import TrellisLlama
from trellis.models.loading import DTYPES, choose_dtype, resolve_device
from trellis.runner import LINEAR_KERNELS


def model_directory(text: str) -> str:
    """``--model``'s check: a directory that exists (else transformers reads the name as a hub id)
    and holds a model: a ``config.json``, or a GGUF file (named with ``--gguf-file``)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no model directory {text!r}")
    if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
        raise argparse.ArgumentTypeError(f"{text!r} holds no model: neither a config.json nor a .gguf file")
    return text


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def non_negative_int(text: str) -> int:
    """An argparse type: an integer of zero or more."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer above zero."""
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be a positive integer, got 0")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (the OS wraps a larger one into that range)."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


def block_size(text: str) -> int:
    """An argparse type: a KV block size (a power of two up to 256)."""
    value = _integer(text)
    try:
        check_block_size(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def device(text: str) -> str:
    """An argparse type: ``auto`` or a device this machine has."""
    try:
        resolve_device(text)
    except ValueError as exc:  # a device this machine lacks
        raise argparse.ArgumentTypeError(str(exc)) from None
    except RuntimeError:  # torch's: a string that names no device
        raise argparse.ArgumentTypeError(f"{text!r} names no device: auto, cpu, cuda, cuda:1, mps") from None
    return text


def existing_file(text: str) -> Path:
    """An argparse type: a file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no file {text!r}")
    return path


LINEAR_KERNEL_HELP = ("what runs the linear layers on CPU in fp32 and bf16: packed (Trellis' panels, a second copy of "
                      "the weights; the default on x86 CPUs with AVX-512 and the C++ kernels built), blas (MKL; the fp32 default on other Intel CPUs) or "
                      "onednn (the fp32 default on the other x86 CPUs); without AVX-512, bf16 runs F.linear whatever the kind")


THREADS_HELP = "CPU threads of this process's kernels (default: torch's, one per core)"


def utf8_text(text: str) -> str:
    """Text for the model, refused unless it is Unicode (Python holds argv bytes that are not UTF-8
    as lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not UTF-8 text: {os.fsencode(text)!r}") from None
    return text


@contextlib.contextmanager
def command_errors(parser: argparse.ArgumentParser, name: str,
                   refusals: tuple[type[Exception], ...] = (ValueError, OSError)) -> Iterator[None]:
    """Run a command's work: a refusal (Trellis' errors name what to change) ends it with its message
    and status 2, no traceback; Ctrl-C with "interrupted" and status 130; a reader that closed the
    output (``| head``) quietly, with status 141, as a shell reports SIGPIPE."""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        sys.exit(141)
    except KeyboardInterrupt:
        parser.exit(130, f"{name}: interrupted\n")
    except refusals as exc:
        parser.exit(2, f"{name}: {exc}\n")


def add_weights_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the model's weights and tokenizer come from (``load_tokenizer``, ``check_model_arguments``)."""
    parser.add_argument("--model", type=model_directory,
                        help="a local model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--gguf-file", help="a GGUF file inside --model: its weights and tokenizer")


def add_model_arguments(parser: argparse.ArgumentParser, default_dtype: str = "auto") -> None:
    """``default_dtype``: ``"auto"`` for the command (the fastest here, ``preferred_dtype``); the
    evaluation scripts keep ``"float32"``, so that their figures do not depend on the CPU."""
    add_weights_arguments(parser)
    parser.add_argument("--keep-quantized", action="store_true",
                        help="keep the GGUF's Q8_0 / Q4_0 / Q4_1 weights quantized and run them on Trellis' "
                             "kernels (without --model: the embedded model's Q4_1 GGUF)")
    parser.add_argument("--q8-activations", action="store_true",
                        help="with --keep-quantized: round those layers' inputs to 8-bit blocks and multiply "
                             "integers, as llama.cpp does (faster without AVX-512; llama.cpp's numerics)")
    parser.add_argument("--device", default="auto", type=device, help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    parser.add_argument("--dtype", default=default_dtype, choices=["auto", *DTYPES],
                        help="default: %(default)s. auto: bfloat16 on a CPU with native bf16 dot products "
                             "(AVX512_BF16, AMX-BF16, ARM BF16), float32 on other CPUs, the checkpoint's dtype "
                             "on a GPU")
    parser.add_argument("--block-size", type=block_size, default=32, help="KV cache block size in tokens")
    parser.add_argument("--linear-kernel", choices=LINEAR_KERNELS, help=LINEAR_KERNEL_HELP)
    parser.add_argument("--threads", type=positive_int, help=THREADS_HELP)


def check_model_arguments(args: argparse.Namespace) -> None:
    """What the options' types cannot check alone; a ValueError naming the option."""
    if getattr(args, "q8_activations", False) and not args.keep_quantized:
        raise ValueError("--q8-activations rounds the inputs of layers kept quantized: add --keep-quantized")
    if args.gguf_file is not None:
        if args.model is None:
            raise ValueError("--gguf-file names a file inside --model: give --model too")
        if not (Path(args.model) / args.gguf_file).is_file():
            raise ValueError(f"--gguf-file {args.gguf_file!r}: no such file in {args.model}")
    elif args.model is not None:
        if not (Path(args.model) / "config.json").is_file():
            raise ValueError(f"--model {args.model!r} holds GGUF files but no config.json: name one with --gguf-file")
        if getattr(args, "keep_quantized", False):  # (the grid's options have none)
            raise ValueError("--keep-quantized keeps a GGUF's blocks: name the GGUF in --model with --gguf-file")


def load_tokenizer(args: argparse.Namespace) -> PreTrainedTokenizerBase:
    """The tokenizer of the model ``--model`` and ``--gguf-file`` name (the embedded one by default)."""
    if not args.gguf_file:
        return AutoTokenizer.from_pretrained(args.model or embedded_model_dir())
    try:
        return AutoTokenizer.from_pretrained(args.model, gguf_file=args.gguf_file)
    except OSError:
        raise
    except Exception as exc:  # the GGUF reader's assorted errors name neither the file nor the damage
        raise ValueError(f"cannot read a tokenizer from the GGUF file {Path(args.model) / args.gguf_file}: {exc}") from exc


def load_model(args: argparse.Namespace) -> tuple[TrellisLlama, PreTrainedTokenizerBase]:
    """The model and tokenizer that ``add_model_arguments``' options name; says which dtype and why."""
    check_model_arguments(args)
    if args.threads is not None:  # before loading, which lays out the weights on these threads
        torch.set_num_threads(args.threads)
    gguf = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    choice = choose_dtype(args.dtype, args.device)
    # The model first: its loading names a damaged file and what is wrong with a config. A GGUF's
    # tokenizer is read from the model's parse of the file.
    with gguf_parsed_once():
        model = TrellisLlama.from_pretrained(args.model, dtype=choice.dtype, device=args.device,
                                             block_size=args.block_size, linear_kernel=args.linear_kernel,
                                             keep_quantized=args.keep_quantized,
                                             q8_activations=args.q8_activations, **gguf)
        tokenizer = load_tokenizer(args)
    linears = model.linear_kernel
    if args.keep_quantized:
        linears = "GGUF blocks kept quantized" + (", inputs rounded to 8-bit blocks" if args.q8_activations else "")
    print(f"dtype {str(model.dtype).removeprefix('torch.')} (--dtype {args.dtype}: {choice.reason}); "
          f"linear layers: {linears}", flush=True)
    return model, tokenizer
