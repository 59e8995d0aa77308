"""Linear layers alone: one pass over all of a model's decoder linear layers at M rows, per kind.

Every layer gets its own weights of the model's shapes (so they stream from memory as in a
forward), run as transformers does (``F.linear``, MKL on x86), through oneDNN over row-major
weights, through oneDNN over input-major weights (the ``onednn`` kind) and over a prepacked copy
(``packed``). Kinds take turns within each repetition; the figure is the median ms per pass.

    .venv/bin/python benchmarks/bench_linear.py [--rows 1 4 64 512] [--repeats 7] [--threads N] [--json PATH]
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from common import describe, load_model, parser

from trellis.runner.cpu_linear import OneDNNLinear, _set_layout

# name -> (module class, prepacked, input-major weights)
KINDS = {"F.linear (blas)": (torch.nn.Linear, False, False), "oneDNN, row-major": (OneDNNLinear, False, False),
         "oneDNN, input-major (onednn)": (OneDNNLinear, False, True), "oneDNN, prepacked (packed)": (OneDNNLinear, True, False)}


def layers_of_kind(shapes: list[tuple[int, int]], cls: type, prepack: bool, input_major: bool) -> list[torch.nn.Linear]:
    layers = []
    for out_features, in_features in shapes:
        layer = torch.nn.Linear(in_features, out_features, bias=False)
        layer.__class__ = cls
        if prepack:
            layer.prepack = True
        _set_layout(layer.weight, input_major)
        layers.append(layer)
    return layers


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 512])
    args = p.parse_args()
    model = load_model(args)
    block = model.model.layers[0]
    per_layer = [(m.out_features, m.in_features) for m in (block.self_attn.q_proj, block.self_attn.k_proj,
                 block.self_attn.v_proj, block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj,
                 block.mlp.down_proj)]
    shapes = per_layer * model.config.num_hidden_layers
    layers = {name: layers_of_kind(shapes, *kind) for name, kind in KINDS.items()}
    info = describe(model, args.model)
    print(f"{info}\n{len(shapes)} linear layers, median ms per pass\n")
    print("| rows | " + " | ".join(KINDS) + " |\n|---|" + "---|" * len(KINDS))
    rows = []
    with torch.no_grad():
        for m in args.rows:
            x = {n: torch.randn(m, n) for n in {in_features for _, in_features in shapes}}
            times: dict[str, list[float]] = {name: [] for name in KINDS}
            for rep in range((args.repeats or 7) + 1):  # the first repetition warms up (packing, JIT)
                for name, kind_layers in layers.items():
                    start = time.perf_counter()
                    for layer in kind_layers:
                        layer(x[layer.in_features])
                    if rep:
                        times[name].append(1000 * (time.perf_counter() - start))
            row = {"rows": m, **{name: statistics.median(t) for name, t in times.items()}}
            rows.append(row)
            print(f"| {m} | " + " | ".join(f"{row[name]:.1f}" for name in KINDS) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "statistic": "median ms per pass", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
