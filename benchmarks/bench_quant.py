"""GGUF-quantized linear layers: the C++ kernels against fp32 ``F.linear``, and SmolLM2's decode step.

Kernels: y = x @ W^T at TinyLlama-1.1B's shapes (2048x2048, 5632x2048, 2048x5632) and SmolLM2's
(576x576, 1536x576, 576x1536 and the 49152x576 LM head), for Q4_0, Q4_1 and Q8_0 weights and
M = 1, 4 (decode) and 512 (prefill) rows, with x as it is and rounded to 8-bit blocks
(``quantize_x``: integer dot products). Each variant cycles through enough copies of its
weight (~192 MB) that the weights stream from memory, as in a forward, rather than from the
last-level cache. Reported: ms per call, GB/s of weight bytes read (the figure that bounds
decode) and GFLOP/s (the one that bounds prefill); fp32 ``F.linear`` (PyTorch's BLAS) and
oneDNN beside it. Decode: SmolLM2-135M from the embedded GGUF with its Q4_1 layers and Q8_0 LM
head kept quantized against the same model in fp32 (Trellis' default oneDNN linear layers),
median ms per step after a 512-token prompt, the two taking turns.

    .venv/bin/python benchmarks/bench_quant.py [--quick] [--threads N] [--json PATH]

On a shared 2-core machine these figures are noisy (the load average is recorded): compare
columns of one run, not runs.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from bench_decode import step_times_ms
from common import RESULTS, describe, parser, refuse_unused

from trellis import TrellisLlama, ops

SHAPES = {"tinyllama": [(2048, 2048), (5632, 2048), (2048, 5632)],
          "smollm2": [(576, 576), (1536, 576), (576, 1536), (49152, 576)]}
QTYPES = ("Q4_0", "Q4_1", "Q8_0")
POOL_BYTES = 192 << 20  # weights cycled per variant: well past a last-level cache


def time_per_call(run, weights: list[torch.Tensor], repeats: int) -> float:
    """Median over repeats of (one pass over every copy) / copies, in ms."""
    run(weights[0])  # first-call costs
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for weight in weights:
            run(weight)
        passes.append((time.perf_counter() - start) / len(weights))
    return 1000 * statistics.median(passes)


def copies(tensor: torch.Tensor, most: int) -> list[torch.Tensor]:
    return [tensor.clone() for _ in range(min(most, max(2, POOL_BYTES // (tensor.numel() * tensor.element_size()))))]


def kernel_rows(rows: list[int], repeats: int, quick: bool) -> list[dict]:
    results = []
    rng = np.random.default_rng(0)
    print("| shape (N x K) | M | format | quant ms | quant GB/s | fp32 F.linear ms | fp32 GB/s | oneDNN fp32 ms "
          "| speed-up vs best fp32 | quant GFLOP/s | 8-bit x ms | 8-bit x GB/s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, shapes in SHAPES.items():
        for n, k in shapes[:1] if quick else shapes:
            weight = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
            for qtype in QTYPES:
                blocks = torch.from_numpy(gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType[qtype]))
                for m in rows:
                    most = 1000 if m <= 8 else 4  # prefill is compute-bound: a few copies do
                    fp32, pool = copies(weight, most), copies(blocks, most)
                    onednn = [w.t().contiguous().t() for w in fp32]  # input-major: oneDNN's layout
                    x = torch.randn(m, k)
                    with torch.no_grad():
                        t_quant = time_per_call(lambda w, x=x, qtype=qtype: ops.quant_linear(x, w, qtype), pool, repeats)
                        t_q8 = time_per_call(lambda w, x=x, qtype=qtype: ops.quant_linear(x, w, qtype, True), pool, repeats)
                        t_blas = time_per_call(lambda w, x=x: F.linear(x, w), fp32, repeats)
                        t_dnn = time_per_call(lambda w, x=x: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                                              onednn, repeats)
                    row = {"model": model, "N": n, "K": k, "M": m, "qtype": qtype, "quant_ms": t_quant,
                           "quant_GBps": blocks.numel() / t_quant / 1e6, "fp32_blas_ms": t_blas,
                           "fp32_GBps": weight.numel() * 4 / t_blas / 1e6, "fp32_onednn_ms": t_dnn,
                           "quant_GFLOPs": 2 * m * n * k / t_quant / 1e6, "quantize_x_ms": t_q8,
                           "quantize_x_GBps": blocks.numel() / t_q8 / 1e6}
                    results.append(row)
                    print(f"| {n}x{k} | {m} | {qtype} | {t_quant:.3f} | {row['quant_GBps']:.1f} | {t_blas:.3f} | "
                          f"{row['fp32_GBps']:.1f} | {t_dnn:.3f} | {min(t_blas, t_dnn) / t_quant:.2f}x | "
                          f"{row['quant_GFLOPs']:.0f} | {t_q8:.3f} | {row['quantize_x_GBps']:.1f} |", flush=True)
    return results


def decode_rows(prompt_len: int, steps: int, repeats: int) -> tuple[dict, dict]:
    models = {"Q4_1 + Q8_0 head (keep_quantized)": TrellisLlama.from_pretrained(keep_quantized=True, device="cpu"),
              "fp32 (onednn)": TrellisLlama.from_pretrained(device="cpu", dtype=torch.float32)}
    prompt = torch.randint(100, 40000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(repeats + 1):
        order = list(models) if rep % 2 else list(models)[::-1]
        for name in order:
            models[name].prefix_cache.reset()
            measured = step_times_ms(models[name], prompt, steps)
            if rep:  # the first round warms up
                times[name] += measured
    result = {name: statistics.median(t) for name, t in times.items()}
    print(f"\nSmolLM2 decode, ms per step after a {prompt_len}-token prompt (median of {steps} x {repeats} steps): "
          + ", ".join(f"{name} {ms:.1f}" for name, ms in result.items()))
    return result, describe(models["fp32 (onednn)"], "smollm2")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    refuse_unused(p, args, "plot", "model", "backend", "dtype", "linear_kernel")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    decode, info = decode_rows(512, 8 if args.quick else 32, 1 if args.quick else 3)
    print(info)
    kernels = kernel_rows([1, 4, 512], repeats, args.quick)
    info = {**info, "load_average_end": os.getloadavg(), "weight_pool_bytes": POOL_BYTES}
    out = args.json or RESULTS / ("quant_quick.json" if args.quick else "quant.json")
    out.write_text(json.dumps({"info": info, "statistic": "median ms per call; decode: median ms per step",
                               "kernels": kernels, "decode_ms_per_step": decode}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
