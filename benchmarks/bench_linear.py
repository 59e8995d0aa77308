"""Linear layers alone: one pass over all of a model's decoder linear layers at M rows, per kind.

Every layer gets its own weights of the model's shapes and dtype (so they stream from memory as
in a forward; the variants over one layout share them), run as transformers does (``F.linear``), through oneDNN over row-major weights,
over input-major weights and over a prepacked copy, through Trellis' streaming kernel
(``quant_linear``, qtype ``"BF16"`` or ``"F32"``, over the row-major parameter), which the kinds
run at the row counts ``cpu_linear.streamed_rows`` names for the dtype (bf16: 1-4, fp32: 1-8; each
variant here runs its own kernel at every row count), and, where ``cpu_linear.panels_run`` holds
for the dtype (an AVX-512 build; bf16: AVX512_BF16, on AMX tiles where present), through Trellis'
panels (``panel_linear``), which ``"packed"`` runs at every row count instead of oneDNN's copy and
the streaming kernel where ``cpu_linear.panels_serve`` holds (fp32: off Intel). The label in parentheses names the Trellis
kind that runs each variant in this dtype. Kinds take turns within each repetition; the figure
is the median ms per pass. Each shape's share of the pass is timed too, the LM head (not part of
the pass) included, as ``shapes``: ``{"out x in": {variant: ms}}``.

    .venv/bin/python benchmarks/bench_linear.py [--rows 1 4 64 512] [--repeats 7] [--threads N] [--dtype D] [--json PATH]
"""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import add_cpu_time_option, chosen_clock, describe, load_model, parser, refuse_unused

from trellis import ops
from trellis.ops.panels import pack_panels
from trellis.runner.cpu_linear import _set_layout, input_major, panels_run, panels_serve, streamed_rows

Layer = Callable[[torch.Tensor], torch.Tensor]


def onednn(weight: torch.Tensor) -> Layer:
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def variants(dtype: torch.dtype) -> dict[str, tuple[bool, Callable[[torch.Tensor], Layer]]]:
    """label -> (input-major weights, the layer over a weight); "onednn" runs the layout
    ``input_major`` picks."""
    onednn_input_major, rows = input_major(dtype), streamed_rows(dtype)
    panels, panels_picked = panels_run(dtype), panels_serve("packed", dtype)
    qtype = "F32" if dtype == torch.float32 else "BF16"
    out = {"F.linear (blas)": (False, lambda w: lambda x: F.linear(x, w)),
           "oneDNN, row-major" + ("" if onednn_input_major else " (onednn)"): (False, onednn),
           "oneDNN, input-major" + (" (onednn)" if onednn_input_major else ""): (True, onednn),
           "oneDNN, prepacked" + ("" if panels_picked else " (packed)"):
               (False, lambda w: onednn(torch.ops.mkldnn._reorder_linear_weight(w, 64)))}
    if rows is not None:
        # input-major weights do not stream, nor do the rows of panels
        kinds = [kind for kind, streams in (("blas", True), ("onednn", not onednn_input_major),
                                            ("packed", not panels_picked)) if streams]
        kinds_named = "every kind" if len(kinds) == 3 else ", ".join(kinds)
        out[f"Trellis streaming ({kinds_named} at {rows[0]}-{rows[1]} rows)"] = \
            (False, lambda w: lambda x: ops.quant_linear(x, w.view(torch.uint8), qtype, backend="cpp"))
    if panels:
        out["Trellis panels" + (" (packed)" if panels_picked else "")] = \
            (False, lambda w: functools.partial(ops.panel_linear, panels=pack_panels(w), bias=None,
                                                out_features=w.shape[0]))
    return out


def weights_of_layout(counts: dict[tuple[int, int], int], dtype: torch.dtype,
                      input_major_weights: bool) -> dict[tuple[int, int], list[torch.Tensor]]:
    """``counts[shape]`` weights of each ``shape`` in one layout. The variants of a layout share
    them: TinyLlama's weights once per variant would not fit 24 GB in fp32."""
    weights = {}
    for (out_features, in_features), n in counts.items():
        weights[out_features, in_features] = []
        for _ in range(n):
            weight = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype).weight.detach()
            _set_layout(weight, input_major_weights)
            weights[out_features, in_features].append(weight)
    return weights


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", help="row counts (default: 1 2 4 8 16 64 512; --quick: 1 64)")
    add_cpu_time_option(p)
    args = p.parse_args()
    refuse_unused(p, args, "plot")
    args.rows = args.rows or ([1, 64] if args.quick else [1, 2, 4, 8, 16, 64, 512])
    args.repeats = args.repeats or (1 if args.quick else 7)
    clock = chosen_clock(args, p)
    model = load_model(args)
    block = model.model.layers[0]
    per_layer = [(m.out_features, m.in_features) for m in (block.self_attn.q_proj, block.self_attn.k_proj,
                 block.self_attn.v_proj, block.self_attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj,
                 block.mlp.down_proj)]
    head = (model.lm_head.out_features, model.lm_head.in_features)
    # shape -> how many layers of it a pass runs; the LM head is timed apart, not in the pass
    counts = {shape: per_layer.count(shape) * model.config.num_hidden_layers for shape in dict.fromkeys(per_layer)}
    kinds, dtype, info = variants(model.dtype), model.dtype, describe(model, args.model)
    del model  # only its shapes are needed: the layers below get weights of their own
    weights = {layout: weights_of_layout({**counts, head: 1}, dtype, layout)
               for layout in {input_major_weights for input_major_weights, _ in kinds.values()}}
    layers = {name: {shape: [layer(w) for w in ws] for shape, ws in weights[layout].items()}
              for name, (layout, layer) in kinds.items()}
    print(f"{info}\n{sum(counts.values())} linear layers, median ms per pass\n")
    print("| rows | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
    rows = []
    with torch.no_grad():
        for m in args.rows:
            x = {n: torch.randn(m, n, dtype=dtype) for _, n in counts | {head: 1}}
            times = {name: {shape: [] for shape in layers[name]} for name in kinds}
            for rep in range(args.repeats + 1):  # the first repetition warms up (packing, JIT)
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
