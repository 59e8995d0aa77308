"""The seed's benchmark suite in one process: throughput, TTFT and block-size sweep, each with its
peers, at the seed's φ grid and 32-token prefix steps. Writes
``results/{throughput,ttft,block_size}[_quick].{json,png}``, or with ``--json PATH`` each figure's
beside it (``PATH_throughput.json``, ...) and all three results in PATH itself (``--plot`` is
ignored: there are three figures).

    python benchmarks/bench_prefix.py [--quick] [--json PATH] [--model smollm2|tinyllama]
"""

from __future__ import annotations

import argparse
import json
import time

import bench_block_size
import bench_throughput
import bench_ttft
from common import SEED_BLOCK, finish, load_model, parser

FIGURES = (("throughput", bench_throughput), ("ttft", bench_ttft), ("block_size", bench_block_size))


def figure_arguments(args: argparse.Namespace, stem: str) -> argparse.Namespace:
    """The arguments one figure's benchmark runs with: the suite's, the seed's φ grid and prefix
    steps (options of those benchmarks alone), and its files (beside ``--json``, else the defaults)."""
    json_path = args.json.with_name(f"{args.json.stem}_{stem}.json") if args.json else None
    return argparse.Namespace(**{**vars(args), "phis": None, "granule": SEED_BLOCK, "json": json_path, "plot": None})


def main() -> None:
    args = parser(__doc__).parse_args()
    model = load_model(args)
    combined = {}
    for stem, bench in FIGURES:
        per_figure = figure_arguments(args, stem)
        start = time.perf_counter()
        combined[stem] = bench.run(model, per_figure)
        combined[stem]["wall_seconds"] = time.perf_counter() - start
        finish(combined[stem], per_figure, stem, bench.plot, bench.tables)
        print(f"\n{stem}: {combined[stem]['wall_seconds']:.0f} s\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(combined, indent=2))


if __name__ == "__main__":
    main()
