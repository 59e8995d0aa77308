"""Time to first token vs the shared-prefix fraction φ (the seed's second figure).

Per φ and system, ``--repeats`` times: a fresh pipeline, one prompt warmed, then a single request
sharing its first ``round(φ·L/32)`` blocks that decodes one token. Reports TTFT and the cache hit
rate of that request, whose ceiling is (L/32 − 1)/(L/32): the probe always diverges in its last block.

    python benchmarks/bench_ttft.py [--quick] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import (
    COLORS,
    LABELS,
    PHIS,
    SEED_BLOCK,
    Series,
    Workload,
    by_system,
    describe,
    finish,
    load_model,
    parser,
    save_figure,
)
from report import ttft_table as tables  # the table the docs show
from systems import systems, warm_up
from tqdm.auto import tqdm

from trellis.models.llama import TrellisLlama


def run(model: TrellisLlama, args: argparse.Namespace) -> dict:
    L = 128 if args.quick else 512
    phis = args.phis or ([0.0, 0.5, 0.9] if args.quick else list(PHIS))
    repeats = args.repeats or (1 if args.quick else 3)
    every = systems(model, ttft=True)
    warm_up(every)
    points = [{"system": s.name, "phi": phi, "realized_phi": Workload(L, 1, 1, phi).realized_phi, "L": L, "ttft": [],
               "hit_rate": []} for phi in phis for s in every]
    # Repetitions sweep the whole grid in turn, so a slow drift in machine load spreads over every φ.
    grid = [(point, system) for _ in range(repeats) for point, system in zip(points, every * len(phis))]
    for point, system in tqdm(grid, desc="ttft vs phi", unit="probe"):
        probe = system.ttft(Workload(L=L, D=1, N=1, phi=point["phi"]))
        point["ttft"].append(probe.ttft)
        point["hit_rate"].append(probe.hit_rate)
    return {"info": describe(model, args.model), "settings": {"L": L, "phis": phis, "repeats": repeats},
            "hit_rate_ceiling": (L / SEED_BLOCK - 1) / (L / SEED_BLOCK), "points": points}


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(8, 5.5))
    hits = left.twinx()
    for name, pts in by_system(result["points"]).items():
        ttft, hit = Series(), Series()
        for p in pts:
            ttft.add(p["realized_phi"], [t * 1e3 for t in p["ttft"]])
            hit.add(p["realized_phi"], p["hit_rate"])
        left.errorbar(ttft.x, ttft.mean, yerr=ttft.std, marker="o", capsize=3, color=COLORS[name],
                      label=f"{LABELS[name]}: TTFT")
        if name != "hf_generate":
            hits.plot(hit.x, hit.mean, marker="s", ls="--", alpha=0.6, color=COLORS[name],
                      label=f"{LABELS[name]}: hit rate")
    hits.axhline(result["hit_rate_ceiling"], color="k", lw=0.8, ls=":", label="hit-rate ceiling")
    left.set(xlabel="shared prefix fraction φ", ylabel="time to first token (ms)", ylim=(0, None),
             title=f"TTFT, L={result['settings']['L']}, one request after one warm prompt")
    hits.set(ylabel="cache hit rate (dashed)", ylim=(0, 1.05))
    handles = [h for axis in (left, hits) for h in axis.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=3)
    save_figure(fig, result["info"], path, rect=(0, 0.12, 1, 1))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--phis", type=float, nargs="+", help="the φ values (default: the seed's grid, PHIS)")
    args = p.parse_args()
    model = load_model(args)
    finish(run(model, args), args, "ttft", plot, tables)


if __name__ == "__main__":
    main()
