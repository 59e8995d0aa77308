"""One session's decode step by dtype: the same model in fp32 and bf16 (fp16 with ``--dtypes``),
Trellis with each linear kernel beside plain transformers (sdpa, ``F.linear``) in the same dtype.

Each dtype gets its own model (TinyLlama's random weights are drawn in fp32 and rounded, so every
dtype runs the same model). A measurement is bench_decode's loop: an L-token prompt, then D
single-token steps; the (dtype, system) pairs take turns in a rotating order, and the figure is
the median ms per step over every step of every repeat, which keeps a burst of load from another
process out of the comparison. ``--threads 1 --cpu-time`` counts the thread's CPU time instead:
on a machine shared with other jobs, time spent preempted then does not count.

``--quantized Q4_0`` adds the fp32 model with its decoder's linear layers quantized to that GGUF
format and its LM head to Q8_0 (the embedded GGUF's layout), run by Trellis' quantized kernels
(``QuantizedLinear``; fp32 activations): the issue-18 targets compare each dtype's Trellis
default (the ``default`` column) against fp32's. That ratio is also given paired (``paired vs
fp32``): the median over repeats of each repeat's fp32 median over the row's, so that a slow spell
of the machine's memory, which lasts seconds to minutes, weighs on both sides of a ratio alike.
``--defaults-only`` runs only each row's default, so that a repeat is short and its measurements
lie close together in time.

    .venv/bin/python benchmarks/bench_dtype.py [--model smollm2|tinyllama] [--dtypes float32 bfloat16]
        [--quantized Q4_0] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable

import gguf
import torch
from common import add_cpu_time_option, attention, chosen_clock, describe, load_model, parser, refuse_unused, rotated

from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG
from trellis.runner import LINEAR_KERNELS, huge_pages
from trellis.runner.quantized_linear import QuantizedLinear

# name -> (attention implementation, Trellis linear kernel); Trellis runs its C++ attention kernels
SYSTEMS = {"transformers sdpa": ("sdpa", None), **{f"trellis {kind}": ("trellis", kind) for kind in LINEAR_KERNELS}}


def step_times_ms(model: torch.nn.Module, prompt: torch.Tensor, steps: int, clock: Callable[[], float]) -> list[float]:
    """bench_decode's loop, on ``clock``: the prompt (untimed), then ``steps`` greedy single-token steps."""
    times = []
    with torch.no_grad():
        out = model(prompt, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = clock()
            out = model(nxt, logits_to_keep=1, **{CACHE_ARG: out[CACHE_ARG]})
            nxt = out.logits[:, -1:].argmax(-1)
            times.append(1000 * (clock() - start))
    return times


def measure(model: torch.nn.Module, system: str, prompt: torch.Tensor, steps: int,
            clock: Callable[[], float] = time.perf_counter) -> list[float]:
    implementation, kernel = SYSTEMS.get(system, ("trellis", None))  # "trellis quantized": no linear kernel
    with attention(model, implementation) as runs:
        if implementation == "trellis":  # its linear kernel, and a fresh, empty cache
            if kernel is not None:
                runs.set_linear_kernel(kernel)  # (packing happens in the untimed prompt forward)
            runs.configure_cache(backend="cpp")
        return step_times_ms(runs, prompt, steps, clock)


def quantized_model(args: argparse.Namespace, qtype: str) -> TrellisLlama:
    """The fp32 model with every decoder linear layer's weight quantized to ``qtype`` by gguf's
    quantizer and its LM head to Q8_0, each a ``QuantizedLinear`` over those blocks."""
    model = load_model(argparse.Namespace(**{**vars(args), "dtype": "float32"}))

    def quantize(parent: torch.nn.Module, name: str, kind: str) -> None:
        linear = getattr(parent, name)
        blocks = gguf.quants.quantize(linear.weight.detach().contiguous().numpy(), gguf.GGMLQuantizationType[kind])
        setattr(parent, name, QuantizedLinear.from_linear(linear, kind, torch.from_numpy(blocks)))

    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                quantize(parent, name, qtype)
    quantize(model, "lm_head", "Q8_0")  # an untied copy when the head shares the embedding's weight
    # The fp32 weights were loaded into one huge-page mapping (trellis/runner/huge_pages.py), which
    # lives while any tensor in it does: copying the rest (embeddings, norms) out lets its 4.4 GB go
    # (TinyLlama with all three formats otherwise outgrows a 24 GB machine); the reset places them anew.
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if huge_pages.placed(tensor):
            tensor.data = tensor.data.clone()
    model.prefix_cache.reset()
    return model


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16", "float16"))
    p.add_argument("--quantized", nargs="*", default=[], choices=("Q4_0", "Q4_1", "Q8_0"),
                   help="also the fp32 model with its linear layers in these GGUF formats (Q8_0 LM head)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens before the timed steps")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    p.add_argument("--defaults-only", action="store_true", help="only each dtype's default system")
    add_cpu_time_option(p)
    args = p.parse_args()
    refuse_unused(p, args, "plot", "dtype")
    clock = chosen_clock(args, p)
    repeats = 1 if args.quick else args.repeats or 5
    # The quantized models first: each lets its fp32 weights go before the other models load.
    quantized = {qtype: quantized_model(args, qtype) for qtype in args.quantized}
    models = {dtype: load_model(argparse.Namespace(**{**vars(args), "dtype": dtype})) for dtype in args.dtypes}
    defaults = {dtype: f"trellis {model.linear_kernel}" for dtype, model in models.items()}  # before measure() switches
    for qtype, model in quantized.items():
        models[qtype] = model
        defaults[qtype] = "trellis quantized"
    # (row, system): every system for a dtype; the quantized models' layers take no linear kernel
    pairs = [(row, system) for row in models
             for system in (SYSTEMS if row in args.dtypes and not args.defaults_only else [defaults[row]])]
    prompt = torch.randint(3, models[args.dtypes[0]].config.vocab_size, (1, args.context),
                           generator=torch.Generator().manual_seed(0))
    for row, system in pairs:  # untimed: first-call costs (kernel builds, the allocator, packing)
        measure(models[row], system, prompt[:, :64], 2)
    times: dict[tuple[str, str], list[list[float]]] = {pair: [] for pair in pairs}  # per repeat
    for r in range(repeats):
        for pair in rotated(pairs, r):
            times[pair].append(measure(models[pair[0]], pair[1], prompt, args.steps, clock))

    def median(row: str, system: str) -> float:
        return statistics.median(t for repeat in times[row, system] for t in repeat)

    def repeat_medians(row: str) -> list[float]:
        return [statistics.median(repeat) for repeat in times[row, defaults[row]]]

    rows = [{"dtype": row, **{system: median(row, system) for (r, system) in pairs if r == row},
             "default": median(row, defaults[row]), "default_kernel": defaults[row],
             "default_repeat_medians": repeat_medians(row)} for row in models]
    if "float32" in models:
        fp32_repeats = rows[list(models).index("float32")]["default_repeat_medians"]
        for row in rows:
            row["paired vs fp32"] = statistics.median(
                fp32 / ms for fp32, ms in zip(fp32_repeats, row["default_repeat_medians"], strict=True))
    info = {**describe(models[args.dtypes[0]], args.model), "dtype": list(models),  # a list: one row each
            "linear_kernel": "each", "trellis_linear_kernel": "each"}
    statistic = "median ms per step" + (" (thread CPU time)" if args.cpu_time else "")
    print(f"{info}\n{statistic} after a {args.context}-token prompt ({args.steps} steps x {repeats} repeats)\n")
    columns = [*SYSTEMS, "default"]
    print("| dtype | " + " | ".join(columns) + " | default vs fp32 | paired vs fp32 |\n|---|"
          + "---|" * (len(columns) + 2))
    fp32 = next((row["default"] for row in rows if row["dtype"] == "float32"), None)
    for row in rows:
        cells = [f"{row[c]:.1f}" if c in row else "" for c in columns]
        ratios = [f"{fp32 / row['default']:.2f}x", f"{row['paired vs fp32']:.2f}x"] if fp32 else ["", ""]
        print(f"| {row['dtype']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "context": args.context, "steps": args.steps, "repeats": repeats,
                                         "statistic": statistic, "dtypes": rows}, indent=1))


if __name__ == "__main__":
    main()
