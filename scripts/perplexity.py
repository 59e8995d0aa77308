"""Perplexity of a local text file, scored as lm-eval's loglikelihood_rolling does it: every token
once, in disjoint windows of at most --max-length tokens. Words are counted as lm-eval counts
them (runs of whitespace split them).

    python scripts/perplexity.py                               # the sample text
    python scripts/perplexity.py --text notes.txt --max-length 512
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

from trellis.eval import loglikelihood_rolling
from trellis.eval.loading import add_model_arguments, command_errors, existing_file, load_model, positive_int
from trellis.eval.requests import encode
from trellis.utils import read_utf8

DEFAULT_TEXT = Path(__file__).parent / "data" / "sample_text.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", default=DEFAULT_TEXT, type=existing_file, help="a UTF-8 text file")
    parser.add_argument("--max-length", type=positive_int, help="window length in tokens (default: the model's maximum)")
    add_model_arguments(parser)
    args = parser.parse_args()
    with command_errors(parser, parser.prog):  # text that is not UTF-8, a model refused: named, no traceback
        score(args)


def score(args: argparse.Namespace) -> None:
    text = read_utf8(args.text)
    if not text.strip():
        raise ValueError(f"{args.text} has no words to score: it is empty or only whitespace")
    model, tokenizer = load_model(args)
    num_tokens = len(encode(tokenizer, text))  # as loglikelihood_rolling tokenizes it
    start = time.perf_counter()
    (logprob,) = loglikelihood_rolling(model, tokenizer, [text], max_length=args.max_length,
                                       max_batch_tokens=args.max_batch_tokens, progress=True)
    elapsed = time.perf_counter() - start

    # lm-eval's three perplexity metrics: per token, per word, and bits per UTF-8 byte.
    num_words, num_bytes = len(re.split(r"\s+", text)), len(text.encode())  # lm-eval's count_words, count_bytes
    print(f"{args.text.name}: {num_tokens} tokens, {num_words} words, {num_bytes} bytes")
    print(f"token perplexity {math.exp(-logprob / num_tokens):.3f} | word perplexity "
          f"{math.exp(-logprob / num_words):.3f} | bits per byte {-logprob / num_bytes / math.log(2):.4f}")
    print(f"{elapsed:.2f} s ({num_tokens / elapsed:.0f} tokens/s) on {model.device}, {model.dtype}")


if __name__ == "__main__":
    main()
