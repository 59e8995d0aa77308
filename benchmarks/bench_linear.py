"""Linear layers alone: one pass over all of a model's decoder linear layers at M rows, per kind.

Every layer gets its own weights of the model's shapes and dtype (so they stream from memory as
in a forward), run as transformers does (``F.linear``), through oneDNN over row-major weights,
over input-major weights and over a prepacked copy, and in bf16 through Trellis' streaming kernel
(``quant_linear``, qtype ``"BF16"``, over the row-major parameter), which the oneDNN kinds run at
up to ``OneDNNLinear.streamed_rows`` rows; the label in parentheses names the Trellis kind that
runs each variant in this dtype. Kinds take turns within each repetition; the figure
is the median ms per pass. Each shape's share of the pass is timed too, the LM head (not part of
the pass) included, as ``shapes``: ``{"out x in": {variant: ms}}``.

    .venv/bin/python benchmarks/bench_linear.py [--rows 1 4 64 512] [--repeats 7] [--threads N] [--dtype D] [--json PATH]
"""

from __future__ import annotations

import json
import statistics

import torch
from common import add_cpu_time_option, chosen_clock, describe, load_model, parser

from trellis.runner.cpu_linear import OneDNNLinear, _set_layout, input_major


def variants(dtype: torch.dtype) -> dict[str, tuple[type, bool, bool, int]]:
    """label -> (module class, prepacked, input-major weights, rows streamed); "onednn" runs the
    layout ``input_major`` picks. Every oneDNN variant runs oneDNN at every row count."""
    onednn_input_major, streams = input_major(dtype), dtype == torch.bfloat16
    few = f" above {OneDNNLinear.streamed_rows} rows" if streams else ""
    out = {"F.linear (blas)": (torch.nn.Linear, False, False, 0),
           "oneDNN, row-major" + ("" if onednn_input_major else f" (onednn{few})"): (OneDNNLinear, False, False, 0),
           "oneDNN, input-major" + (" (onednn)" if onednn_input_major else ""): (OneDNNLinear, False, True, 0),
           f"oneDNN, prepacked (packed{few})": (OneDNNLinear, True, False, 0)}
    if streams:
        out[f"Trellis streaming (onednn, packed up to {OneDNNLinear.streamed_rows} rows)"] = \
            (OneDNNLinear, False, False, 1 << 30)
    return out


def layers_of_kind(shapes: list[tuple[int, int]], dtype: torch.dtype, cls: type, prepack: bool,
                   input_major_weights: bool, streamed_rows: int) -> list[torch.nn.Linear]:
    layers = []
    for out_features, in_features in shapes:
        layer = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
        layer.__class__ = cls
        if cls is OneDNNLinear:
            layer.prepack, layer.streamed_rows = prepack, streamed_rows
        _set_layout(layer.weight, input_major_weights)
        layers.append(layer)
    return layers


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 512])
    add_cpu_time_option(p)
    args = p.parse_args()
    clock = chosen_clock(args, p)
    model = load_model(args)
    block = model.model.layers[0]
    per_layer = [(m.out_features, m.in_features) for m in (block.self_attn.q_proj, block.self_attn.k_proj,
                 block.self_attn.v_proj, block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj,
                 block.mlp.down_proj)]
    head = (model.lm_head.out_features, model.lm_head.in_features)
    # shape -> how many layers of it a pass runs; the LM head is timed apart, not in the pass
    counts = {shape: per_layer.count(shape) * model.config.num_hidden_layers for shape in dict.fromkeys(per_layer)}
    kinds = variants(model.dtype)
    layers = {name: {shape: layers_of_kind([shape] * n, model.dtype, *kind) for shape, n in {**counts, head: 1}.items()}
              for name, kind in kinds.items()}
    info = describe(model, args.model)
    print(f"{info}\n{sum(counts.values())} linear layers, median ms per pass\n")
    print("| rows | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    rows = []
    with torch.no_grad():
        for m in args.rows:
            x = {n: torch.randn(m, n, dtype=model.dtype) for _, n in counts | {head: 1}}
            times = {name: {shape: [] for shape in layers[name]} for name in kinds}
            for rep in range((args.repeats or 7) + 1):  # the first repetition warms up (packing, JIT)
                for name, by_shape in layers.items():
                    for shape, kind_layers in by_shape.items():
                        start = clock()
                        for layer in kind_layers:
                            layer(x[shape[1]])
                        if rep:
                            times[name][shape].append(1000 * (clock() - start))
            # A pass's time per repetition is the sum over its shapes, timed back to back.
            passes = {name: [sum(t[shape][r] for shape in counts) for r in range(len(t[head]))]
                      for name, t in times.items()}
            row = {"rows": m, **{name: statistics.median(t) for name, t in passes.items()},
                   "shapes": {f"{o}x{i}": {name: statistics.median(times[name][(o, i)]) for name in kinds}
                              for o, i in layers[next(iter(kinds))]}}
            rows.append(row)
            print(f"| {m} | " + " | ".join(f"{row[name]:.1f}" for name in kinds) + " |", flush=True)
    print("\nper shape (ms for all layers of the shape in a pass; the LM head once)\n")
    print("| rows | shape | " + " | ".join(kinds) + " |\n|---|---|" + "---|" * len(kinds))
    for row in rows:
        for shape, by_kind in row["shapes"].items():
            print(f"| {row['rows']} | {shape} | " + " | ".join(f"{by_kind[name]:.2f}" for name in kinds) + " |")
    if args.json:
        statistic = "median ms per pass" + (" (thread CPU time)" if args.cpu_time else "")
        args.json.write_text(json.dumps({"info": info, "statistic": statistic, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
