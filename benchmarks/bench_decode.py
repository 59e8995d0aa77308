"""End-to-end decode latency: TrellisLlama (each CPU backend) beside plain transformers (sdpa).

The same manual decoding loop runs for every system on one model object (the peer switches it to
transformers' sdpa attention, so all share the very same weight memory): a prompt of L tokens, then
D single-token steps through ``past_key_values``. Systems take turns in a rotating order, and the
figure is the median milliseconds per step over every step of every repeat, which keeps a burst
of load from another process out of the comparison. "trellis cpp, packed" also runs Trellis'
linear layers on oneDNN-prepacked weights (``TrellisLlama.pack_weights``); the others run
transformers' own ``nn.Linear``.

    .venv/bin/python benchmarks/bench_decode.py [--quick] [--json PATH] [--model smollm2|tinyllama]
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from common import describe, load_model, parser
from systems import attention
from transformers import LlamaForCausalLM

# name -> (attention implementation, Trellis backend, packed linear weights)
SYSTEMS = {"transformers sdpa": ("sdpa", None, False), "trellis reference": ("trellis", "reference", False),
           "trellis cpp": ("trellis", "cpp", False), "trellis cpp, packed": ("trellis", "cpp", True)}


def step_times_ms(model: LlamaForCausalLM, prompt: torch.Tensor, steps: int) -> list[float]:
    times = []
    with torch.no_grad():
        out = model(prompt, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(nxt, past_key_values=out.past_key_values, logits_to_keep=1)
            nxt = out.logits[:, -1:].argmax(-1)
            times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    model = load_model(args)
    contexts, steps, repeats = ([512], 16, 2) if args.quick else ([128, 512, 1024, 2048], 32, args.repeats or 4)
    names = list(SYSTEMS)
    rows = []
    print(f"{describe(model, args.model)}\n{'L':>6} " + " ".join(f"{name:>20}" for name in names)
          + "   sdpa/cpp  sdpa/packed")
    for implementation, backend, packed in SYSTEMS.values():  # untimed: first-call costs (builds, allocator)
        with attention(model, implementation):
            if backend is not None:
                model.pack_weights(packed)
                model.configure_cache(backend=backend)
            step_times_ms(model, torch.arange(3, 67)[None], 4)
    for length in contexts:
        prompt = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                implementation, backend, packed = SYSTEMS[name]
                with attention(model, implementation):
                    if backend is not None:  # Trellis: packed weights or not, and a fresh, empty cache
                        model.pack_weights(packed)  # (packing happens in the untimed prompt forward)
                        model.configure_cache(backend=backend)
                    times[name] += step_times_ms(model, prompt, steps)
        row = {"L": length, **{name: statistics.median(t) for name, t in times.items()}}
        rows.append(row)
        print(f"{length:>6} " + " ".join(f"{row[n]:>17.1f} ms" for n in names)
              + f"   {row['transformers sdpa'] / row['trellis cpp']:.3f}x  "
              f"{row['transformers sdpa'] / row['trellis cpp, packed']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps({"info": describe(model, args.model), "steps": steps, "repeats": repeats,
                                         "statistic": "median ms per step", "rows": rows}, indent=1))
    print(f"median speed-up of trellis cpp over transformers: "
          f"{statistics.median(r['transformers sdpa'] / r['trellis cpp'] for r in rows):.3f}x")


if __name__ == "__main__":
    main()
