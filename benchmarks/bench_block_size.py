"""Radix-tree size and TTFT vs the cache block size B (the seed's appendix figure).

For each B and each target length L: a fresh pipeline warms a prefix of φ=0.5 and runs N sessions
(then the tree's leaves, nodes and cached blocks are counted: the bookkeeping), and separately
the TTFT probe of ``bench_ttft`` runs at φ=0.5. transformers' ``generate_batch`` gets the same page
size B; ``generate()`` has no blocks (its TTFT is measured at each point all the same). Error bars
are the spread over the target lengths, as in the seed.

    python benchmarks/bench_block_size.py [--quick] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import (
    COLORS,
    LABELS,
    Series,
    Workload,
    by_system,
    describe,
    finish,
    load_model,
    markdown_table,
    parser,
    pm,
    save_figure,
)
from systems import Trellis, systems, warm_up
from tqdm.auto import tqdm

from trellis.models.llama import TrellisLlama

BLOCK_SIZES = (8, 16, 32, 64, 128, 256)
PHI = 0.5


def run(model: TrellisLlama, args: argparse.Namespace) -> dict:
    lengths = [64, 128] if args.quick else [256, 384, 512]
    sizes = [8, 32, 128] if args.quick else list(BLOCK_SIZES)
    n, d = (2, 4) if args.quick else (4, 16)
    every = systems(model, ttft=True)
    warm_up(every)
    trellis = next(s for s in every if isinstance(s, Trellis))
    points = []
    for block_size, L in tqdm([(b, L) for b in sizes for L in lengths], desc="block size sweep", unit="point"):
        op = trellis.op(Workload(L=L, D=d, N=n, phi=PHI), block_size)
        stats = model.prefix_cache.stats()
        probe = Workload(L=L, D=1, N=1, phi=PHI)
        for system in every:
            result = system.ttft(probe, block_size)
            point = {"system": system.name, "block_size": block_size, "L": L, "ttft": result.ttft,
                     "hit_rate": result.hit_rate}
            if system is trellis:
                point.update(leaves=op.leaves, nodes=stats["nodes"], cached_blocks=stats["cached_blocks"])
            points.append(point)
    return {"info": describe(model, args.model),
            "settings": {"lengths": lengths, "block_sizes": sizes, "N": n, "D": d, "phi": PHI}, "points": points}


def across_lengths(points: list[dict], key: str) -> Series:
    """Per block size: the values of ``key`` over the target lengths."""
    series = Series()
    for size in sorted({p["block_size"] for p in points}):
        series.add(size, [p[key] for p in points if p["block_size"] == size])
    return series


def tables(result: dict) -> str:
    groups = by_system(result["points"])
    rows = []
    for size in result["settings"]["block_sizes"]:
        at = {name: [p for p in pts if p["block_size"] == size] for name, pts in groups.items()}
        tr = at["trellis"]
        rows.append([str(size), pm([p["leaves"] for p in tr]), pm([p["nodes"] for p in tr]),
                     pm([p["cached_blocks"] for p in tr]), pm([p["ttft"] for p in tr], 1e3, 0),
                     pm([p["hit_rate"] for p in tr], digits=3), pm([p["ttft"] for p in at["hf_generate_batch"]], 1e3, 0),
                     pm([p["ttft"] for p in at["hf_generate"]], 1e3, 0)])
    s = result["settings"]
    title = (f"Block size sweep (mean ± std over L ∈ {s['lengths']}; tree after warm-up + N={s['N']} sessions "
             f"of D={s['D']} at φ={s['phi']}; TTFT in ms)")
    return "\n\n".join([
        title,
        markdown_table(["B", "leaves", "nodes", "cached blocks", "Trellis TTFT", "Trellis hit rate",
                        "generate_batch TTFT", "generate() TTFT"], rows),
    ])


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = by_system(result["points"])
    for key, marker in (("leaves", "o"), ("nodes", "^"), ("cached_blocks", "s")):
        series = across_lengths(groups["trellis"], key)
        left.errorbar(series.x, series.mean, yerr=series.std, marker=marker, capsize=3, label=key.replace("_", " "))
    for name, pts in groups.items():
        ttft = across_lengths([{**p, "ttft": p["ttft"] * 1e3} for p in pts], "ttft")
        right.errorbar(ttft.x, ttft.mean, yerr=ttft.std, marker="o", capsize=3, color=COLORS[name], label=LABELS[name])
    s = result["settings"]
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(s["block_sizes"], [str(b) for b in s["block_sizes"]])
    left.set(xlabel="block size B (tokens)", ylabel="count", yscale="log",
             title=f"Radix tree after warm-up + {s['N']} sessions (φ={s['phi']})")
    right.set(xlabel="block size B (tokens)", ylabel="time to first token (ms)", ylim=(0, None),
              title=f"TTFT at φ={s['phi']} (error bars: L ∈ {s['lengths']})")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    save_figure(fig, result["info"], path)


def main() -> None:
    args = parser(__doc__).parse_args()
    model = load_model(args)
    finish(run(model, args), args, "block_size", plot, tables)


if __name__ == "__main__":
    main()
