"""The embedded GGUF kept quantized, against llama.cpp on the same file: perplexity and greedy tokens.

Four systems score the same token ids (bench_peers' workers, each in its own process): Trellis
with the GGUF's Q4_1 layers and Q8_0 head kept quantized (fp32 activations), the same with those
layers' inputs rounded to 8 bits (``q8_activations``, as llama.cpp rounds them), llama.cpp on the
same file (its quantized dot products), and Trellis fp32 on the file's weights dequantized once
(the converted safetensors: the model the quantized systems approximate). Per system:

- perplexity of ``scripts/data/sample_text.txt`` (the embedded tokenizer's ids, in disjoint windows
  of at most ``--window`` tokens, each token scored given the ones before it in its window);
- greedy continuations of the demo's chat questions (``--new-tokens`` each), and how many leading
  tokens each quantized system shares with the other and with the dequantized model.

    .venv/bin/python benchmarks/bench_gguf_fidelity.py [--json PATH]   # after scripts/setup_peers.sh
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench_peers import PEERS_DIR, START_TIMEOUT, TASK_TIMEOUT, Running, peers
from common import RESULTS, ROOT, environment, markdown_table
from peers.protocol import common_prefix  # the workers' own: how many leading tokens two sequences share
from transformers import AutoTokenizer

from trellis.models.embedded import embedded_model_dir

SYSTEMS = ("trellis_gguf", "trellis_gguf_q8", "llamacpp", "trellis_fp32")
QUESTIONS = ("What is a radix tree?", "Why is the sky blue?", "Who built the first mechanical computer?",
             "How does caching make programs faster?")


def windows(tokens: list[int], size: int) -> list[list[int]]:
    return [tokens[i:i + size] for i in range(0, len(tokens), size) if len(tokens[i:i + size]) > 1]


def summarize(replies: dict[str, dict], new_tokens: int) -> dict:
    out: dict = {"perplexity": {}, "agreement": {}}
    for name, reply in replies.items():
        logprobs = [lp for window in reply["logprobs"] for lp in window]
        out["perplexity"][name] = math.exp(-sum(logprobs) / len(logprobs))
    for a, b in (("trellis_gguf", "llamacpp"), ("trellis_gguf", "trellis_fp32"), ("llamacpp", "trellis_fp32"),
                 ("trellis_gguf_q8", "llamacpp"), ("trellis_gguf_q8", "trellis_fp32")):
        if a in replies and b in replies:
            shared = [common_prefix(x, y) for x, y in zip(replies[a]["continuations"], replies[b]["continuations"])]
            out["agreement"][f"{a} / {b}"] = {"leading_tokens": shared, "identical": sum(s == new_tokens for s in shared)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per question")
    p.add_argument("--json", type=Path, default=RESULTS / "gguf_fidelity.json")
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    text = (ROOT / "scripts" / "data" / "sample_text.txt").read_text()
    texts = windows(tokenizer(text)["input_ids"], args.window)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"] for q in QUESTIONS]
    replies, infos = {}, {}
    for peer in (p for p in peers(args.threads, None, 1) if p.name in SYSTEMS):
        why = peer.unavailable()
        if why:
            raise SystemExit(f"{peer.name}: {why}")
        worker = Running(peer, args.threads, PEERS_DIR / "logs" / f"{peer.name}_fidelity.log")
        try:
            infos[peer.name] = worker.ask(START_TIMEOUT, task="info")
            replies[peer.name] = worker.ask(TASK_TIMEOUT, task="fidelity", texts=texts, prompts=prompts,
                                            max_new_tokens=args.new_tokens)
        finally:
            worker.close()
        print(f"{peer.name}: done", flush=True)
    summary = summarize(replies, args.new_tokens)
    result = {"info": environment(None, None), "systems": infos, "text_tokens": sum(len(t) for t in texts),
              "windows": len(texts), "window": args.window, "questions": list(QUESTIONS),
              "new_tokens": args.new_tokens, "replies": replies, "summary": summary}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(markdown_table(["system", "perplexity"], [[n, f"{v:.4f}"] for n, v in summary["perplexity"].items()]))
    print(markdown_table(["pair", f"leading tokens shared (of {args.new_tokens}) per question", "identical"],
                         [[pair, ", ".join(map(str, a["leading_tokens"])), str(a["identical"])]
                          for pair, a in summary["agreement"].items()]))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
