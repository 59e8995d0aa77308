"""Time to first token vs the shared-prefix fraction φ (the seed's second figure).

Per φ and system, ``--repeats`` times: a fresh pipeline, one prompt warmed, then a single request
sharing its first ``round(φ·L/32)`` blocks that decodes one token. Reports TTFT and the cache hit
rate of that request, whose ceiling is (L/32 − 1)/(L/32): the probe always diverges in its last block.
With ``--granule 1`` the shared prefix is ``round(φ·L)`` tokens instead, so that the probe leaves
the cached prompt inside a block (where a system that shares whole blocks only computes the rest
of that block again).

    python benchmarks/bench_ttft.py [--quick] [--granule G] [--json PATH] [--plot PATH]
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
    probe = {phi: Workload(L, 1, 1, phi, granule=args.granule) for phi in phis}
    points = [{"system": s.name, "phi": phi, "realized_phi": probe[phi].realized_phi, "L": L, "ttft": [],
               "hit_rate": []} for phi in phis for s in every]
    # Repetitions sweep the whole grid in turn, so a slow drift in machine load spreads over every φ.
    grid = [(point, system) for _ in range(repeats) for point, system in zip(points, every * len(phis))]
    for point, system in tqdm(grid, desc="ttft vs phi", unit="probe"):
        result = system.ttft(probe[point["phi"]])
        point["ttft"].append(result.ttft)
        point["hit_rate"].append(result.hit_rate)
    g = args.granule
    return {"info": describe(model, args.model), "settings": {"L": L, "phis": phis, "repeats": repeats, "granule": g},
            "hit_rate_ceiling": (L // g - 1) * g / L, "points": points}


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    granule = result["settings"].get("granule", SEED_BLOCK)
    steps = f", shared prefix in {granule}-token steps" if granule != SEED_BLOCK else ""
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
             title=f"TTFT, L={result['settings']['L']}, one request after one warm prompt{steps}")
    hits.set(ylabel="cache hit rate (dashed)", ylim=(0, 1.05))
    handles = [h for axis in (left, hits) for h in axis.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=3)
    save_figure(fig, result["info"], path, rect=(0, 0.12, 1, 1))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--phis", type=float, nargs="+", help="the φ values (default: the seed's grid, PHIS)")
    p.add_argument("--granule", type=int, default=SEED_BLOCK,
                   help="the shared prefix in whole multiples of this many tokens (default: the seed's 32-token "
                        "blocks; 1: a prefix of any length)")
    args = p.parse_args()
    if args.granule < 1:
        p.error(f"--granule must be a positive number of tokens, got {args.granule}")
    model = load_model(args)
    finish(run(model, args), args, "ttft", plot, tables)


if __name__ == "__main__":
    main()
