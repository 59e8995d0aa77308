"""The ``trellis`` command: ``trellis demo`` runs a short chat on the embedded model and shows
the prefix cache at work (time to first token, prompt and cached tokens, hit rate); ``trellis
serve`` serves a model over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from trellis.model_options import add_model_arguments, load_model
from trellis.models.embedded import EMBEDDED_NAME
from trellis.serve import ServeConfig, serve

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
    if args.prefix_cache and Path(args.prefix_cache).is_file():
        blocks = model.load_prefix_cache(args.prefix_cache)
        print(f"warm start: {blocks} cached blocks loaded from {args.prefix_cache}")
    print()
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for question in args.questions or QUESTIONS:
        messages.append({"role": "user", "content": question})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"].to(model.device)
        hits_before = model.prefix_cache.stats()["hit_tokens"]
        timer = FirstTokenTimer()
        start = time.perf_counter()
        output = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=timer,
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
    if args.prefix_cache:
        blocks = model.save_prefix_cache(args.prefix_cache)
        print(f"saved {blocks} cached blocks to {args.prefix_cache}: the next run starts warm")


def parse_bytes(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1.5G`` or a plain number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    number = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(number[-1:], 1)
    try:
        value = float(number[:-1] if scale > 1 else number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r} (e.g. 2GiB, 512MiB, 1000000)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return int(value)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The server settings the options give (checked before the model loads)."""
    return ServeConfig(
        model_name=args.served_model_name or (Path(args.model).name if args.model else EMBEDDED_NAME),
        api_key=args.api_key, max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens, default_max_tokens=args.default_max_tokens, max_n=args.max_n,
        max_batch_tokens=args.max_batch_tokens, max_running=args.max_running, max_waiting=args.max_waiting)


def run_serve(args: argparse.Namespace, config: ServeConfig) -> None:
    model, tokenizer = load_model(args)
    if args.num_blocks is not None or args.kv_cache_memory is not None:
        model.configure_cache(block_size=args.block_size, num_blocks=args.num_blocks,
                              kv_cache_memory=args.kv_cache_memory)
    cache = model.prefix_cache
    print(f"serving {config.model_name} on http://{args.host}:{args.port}/v1 ({model.device}, {model.dtype}, "
          f"{cache.pool.num_blocks} KV blocks of {cache.block_size} tokens)", flush=True)
    serve(model, tokenizer, config, host=args.host, port=args.port, log_level=args.log_level)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeConfig()
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API call")
    parser.add_argument("--served-model-name", help="the model id clients use (default: the model directory's name)")
    parser.add_argument("--num-blocks", type=int, help="KV pool size in blocks (default: from --kv-cache-memory)")
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
    parser.add_argument("--max-n", type=int, default=defaults.max_n, help="most choices per prompt")
    parser.add_argument("--max-body-bytes", type=parse_bytes, default=defaults.max_body_bytes)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trellis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="chat with the embedded model and watch the prefix cache")
    add_model_arguments(demo)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--questions", nargs="*", help="user questions, asked in turn")
    demo.add_argument("--prefix-cache", metavar="FILE",
                      help="load cached prefixes from FILE if it exists, and save them there at the end")
    server = commands.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                                 description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                                             "/v1/completions, /v1/models, /health, /metrics) until interrupted. "
                                             "Concurrent clients share one engine and its prefix cache.")
    add_model_arguments(server)
    add_serve_arguments(server)
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args)
    elif args.command == "serve":
        try:
            config = serve_config(args)
        except ValueError as exc:
            server.error(str(exc))
        run_serve(args, config)


if __name__ == "__main__":
    main()
