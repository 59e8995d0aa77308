"""Multiple-choice scoring: Trellis against per-request transformers and lm-eval's HF backend.

Workloads, from the sample data in scripts/data (every answer scored as " " + choice):
  reading-1q   the first question of each passage in reading_mc.jsonl: 4 answers over one
               ~480-token context, no context shared between questions
  reading      all 12 questions, 4 per passage: the passage is shared across questions too
  fewshot-K    trivia_mc.jsonl questions behind one shared K-shot prefix (--fewshot K)
Backends, same weights (SmolLM2-135M-Instruct by default, fp32):
  plain        LlamaForCausalLM (sdpa), one forward per request over its context and
               continuation, logits only where the continuation is scored
  plain-batched  the same, --batch-size requests per forward: sorted by length (longest first),
               right-padded under an attention mask, the LM head only where continuations are scored
  lm-eval-hf   lm-eval's HFLM (batch_size 1, its default) on the same Instance objects
  lm-eval-hf-batched  HFLM with batch_size=--batch-size (these workloads are not rolling, which
               is where lm-eval's batching has its known bug)
  trellis      trellis.eval.loglikelihood with an empty prefix cache; "trellis-warm" repeats
               it with the contexts still cached (a second task over the same documents)
Each time is the best of --repeats interleaved runs (the machine may be shared). "tokens" is
what ran through the model; "max |dlogp|" and "greedy" compare each backend's results with plain's.

    python benchmarks/bench_eval.py [--repeats 3] [--fewshot 10] [--workloads reading-1q ...]
                                    [--batch-size 8] [--skip-lm-eval] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import describe
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from trellis.eval import loglikelihood
from trellis.eval.loading import add_model_arguments, load_model
from trellis.eval.multiple_choice import choice_requests, fewshot_prefix, read_questions
from trellis.eval.requests import encode_pair
from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama

DATA = Path(__file__).resolve().parents[1] / "scripts" / "data"
Scores = list[tuple[float, bool]]


def workloads(fewshot: int) -> dict[str, list[tuple[str, str]]]:
    reading = read_questions(DATA / "reading_mc.jsonl")
    trivia = read_questions(DATA / "trivia_mc.jsonl")
    return {
        "reading-1q": choice_requests(reading[::4]),
        "reading": choice_requests(reading),
        f"fewshot-{fewshot}": choice_requests(trivia[fewshot:], fewshot_prefix(trivia[:fewshot])),
    }


def score(logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """Log-likelihood of ``continuation`` under ``logits`` ([C, V], one row per continuation token), and
    whether it is the greedy continuation."""
    target = torch.tensor(continuation, device=logits.device)
    logprobs = torch.log_softmax(logits.float(), -1).gather(1, target[:, None])  # [C, 1]
    return logprobs.sum().item(), bool((logits.argmax(-1) == target).all())


def plain_backend(ref: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, counter: list[int]):
    def run(requests: list[tuple[str, str]]) -> Scores:
        scores = []
        with torch.inference_mode():
            for context, continuation in (encode_pair(tokenizer, *r) for r in requests):
                ids = context + continuation[:-1]
                counter[0] += len(ids)
                logits = ref(torch.tensor([ids], device=ref.device), logits_to_keep=len(continuation)).logits[0]
                scores.append(score(logits, continuation))  # logits: [C, V]
        return scores
    return run


def plain_batched_backend(ref: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, counter: list[int],
                          batch_size: int):
    """``batch_size`` requests per forward, longest first (so a batch pads little), right-padded under an
    attention mask; the LM head runs only on the positions that score a continuation token."""
    def run(requests: list[tuple[str, str]]) -> Scores:
        encoded = [encode_pair(tokenizer, *r) for r in requests]
        order = sorted(range(len(encoded)), key=lambda i: -sum(map(len, encoded[i])))
        scores: list[tuple[float, bool] | None] = [None] * len(encoded)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                inputs = [encoded[i][0] + encoded[i][1][:-1] for i in batch]
                width = max(map(len, inputs))
                ids = torch.zeros(len(batch), width, dtype=torch.long)  # [b, T]; padding is masked out
                mask = torch.zeros_like(ids)
                for row, tokens in enumerate(inputs):
                    ids[row, :len(tokens)], mask[row, :len(tokens)] = torch.tensor(tokens), 1
                counter[0] += ids.numel()
                hidden = ref.model(input_ids=ids.to(ref.device), attention_mask=mask.to(ref.device)).last_hidden_state
                for row, i in enumerate(batch):
                    context, continuation = encoded[i]
                    scored = hidden[row, len(context) - 1:len(context) - 1 + len(continuation)]  # [C, H]
                    scores[i] = score(ref.lm_head(scored), continuation)
        return scores
    return run


def lm_eval_backend(ref: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, counter: list[int],
                    batch_size: int = 1):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=ref, tokenizer=tokenizer, batch_size=batch_size)
    call = lm._model_call

    def counted(inputs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        counter[0] += inputs.numel()
        return call(inputs, *args, **kwargs)

    lm._model_call = counted

    def run(requests: list[tuple[str, str]]) -> Scores:
        instances = [Instance("loglikelihood", {}, request, i) for i, request in enumerate(requests)]
        return lm.loglikelihood(instances, disable_tqdm=True)
    return run


def trellis_backend(model: TrellisLlama, tokenizer: PreTrainedTokenizerBase, max_batch_tokens: int, cold: bool):
    def run(requests: list[tuple[str, str]]) -> Scores:
        if cold:
            model.prefix_cache.reset()
        return loglikelihood(model, tokenizer, requests, max_batch_tokens=max_batch_tokens)
    return run


def count_trellis_tokens(model: TrellisLlama, counter: list[int]) -> None:
    forward = model.runner.forward

    def counted(manager, seqs, **kwargs):
        counter[0] += sum(seq.num_new for seq in seqs)
        return forward(manager, seqs, **kwargs)

    model.runner.forward = counted


def measure(name: str, run: Callable[[list], Scores], requests: list, counter: list[int],
            model: TrellisLlama | None) -> dict:
    counter[0] = 0
    before = model.prefix_cache.stats() if model is not None else None
    start = time.perf_counter()
    scores = run(requests)
    row = {"backend": name, "seconds": time.perf_counter() - start, "tokens": counter[0], "scores": scores}
    if model is not None:
        after = model.prefix_cache.stats()
        looked_up = after["lookup_tokens"] - before["lookup_tokens"]
        row["hit_rate"] = (after["hit_tokens"] - before["hit_tokens"]) / max(looked_up, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fewshot", type=int, default=10, help="solved examples in the shared few-shot prefix")
    parser.add_argument("--workloads", nargs="*", help="run only these workloads (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per forward of the batched peers")
    parser.add_argument("--skip-lm-eval", action="store_true", help="leave out lm-eval's HF backend")
    parser.add_argument("--json", type=Path, help="write the results here")
    add_model_arguments(parser)
    args = parser.parse_args()

    model, tokenizer = load_model(args)
    ref = LlamaForCausalLM.from_pretrained(args.model or embedded_model_dir(), attn_implementation="sdpa",
                                           dtype=model.dtype).to(model.device).eval()
    counter = [0]
    backends = {"plain": (plain_backend(ref, tokenizer, counter), None),
                "plain-batched": (plain_batched_backend(ref, tokenizer, counter, args.batch_size), None)}
    if not args.skip_lm_eval:
        backends["lm-eval-hf"] = (lm_eval_backend(ref, tokenizer, counter), None)
        backends["lm-eval-hf-batched"] = (lm_eval_backend(ref, tokenizer, counter, args.batch_size), None)
    count_trellis_tokens(model, counter)
    backends["trellis"] = (trellis_backend(model, tokenizer, args.max_batch_tokens, cold=True), model)
    backends["trellis-warm"] = (trellis_backend(model, tokenizer, args.max_batch_tokens, cold=False), model)
    # The first call of each backend pays one-off costs (kernel loading, allocator warm-up).
    for run, _ in backends.values():
        run(workloads(args.fewshot)["reading-1q"][:2])

    results = []
    info = {**describe(model, args.model or "smollm2"), "device": str(model.device), "batch_size": args.batch_size}
    print(f"{info} | best of {args.repeats}\n")
    print("| workload | requests | backend | time s | req/s | tokens | speedup vs plain | vs lm-eval-hf "
          "| hit rate | max abs dlogp | greedy |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workload, requests in workloads(args.fewshot).items():
        if args.workloads and workload not in args.workloads:
            continue
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, (run, trellis_model) in backends.items():
                row = measure(name, run, requests, counter, trellis_model)
                if name not in best or row["seconds"] < best[name]["seconds"]:
                    best[name] = row
        plain = best["plain"]
        for name, row in best.items():
            diff = max(abs(a[0] - b[0]) for a, b in zip(row["scores"], plain["scores"]))
            same_greedy = sum(a[1] == b[1] for a, b in zip(row["scores"], plain["scores"]))
            versus_hf = f"{best['lm-eval-hf']['seconds'] / row['seconds']:.2f}x" if "lm-eval-hf" in best else "-"
            hit_rate = f"{row['hit_rate']:.0%}" if "hit_rate" in row else "-"
            print(f"| {workload} | {len(requests)} | {name} | {row['seconds']:.2f} "
                  f"| {len(requests) / row['seconds']:.1f} | {row['tokens']} "
                  f"| {plain['seconds'] / row['seconds']:.2f}x | {versus_hf} | {hit_rate} "
                  f"| {diff:.1e} | {same_greedy}/{len(requests)} |")
            results.append({"workload": workload, "requests": len(requests),
                            **{k: v for k, v in row.items() if k != "scores"}, "max_abs_dlogp": diff})
    if args.json:
        args.json.write_text(json.dumps({"info": info, "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
