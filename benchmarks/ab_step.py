"""One sample of an A/B comparison between two Trellis checkouts: the median decode step of
``--sessions`` sessions at a 512-token context (64 steps) and the time to first token of a cold
512-token prompt and of one whose first 448 tokens are cached (median of 3), in ``--dtype`` (fp32
by default), for whichever ``trellis`` is on ``PYTHONPATH``.
Prints one JSON line. Alternate two worktrees in fresh processes (each builds its kernels in a
folder of its own), so that a burst of load hits both sides alike. The kernels' sources are the package
``trellis.kernels``, which an editable install maps to its own checkout's ``kernels/`` whatever
``PYTHONPATH`` says: a worktree other than the installed one needs ``trellis/kernels`` linked to
its own, or it builds the installed checkout's kernels:

    for tree in /tmp/old /tmp/new; do ln -s ../kernels $tree/trellis/kernels; done
    for i in 1 2 3 4 5 6; do for tree in /tmp/old /tmp/new; do
      (cd $tree && PYTHONPATH=$tree python benchmarks/ab_step.py); done; done
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--sessions", type=int, default=1, help="sessions decoded together")
    args = parser.parse_args()
    model = TrellisLlama.from_pretrained(embedded_model_dir(), dtype=getattr(torch, args.dtype), device="cpu",
                                         num_blocks=512)
    generator = torch.Generator().manual_seed(1)

    def tokens(n: int, rows: int = 1) -> torch.Tensor:
        return torch.randint(3, model.config.vocab_size, (rows, n), generator=generator)

    with torch.no_grad():
        model(tokens(64), logits_to_keep=1)  # warm-up: kernels, allocator
        out = model(tokens(512, args.sessions), logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(64):
            start = time.perf_counter()
            out = model(nxt, logits_to_keep=1, **{CACHE_ARG: out[CACHE_ARG]})
            nxt = out.logits[:, -1:].argmax(-1)
            steps.append(1000 * (time.perf_counter() - start))
        del out
        cold, warm = [], []
        for _ in range(3):
            prompt = tokens(512)
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, do_sample=False)
            cold.append(time.perf_counter() - start)
            probe = torch.cat([prompt[:, :448], tokens(64)], 1)  # 14 of its 16 blocks cached
            start = time.perf_counter()
            model.generate(probe, max_new_tokens=1, do_sample=False)
            warm.append(time.perf_counter() - start)
    print(json.dumps({"dtype": args.dtype, "sessions": args.sessions, "decode_ms": statistics.median(steps),
                      "ttft_cold_s": statistics.median(cold), "ttft_warm_s": statistics.median(warm)}))


if __name__ == "__main__":
    main()
