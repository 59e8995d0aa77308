"""End-to-end decode latency: TrellisLlama (each CPU backend) beside plain transformers (sdpa).

The same manual decoding loop runs for every system on the same weights: a prompt of L tokens,
then D single-token steps through ``past_key_values``; the figure is milliseconds per step.

    .venv/bin/python benchmarks/bench_decode.py [--quick] [--json PATH] [--model smollm2|tinyllama]
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from common import describe, load_model, parser
from transformers import LlamaForCausalLM


def ms_per_step(model: LlamaForCausalLM, prompt: torch.Tensor, steps: int) -> float:
    with torch.no_grad():
        out = model(prompt, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, past_key_values=out.past_key_values, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
        return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    trellis = load_model(args)
    plain = copy.deepcopy(trellis)
    plain.set_attn_implementation("sdpa")  # TrellisLlama then runs exactly LlamaForCausalLM's forward
    contexts, steps, repeats = ([512], 16, 1) if args.quick else ([128, 512, 1024, 2048], 32, args.repeats or 3)
    systems = {"transformers sdpa": (plain, None), "trellis reference": (trellis, "reference"),
               "trellis cpp": (trellis, "cpp")}
    rows = []
    print(f"{describe(trellis, args.model)}\n{'L':>6} " + " ".join(f"{name:>20}" for name in systems) + "   cpp/sdpa")
    for length in contexts:
        prompt = torch.randint(3, trellis.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        times: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(repeats):  # systems interleaved, so that load from other processes hits all alike
            for name, (model, backend) in systems.items():
                if backend is not None:
                    model.configure_cache(backend=backend)  # also a fresh, empty cache
                times[name].append(ms_per_step(model, prompt, steps))
        row = {"L": length, **{name: min(t) for name, t in times.items()}}
        rows.append(row)
        print(f"{length:>6} " + " ".join(f"{row[n]:>17.1f} ms" for n in systems)
              + f"   {row['transformers sdpa'] / row['trellis cpp']:.2f}x faster")
    if args.json:
        args.json.write_text(json.dumps({"info": describe(trellis, args.model), "steps": steps, "rows": rows}, indent=1))
    print(f"median speed-up of trellis cpp over transformers: "
          f"{statistics.median(r['transformers sdpa'] / r['trellis cpp'] for r in rows):.2f}x")


if __name__ == "__main__":
    main()
