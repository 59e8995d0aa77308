"""The ``trellis`` command: ``trellis demo`` runs a short chat on the embedded model and shows
the prefix cache at work (time to first token, prompt and cached tokens, hit rate); ``trellis
serve`` serves a model over an OpenAI-compatible HTTP API; ``trellis grid`` serves one model from
several processes or machines, each holding a range of its layers."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from trellis.cache.block_pool import OutOfBlocksError
from trellis.cache.persist import PrefixCacheFileError, check_save_path
from trellis.engine import Engine, SamplingParams
from trellis.grid import (
    Endpoint,
    GridError,
    GridOptions,
    GridRunner,
    LocalGrid,
    run_stage,
    shared_host_environment,
    start_coordinator,
    start_stage,
)
from trellis.grid.local import trellis_command, trellis_environment
from trellis.model_options import (
    LINEAR_KERNEL_HELP,
    THREADS_HELP,
    add_model_arguments,
    add_weights_arguments,
    block_size,
    check_model_arguments,
    command_errors,
    device,
    load_model,
    load_tokenizer,
    port_number,
    positive_int,
    utf8_text,
)
from trellis.models.embedded import EMBEDDED_NAME
from trellis.models.llama import TrellisLlama
from trellis.models.loading import DTYPES
from trellis.runner import LINEAR_KERNELS
from trellis.serve import ServeConfig, serve
from trellis.serve.server import check_address
from trellis.utils import package_version

SYSTEM_PROMPT = (
    "You are Trellis, a concise assistant running entirely on the user's own computer. "
    "Answer in two or three short sentences. Be factual and friendly. If you are not sure, say so. "
    "Never invent citations. Prefer plain words over jargon, and give one concrete example when it helps. "
    "The user is curious about science, history and how computers work."
)
QUESTIONS = (
    "What is a radix tree?",
    "Why is the sky blue?",
    "Who built the first mechanical computer?",
    "How does caching make programs faster?",
)


class FirstTokenTimer(BaseStreamer):
    """Records when ``generate()`` emits its first new token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def run_demo(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    model, tokenizer = load_model(args)
    print(f"loaded {model.name_or_path} on {model.device} ({model.dtype}, {model.attention_backend()} kernels, "
          f"block size {args.block_size}) in {time.perf_counter() - started:.1f} s")
    if args.prefix_cache:
        load_saved_prefixes(model, args.prefix_cache)
    print()
    try:
        chat(model, tokenizer, args.questions or QUESTIONS, args.max_new_tokens)
    finally:  # an interrupted chat keeps what it computed too
        if args.prefix_cache:
            save_prefixes(model, args.prefix_cache)


def load_saved_prefixes(model: TrellisLlama, path: str) -> None:
    """A warm start from the prefix cache saved at ``path``, if there is one. A file of another
    model, dtype or block size, or of more blocks than this pool holds, starts cold instead (and
    is saved over at the end)."""
    if not Path(path).is_file():
        return
    try:
        blocks = model.load_prefix_cache(path)
        print(f"warm start: {blocks} cached blocks loaded from {path}", flush=True)
    except (PrefixCacheFileError, OutOfBlocksError) as exc:
        print(f"cold start: {exc}", flush=True)


def save_prefixes(model: TrellisLlama, path: str) -> None:
    blocks = model.save_prefix_cache(path)
    print(f"saved {blocks} cached blocks to {path}: the next run starts warm", flush=True)


def chat(model: TrellisLlama, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], max_new_tokens: int) -> None:
    """The demo's conversation: each question asked after the ones before and their answers, with
    the time to the first token and the prefix-cache hits it had."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for question in questions:
        messages.append({"role": "user", "content": question})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"].to(model.device)
        hits_before = model.prefix_cache.stats()["hit_tokens"]
        timer = FirstTokenTimer()
        start = time.perf_counter()
        output = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, streamer=timer,
                                pad_token_id=tokenizer.eos_token_id)
        elapsed = time.perf_counter() - start
        stats = model.prefix_cache.stats()
        answer = tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": answer})
        new_tokens = output.shape[1] - prompt.shape[1]
        print(f"user: {question}\nassistant: {answer}")
        print(f"  [ttft {1000 * (timer.first_token_at - start):.0f} ms | prompt {prompt.shape[1]} tokens, "
              f"cached {stats['hit_tokens'] - hits_before} | {new_tokens} new tokens in {elapsed:.2f} s | "
              f"cache hit rate so far {stats['hit_rate']:.0%}, {stats['cached_blocks']} blocks cached]\n")


def parse_bytes(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1.5G`` or a plain number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    number = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(number[-1:], 1)
    try:
        value = float(number[:-1] if scale > 1 else number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 2GiB, 512MiB, 1000000)") from None
    if not math.isfinite(value) or value < 1 or not value.is_integer():
        raise argparse.ArgumentTypeError(f"a size must be a positive, whole number of bytes, got {text!r}")
    return int(value)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The server settings the options give (checked before the model loads)."""
    return ServeConfig(
        model_name=args.served_model_name or (Path(os.path.abspath(args.model)).name if args.model else EMBEDDED_NAME),
        api_key=args.api_key, max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens, max_n=args.max_n,
        max_batch_tokens=args.max_batch_tokens, max_running=args.max_running, max_waiting=args.max_waiting)


def run_serve(args: argparse.Namespace, config: ServeConfig) -> None:
    model, tokenizer = load_model(args)
    if args.num_blocks is not None or args.kv_cache_memory is not None:
        model.configure_cache(block_size=args.block_size, num_blocks=args.num_blocks,
                              kv_cache_memory=args.kv_cache_memory)
    if args.prefix_cache:
        load_saved_prefixes(model, args.prefix_cache)
    cache = model.prefix_cache
    print(f"serving {config.model_name} on http://{args.host}:{args.port}/v1 ({model.device}, {model.dtype}, "
          f"{cache.pool.num_blocks} KV blocks of {cache.block_size} tokens)", flush=True)
    try:
        serve(model, tokenizer, config, host=args.host, port=args.port, log_level=args.log_level)
    finally:  # after the shutdown, which ends every request
        if args.prefix_cache:
            save_prefixes(model, args.prefix_cache)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeConfig()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=port_number, default=8000)
    parser.add_argument("--api-key", type=utf8_text, help="require 'Authorization: Bearer KEY' on every API call")
    parser.add_argument("--served-model-name", type=utf8_text,
                        help="the model id clients use (default: the model directory's name)")
    parser.add_argument("--num-blocks", type=positive_int, help="KV pool size in blocks (default: from --kv-cache-memory)")
    parser.add_argument("--kv-cache-memory", type=parse_bytes,
                        help="KV pool size in bytes, e.g. 2GiB (default: a quarter of free RAM up to 4 GiB; half "
                             "of a CUDA device's free memory)")
    parser.add_argument("--max-batch-tokens", type=int, default=defaults.max_batch_tokens,
                        help="tokens per engine step; longer prompts are prefilled in chunks")
    parser.add_argument("--max-running", type=int, default=defaults.max_running, help="sessions decoding at once")
    parser.add_argument("--max-waiting", type=int, default=defaults.max_waiting,
                        help="queued requests; beyond them clients get 503 with Retry-After")
    parser.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens,
                        help="max_tokens of chat requests that give none")
    parser.add_argument("--max-n", type=int, default=defaults.max_n,
                        help="most choices per prompt (and at most --max-running: they run at once)")
    parser.add_argument("--max-body-bytes", type=parse_bytes, default=defaults.max_body_bytes)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


# --- trellis grid ------------------------------------------------------------------------------

def add_grid_arguments(parser: argparse.ArgumentParser, pool_options: bool = True) -> None:
    """The options every rank of a grid takes (``GridOptions``), and where the rank sits."""
    defaults = GridOptions()
    add_weights_arguments(parser)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", *DTYPES],
                        help="default: %(default)s. auto: each stage chooses for its own device (bf16 on a CPU "
                             "with native bf16 dot products, else fp32; the checkpoint's dtype on CUDA), and "
                             "stages that choose differently are refused at start")
    parser.add_argument("--device", default=defaults.device, type=device,
                        help="auto (CUDA, then MPS, then CPU: refused on a Mac, whose auto is MPS), cpu, cuda: the grid "
                             "does not run on MPS (on a Mac, give cpu)")
    parser.add_argument("--block-size", type=block_size, default=defaults.block_size, help="KV cache block size in tokens")
    if pool_options:
        parser.add_argument("--num-blocks", type=int, help="KV pool size in blocks, on every stage (default: what "
                                                            "every stage's --kv-cache-memory holds)")
        parser.add_argument("--kv-cache-memory", type=parse_bytes, help="KV bytes per stage, e.g. 1GiB")
    parser.add_argument("--linear-kernel", choices=LINEAR_KERNELS, help=LINEAR_KERNEL_HELP)
    parser.add_argument("--layers", help="each stage's layers, e.g. 0-10,11-29 (default: in proportion to each "
                                         "stage's free memory, the embedding and LM head counted on stage 0)")
    parser.add_argument("--micro-batches", type=int, help="steps in flight at once (default: one per machine of the grid)")
    parser.add_argument("--threads", type=positive_int, help=THREADS_HELP)
    parser.add_argument("--step-timeout", type=float, default=defaults.step_timeout,
                        help="seconds a step may take on the other stages before the grid fails")
    parser.add_argument("--start-timeout", type=float, default=defaults.start_timeout,
                        help="seconds to wait for every stage to join and load")
    where = parser.add_argument_group("where this rank sits (default: torchrun's environment, else rank 0)")
    where.add_argument("--stages", type=int, help="start a grid of this many processes on this machine")
    where.add_argument("--rank", type=int, help="this process's place: 0, the coordinator (serve and generate "
                                                "take it by default), or a stage, 1 to --world-size - 1")
    where.add_argument("--world-size", type=int, help="stages in the grid, on all machines")
    where.add_argument("--master-addr", default="127.0.0.1", help="the coordinator's address (rank 0)")
    where.add_argument("--master-port", type=port_number, default=29500)


def grid_options(args: argparse.Namespace) -> GridOptions:
    names = GridOptions.__dataclass_fields__
    return GridOptions(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def grid_endpoint(args: argparse.Namespace) -> Endpoint:
    """Where this process sits: rank 0 of ``--stages`` on this machine; ``--world-size`` with
    ``--rank`` (0, the coordinator, by default for serve and generate); else torchrun's
    environment. A stage (``trellis grid stage``) has a rank of 1 or more."""
    stage = args.grid_command == "stage"
    if args.stages is not None:
        if stage or args.rank is not None or args.world_size is not None:
            raise ValueError("--stages starts a whole grid on this machine from serve or generate, without --rank "
                             "and --world-size")
        return Endpoint(0, args.stages, "127.0.0.1", args.master_port)
    if args.rank is not None or args.world_size is not None:
        if args.world_size is None:
            raise ValueError("--rank needs --world-size: the stages in the grid, on all machines")
        if args.rank is None and stage:
            raise ValueError("trellis grid stage needs --rank: 1 to --world-size - 1")
        endpoint = Endpoint(args.rank or 0, args.world_size, args.master_addr, args.master_port)
    else:
        endpoint = Endpoint.from_env()
        if endpoint is None:
            raise ValueError("where is this rank? give --stages N (one machine), --world-size (and a stage's --rank), "
                             "or launch with torchrun")
    if stage and endpoint.rank == 0:
        raise ValueError("rank 0 is the coordinator: run 'trellis grid serve' or 'trellis grid generate' there; "
                         "a stage has rank 1 or more")
    return endpoint


@contextlib.contextmanager
def grid_coordinator(args: argparse.Namespace) -> Iterator[GridRunner | None]:
    """This process's part of the grid: the coordinator's runner, or None after serving as a stage
    (a rank other than 0 under torchrun or --rank)."""
    options, endpoint = grid_options(args), grid_endpoint(args)
    if endpoint.rank != 0:
        code = run_stage(start_stage(options, endpoint))
        yield None
        sys.exit(code)
    if args.stages is not None:
        with LocalGrid(options, args.stages, port=endpoint.master_port) as runner:
            yield runner
        return
    runner = start_coordinator(options, endpoint)
    try:
        yield runner
    finally:
        runner.close()


def run_grid_generate(args: argparse.Namespace) -> None:
    with grid_coordinator(args) as runner:
        if runner is None:
            return
        print(runner.placement.describe(), flush=True)
        tokenizer = load_tokenizer(args)
        engine = Engine(runner)
        stops = SamplingParams.from_generation_config(runner.model.generation_config).stop_token_ids
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for question in args.questions or QUESTIONS:
            prompt = tokenizer.apply_chat_template(messages + [{"role": "user", "content": question}],
                                                   add_generation_prompt=True, return_dict=False)
            started = time.perf_counter()
            session = engine.add(prompt, SamplingParams(max_new_tokens=args.max_new_tokens, stop_token_ids=stops))
            engine.run()
            elapsed = time.perf_counter() - started
            if session.error is not None:
                raise SystemExit(f"trellis grid: the request failed: {session.error}")
            answer = tokenizer.decode(session.generated, skip_special_tokens=True).strip()
            print(f"user: {question}\nassistant: {answer}\n  [{len(prompt)} prompt tokens, "
                  f"{session.num_cached_tokens} cached | {len(session.generated)} new tokens in {elapsed:.2f} s]",
                  flush=True)


def run_grid_serve(args: argparse.Namespace, config: ServeConfig) -> None:
    with grid_coordinator(args) as runner:
        if runner is None:
            return
        tokenizer = load_tokenizer(args)
        print(runner.placement.describe(), flush=True)
        print(f"serving {config.model_name} on http://{args.host}:{args.port}/v1 from a grid of "
              f"{runner.link.world_size} stages ({runner.model.dtype}, {runner.settings.num_blocks} KV blocks of "
              f"{runner.settings.block_size} tokens)", flush=True)
        serve(runner.model, tokenizer, config, host=args.host, port=args.port, log_level=args.log_level,
              stop_when=lambda: runner.failure is not None)
        if runner.failure is not None:
            raise SystemExit(f"trellis grid: the grid failed: {runner.failure}")


def add_grid_parser(commands: argparse._SubParsersAction) -> None:
    grid = commands.add_parser(
        "grid", help="one model served by several processes or machines, each holding a range of layers",
        description="Run one model over a grid of stages (torch.distributed: gloo on CPU, NCCL on CUDA). "
                    "One machine: 'trellis grid serve --stages 2'. Several: rank 0 runs 'trellis grid serve "
                    "--world-size W --master-addr ADDR', every other machine 'trellis grid stage --rank R "
                    "--world-size W --master-addr ADDR' with the same model options; or launch either with torchrun.")
    commands_of_grid = grid.add_subparsers(dest="grid_command", required=True)
    server = commands_of_grid.add_parser("serve", help="serve the grid over the OpenAI-compatible HTTP API")
    add_grid_arguments(server, pool_options=False)
    add_serve_arguments(server)
    generate = commands_of_grid.add_parser("generate", help="answer a few chat questions on the grid")
    add_grid_arguments(generate)
    generate.add_argument("--max-new-tokens", type=positive_int, default=48)
    generate.add_argument("--questions", nargs="*", type=utf8_text,
                          help="user questions, each asked after the system prompt")
    stage = commands_of_grid.add_parser("stage", help="serve one stage (rank >= 1) until the coordinator stops")
    add_grid_arguments(stage)


def run_grid(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with command_errors(parser, "trellis grid", (ValueError, OSError, GridError)):
        try:
            check_model_arguments(args)
            if args.grid_command == "stage":
                sys.exit(run_stage(start_stage(grid_options(args), grid_endpoint(args))))
            if args.grid_command == "generate":
                run_grid_generate(args)
            else:
                config = serve_config(args)
                if grid_endpoint(args).rank == 0:  # before any stage starts; a stage (torchrun's rank > 0) serves no HTTP
                    check_address(args.host, args.port)
                run_grid_serve(args, config)
        except torch.distributed.DistNetworkError as exc:  # the rendezvous port, most often
            raise OSError(f"cannot open the rendezvous at --master-addr {args.master_addr} --master-port "
                          f"{args.master_port}: {str(exc).splitlines()[0]}") from None


def check_prefix_cache_option(parser: argparse.ArgumentParser, path: str | None) -> None:
    """``--prefix-cache``: saved at the end, so checked before anything runs."""
    if not path:
        return
    try:
        check_save_path(path)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(f"--prefix-cache {path}: no file can be saved there ({exc})")


def restart_with_short_spin() -> None:
    """Run this command again in a fresh process with a short OpenMP spin, since its stages will
    share the machine (``shared_host_environment``); libgomp read the setting when torch loaded."""
    environ = shared_host_environment()
    if environ != os.environ:
        sys.stdout.flush()
        os.execve(sys.executable, trellis_command(*sys.argv[1:]), trellis_environment(environ))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trellis", description=__doc__)
    parser.add_argument("--version", action="version", version=f"trellis {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="chat with the embedded model and watch the prefix cache")
    add_model_arguments(demo)
    demo.add_argument("--max-new-tokens", type=positive_int, default=48)
    demo.add_argument("--questions", nargs="*", type=utf8_text, help="user questions, asked in turn")
    demo.add_argument("--prefix-cache", metavar="FILE",
                      help="load cached prefixes from FILE if it exists, and save them there at the end")
    server = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                                 description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                                             "/v1/completions, /v1/models, /health, /metrics) until interrupted. "
                                             "Concurrent clients share one engine and its prefix cache.")
    add_model_arguments(server)
    add_serve_arguments(server)
    server.add_argument("--prefix-cache", metavar="FILE",  # (not a grid's: its stages hold the K/V)
                        help="load cached prefixes from FILE at start if it exists, and save them there at shutdown")
    add_grid_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "demo":
        check_prefix_cache_option(demo, args.prefix_cache)
        with command_errors(demo, "trellis demo"):
            run_demo(args)  # (load_model checks the model options first)
    elif args.command == "serve":
        check_prefix_cache_option(server, args.prefix_cache)
        try:
            config = serve_config(args)
            check_model_arguments(args)
            check_address(args.host, args.port)  # before the model loads
        except (ValueError, OSError) as exc:
            server.error(str(exc))
        with command_errors(server, "trellis serve"):
            run_serve(args, config)
    elif args.command == "grid":
        if argv is None and args.grid_command != "stage" and args.stages:
            restart_with_short_spin()
        run_grid(args, parser)


if __name__ == "__main__":
    main()
