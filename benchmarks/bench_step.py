"""Where one session's decode step goes: matmuls, attention and everything else (issue #18).

SmolLM2-135M (the embedded model) in fp32, bf16 and with its GGUF Q4_1 weights kept quantized
(``q4_1``; ``q4_1_q8``: their inputs rounded to 8 bits, ``q8_activations``), one session
decoding at a ``--context``-token context. Per configuration and decoder path, the
step's wall time is the median of ``--steps`` unprofiled greedy steps; a second, profiled run of
the same steps splits it: matmuls are the top-level linear ops (``aten::linear``, oneDNN's
``mkldnn::_linear_pointwise``, ``trellis_cpp::quant_linear``, ``quant_linear_group``, ``panel_linear``
and ``panel_linear_group``; the LM head included), attention is the paged attention kernel, and everything else (norms, RoPE, K/V
stores, residual adds, activations, the Python around them) is the wall time less those two.
``extend ms`` times the prefill behind a φ=0.9 time to first token: ``--suffix`` new tokens after
a cached prefix of the prompt's whole blocks but the last two. ``ops`` counts the dispatcher
calls made from Python per step, each a chance for an OpenMP region. The whole
measurement repeats ``--repeats`` times, paths and configurations taking turns, and each figure
is the median over the repeats (the machine is shared; the profiler slows the ops it times a
little, so the parts are upper bounds on the ops and "other" a lower bound).

The paths: ``lean`` runs the decoder layers directly over the packed batch with Trellis' fused
ops (``trellis/runner/decoder.py``), ``transformers`` runs transformers' own decoder forward (the
fallback, and the only path before the lean one).

    .venv/bin/python benchmarks/bench_step.py --threads 2 [--repeats 3] [--configs fp32 bf16 q4_1 q4_1_q8] [--json PATH]

(results of the 2-core AMX Xeon: benchmarks/results/xeon-amx/step.json, and step_before.json from before the lean path)
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from common import environment, parser, refuse_unused, rotated
from torch.profiler import ProfilerActivity, profile

from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG

CONFIGS = ("fp32", "bf16", "q4_1", "q4_1_q8")
PATHS = ("transformers", "lean")
MATMULS = frozenset({"aten::linear", "mkldnn::_linear_pointwise", "trellis_cpp::quant_linear",
                     "trellis_cpp::quant_linear_group", "trellis_cpp::panel_linear", "trellis_cpp::panel_linear_group",
                     "aten::matmul", "aten::mm", "aten::addmm"})
ATTENTION = frozenset({"trellis_cpp::paged_attention"})


def load(config: str) -> TrellisLlama:
    if config.startswith("q4_1"):  # Q4_1 layers, Q8_0 LM head (docs/quantized.md); q8: inputs rounded to 8 bits
        return TrellisLlama.from_pretrained(keep_quantized=True, q8_activations=config == "q4_1_q8", device="cpu",
                                            num_blocks=64)
    dtype = torch.float32 if config == "fp32" else torch.bfloat16
    return TrellisLlama.from_pretrained(embedded_model_dir(), dtype=dtype, device="cpu", num_blocks=64)


def decode(model: TrellisLlama, prompt: torch.Tensor, steps: int, profiler: profile | None = None) -> list[float]:
    """The prompt (untimed), then ``steps`` greedy single-token steps; ms per step."""
    times = []
    with torch.no_grad():
        out = model(prompt, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        if profiler is not None:
            profiler.start()
        for _ in range(steps):
            start = time.perf_counter()
            out = model(nxt, logits_to_keep=1, **{CACHE_ARG: out[CACHE_ARG]})
            nxt = out.logits[:, -1:].argmax(-1)
            times.append(1000 * (time.perf_counter() - start))
        if profiler is not None:
            profiler.stop()
    return times


def extend_ms(model: TrellisLlama, prompt: torch.Tensor, new_tokens: int, repeats: int = 5) -> float:
    """Median ms of a prompt's forward whose first ``prompt`` tokens are cached (whole blocks) and
    ``new_tokens`` follow: the prefill behind the time to first token at φ=0.9."""
    generator = torch.Generator().manual_seed(1)
    times = []
    with torch.no_grad():
        model(prompt, use_cache=False)  # cached from here on
        for _ in range(repeats):
            ids = torch.cat([prompt, torch.randint(3, 49152, (1, new_tokens), generator=generator)], dim=1)
            start = time.perf_counter()
            model(ids, logits_to_keep=1, use_cache=False)
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def top_level_ms(events: list, names: frozenset[str]) -> float:
    """CPU ms of the events named in ``names`` that do not run inside another of them."""
    total = 0.0
    for event in events:
        if event.name in names:
            parent = event.cpu_parent
            while parent is not None and parent.name not in names:
                parent = parent.cpu_parent
            if parent is None:
                total += event.cpu_time_total / 1000
    return total


def budget(model: TrellisLlama, prompt: torch.Tensor, steps: int, suffix: int) -> dict[str, float]:
    """One measurement: the step's median wall time, its parts (per step) from a profiled run, and
    the extend of ``suffix`` tokens after the prompt's whole blocks but the last 2 (φ=0.9 at 512)."""
    wall = statistics.median(decode(model, prompt, steps))
    profiler = profile(activities=[ProfilerActivity.CPU])
    decode(model, prompt, steps, profiler)
    events = profiler.events()
    matmul, attention = top_level_ms(events, MATMULS) / steps, top_level_ms(events, ATTENTION) / steps
    ops = sum(1 for event in events if event.cpu_parent is None) / steps
    cached = prompt[:, : (prompt.shape[1] // 32 - 2) * 32]
    return {"step_ms": wall, "matmul_ms": matmul, "attention_ms": attention, "other_ms": wall - matmul - attention,
            "ops": ops, "extend_ms": extend_ms(model, cached, suffix)}


def set_path(model: TrellisLlama, path: str) -> None:
    model.runner.use_lean_decoder = path == "lean"


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--context", type=int, help="prompt tokens before the timed steps (default 512; --quick: 128)")
    p.add_argument("--steps", type=int, help="decode steps per measurement (default 32; --quick: 4)")
    p.add_argument("--suffix", type=int, default=51, help="new tokens of the extend after a cached prefix")
    args = p.parse_args()
    refuse_unused(p, args, "plot", "model", "backend", "dtype", "linear_kernel")
    args.context = args.context or (128 if args.quick else 512)
    if args.context < 3 * 32:  # the extend runs over the context's whole 32-token blocks but the last 2
        p.error(f"--context must be at least 96 tokens (the extend needs a cached block), got {args.context}")
    args.steps = args.steps or (4 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {config: load(config) for config in args.configs}
    prompt = torch.randint(3, 49152, (1, args.context), generator=torch.Generator().manual_seed(0))
    for model in models.values():  # untimed: kernel builds, weight packing, the allocator
        for path in args.paths:
            set_path(model, path)
            decode(model, prompt[:, :64], 4)
    runs: dict[tuple[str, str], list[dict[str, float]]] = {(c, path): [] for c in args.configs for path in args.paths}
    for r in range(args.repeats):
        order = list(runs)
        for config, path in rotated(order, r):
            set_path(models[config], path)
            runs[config, path].append(budget(models[config], prompt, args.steps, args.suffix))
    rows = [{"config": config, "path": path, "linear_kernel": models[config].linear_kernel,
             **{key: statistics.median(m[key] for m in measured) for key in measured[0]}}
            for (config, path), measured in runs.items()]
    print(f"SmolLM2-135M, one session, {args.context}-token context, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} x {args.steps} steps")
    print(f"{'config':>6} {'path':>12} {'step ms':>8} {'matmul':>7} {'attn':>6} {'other':>6} {'ops':>6} "
          f"{'extend ms':>10}")
    for row in rows:
        print(f"{row['config']:>6} {row['path']:>12} {row['step_ms']:>8.2f} {row['matmul_ms']:>7.2f} "
              f"{row['attention_ms']:>6.2f} {row['other_ms']:>6.2f} {row['ops']:>6.0f} {row['extend_ms']:>10.1f}")
    if args.json:
        info = {**environment(None, None), "model": "SmolLM2-135M-Instruct (real weights)"}
        args.json.write_text(json.dumps({"info": info,
                                         "context": args.context, "steps": args.steps, "repeats": args.repeats,
                                         "suffix": args.suffix,
                                         "statistic": "median over repeats of the median ms per step", "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
