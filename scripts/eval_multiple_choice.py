"""Multiple-choice accuracy on a local JSONL file, with every shared context computed once.

Each line: {"context": "...", "choices": ["...", ...], "answer": index}. Every choice is scored
as lm-eval scores a multiple_choice task (log-likelihood of " " + choice after the context).
With --num-fewshot k, the first k questions become solved examples in front of all the others:
a prefix every document shares, which the radix cache serves after its first use.

    python scripts/eval_multiple_choice.py                      # the sample reading set
    python scripts/eval_multiple_choice.py --data scripts/data/trivia_mc.jsonl --num-fewshot 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from trellis.eval import loglikelihood
from trellis.eval.loading import (
    add_model_arguments,
    command_errors,
    existing_file,
    load_model,
    non_negative_int,
    positive_int,
)
from trellis.eval.multiple_choice import accuracy, choice_requests, fewshot_prefix, read_questions

DEFAULT_DATA = Path(__file__).parent / "data" / "reading_mc.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, type=existing_file, help="JSONL file of questions")
    parser.add_argument("--num-fewshot", type=non_negative_int, default=0, help="solved examples in front of each question")
    parser.add_argument("--limit", type=positive_int, help="evaluate at most this many questions")
    add_model_arguments(parser)
    args = parser.parse_args()
    with command_errors(parser, parser.prog):  # a malformed question, a model refused: named, no traceback
        evaluate(args)


def evaluate(args: argparse.Namespace) -> None:
    questions = read_questions(args.data)
    shots, questions = questions[:args.num_fewshot], questions[args.num_fewshot:][:args.limit]
    if not questions:
        raise ValueError(f"{args.data}: no questions left to evaluate after {args.num_fewshot} few-shot examples")
    model, tokenizer = load_model(args)
    requests = choice_requests(questions, fewshot_prefix(shots))
    before = model.prefix_cache.stats()
    start = time.perf_counter()
    scores = loglikelihood(model, tokenizer, requests, max_batch_tokens=args.max_batch_tokens, progress=True)
    elapsed = time.perf_counter() - start
    after = model.prefix_cache.stats()

    result = accuracy(questions, [logprob for logprob, _ in scores])
    looked_up = after["lookup_tokens"] - before["lookup_tokens"]
    hits = after["hit_tokens"] - before["hit_tokens"]
    print(f"{args.data.name}: {len(questions)} questions, {len(requests)} requests, {args.num_fewshot}-shot")
    print(f"acc {result['acc']:.3f} | acc_norm {result['acc_norm']:.3f}")
    print(f"{elapsed:.2f} s ({len(requests) / elapsed:.1f} requests/s) on {model.device}, {model.dtype}")
    print(f"prefix cache: {hits} of {looked_up} context tokens served from the cache "
          f"({hits / max(looked_up, 1):.0%}), each context prefilled once for all its choices")


if __name__ == "__main__":
    main()
