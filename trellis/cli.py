"""The ``trellis`` command: ``trellis demo`` runs a short chat on the embedded model and shows
the prefix cache at work (time to first token, prompt and cached tokens, hit rate)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from trellis.model_options import add_model_arguments, load_model

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trellis", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="chat with the embedded model and watch the prefix cache")
    add_model_arguments(demo)
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--questions", nargs="*", help="user questions, asked in turn")
    demo.add_argument("--prefix-cache", metavar="FILE",
                      help="load cached prefixes from FILE if it exists, and save them there at the end")
    args = parser.parse_args(argv)
    if args.command == "demo":
        run_demo(args)


if __name__ == "__main__":
    main()
