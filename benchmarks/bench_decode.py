"""End-to-end decode latency: TrellisLlama (each CPU backend) beside plain transformers (sdpa).

The same manual decoding loop runs for every system on one model object (the peer switches it to
transformers' sdpa attention, so all share the very same weight memory): a prompt of L tokens, then
D single-token steps through the returned cache (``past_key_values``, named ``cache`` from
transformers 5.24 on). Systems take turns in a rotating order, and the figure is the median
milliseconds per step over every step of every repeat, which keeps a burst of load from another
process out of the comparison. Trellis runs with each linear kernel
(``TrellisLlama.set_linear_kernel``): "blas" is transformers' own ``nn.Linear``, so the first two
Trellis rows differ from transformers in attention alone.

    .venv/bin/python benchmarks/bench_decode.py [--quick] [--json PATH] [--model smollm2|tinyllama]
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from common import describe, load_model, parser, refuse_unused, rotated
from systems import attention
from transformers import LlamaForCausalLM

from trellis.models.paged_cache import CACHE_ARG

# name -> (attention implementation, Trellis backend, Trellis linear kernel)
SYSTEMS = {"transformers sdpa": ("sdpa", None, None), "trellis reference, blas": ("trellis", "reference", "blas"),
           "trellis cpp, blas": ("trellis", "cpp", "blas"), "trellis cpp, onednn": ("trellis", "cpp", "onednn"),
           "trellis cpp, packed": ("trellis", "cpp", "packed")}
SPEEDUPS = ["trellis cpp, blas", "trellis cpp, onednn", "trellis cpp, packed"]  # over transformers, printed


def step_times_ms(model: LlamaForCausalLM, prompt: torch.Tensor, steps: int) -> list[float]:
    times = []
    with torch.no_grad():
        out = model(prompt, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(nxt, logits_to_keep=1, **{CACHE_ARG: out[CACHE_ARG]})
            nxt = out.logits[:, -1:].argmax(-1)
            times.append(1000 * (time.perf_counter() - start))
    return times


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    refuse_unused(p, args, "plot")
    model = load_model(args)
    contexts, steps = ([512], 16) if args.quick else ([128, 512, 1024, 2048], 32)
    repeats = args.repeats or (2 if args.quick else 4)
    names = list(SYSTEMS)
    rows = []
    print(f"{describe(model, args.model)}\n{'L':>6} " + " ".join(f"{name:>22}" for name in names)
          + "".join(f"  sdpa/{name.removeprefix('trellis ')}" for name in SPEEDUPS))
    for implementation, backend, kernel in SYSTEMS.values():  # untimed: first-call costs (builds, allocator)
        with attention(model, implementation) as system:
            if backend is not None:
                system.set_linear_kernel(kernel)
                system.configure_cache(backend=backend)
            step_times_ms(system, torch.arange(3, 67)[None], 4)
    for length in contexts:
        prompt = torch.randint(3, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in rotated(names, r):
                implementation, backend, kernel = SYSTEMS[name]
                with attention(model, implementation) as system:
                    if backend is not None:  # Trellis: its linear kernel, and a fresh, empty cache
                        system.set_linear_kernel(kernel)  # (packing happens in the untimed prompt forward)
                        system.configure_cache(backend=backend)
                    times[name] += step_times_ms(system, prompt, steps)
        row = {"L": length, **{name: statistics.median(t) for name, t in times.items()}}
        rows.append(row)
        print(f"{length:>6} " + " ".join(f"{row[n]:>19.1f} ms" for n in names)
              + "".join(f"  {row['transformers sdpa'] / row[name]:>{len(name) - 3}.3f}x" for name in SPEEDUPS))
    if args.json:
        args.json.write_text(json.dumps({"info": describe(model, args.model), "steps": steps, "repeats": repeats,
                                         "statistic": "median ms per step", "rows": rows}, indent=1))
    for name in SPEEDUPS:
        print(f"median speed-up of {name} over transformers: "
              f"{statistics.median(r['transformers sdpa'] / r[name] for r in rows):.3f}x")


if __name__ == "__main__":
    main()
