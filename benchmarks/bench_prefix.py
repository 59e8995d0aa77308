"""The seed's benchmark suite in one process: throughput, TTFT and block-size sweep, each with its
peers. Writes ``results/{throughput,ttft,block_size}[_quick].{json,png}``; ``--json PATH`` also
writes all three results in one file (``--plot`` is ignored: there are three figures).

    python benchmarks/bench_prefix.py [--quick] [--json PATH] [--model smollm2|tinyllama]
"""

from __future__ import annotations

import argparse
import json
import time

import bench_block_size
import bench_throughput
import bench_ttft
from common import finish, load_model, parser


def main() -> None:
    args = parser(__doc__).parse_args()
    model = load_model(args)
    per_figure = argparse.Namespace(**{**vars(args), "json": None, "plot": None})  # each to its default files
    combined = {}
    for stem, bench in (("throughput", bench_throughput), ("ttft", bench_ttft), ("block_size", bench_block_size)):
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
