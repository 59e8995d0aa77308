"""Throughput and allocations per op vs the shared-prefix fraction φ (the seed's first figure).

Per φ and system: ``--repeats`` timed ops, then one more op under the PyTorch profiler for its
allocations (count and bytes of the tensor allocations of PyTorch's CPU allocator, where the
activations and every KV cache live), plus the fresh KV blocks each paged system took from its
pool. Also checks item 4: the KV blocks Trellis holds for N sessions equal the shared blocks once
plus each session's own tail, next to the bytes of transformers' per-session caches.

    python benchmarks/bench_throughput.py [--quick] [--json PATH] [--plot PATH]
    python benchmarks/bench_throughput.py --targets-only [--repeats 3]   # the issue's N=4, D=16 check alone
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import (
    COLORS,
    LABELS,
    PHIS,
    RESULTS,
    SEED_BLOCK,
    Series,
    Workload,
    by_system,
    describe,
    finish,
    load_model,
    markdown_table,
    parser,
    rotated,
    save_figure,
)
from report import allocations_table, kv_memory_table, present, speed_header, speed_rows, throughput_table
from systems import OpResult, System, systems, warm_up
from tqdm.auto import tqdm

from trellis.cache.block_pool import BlockPool
from trellis.models.llama import TrellisLlama
from trellis.utils import cdiv


def settings(args: argparse.Namespace) -> dict:
    if args.quick:
        return {"L": 128, "D": 8, "N": 2, "phis": args.phis or [0.0, 0.5, 0.9], "repeats": args.repeats or 1,
                "target_D": 4}
    return {"L": 512, "D": 64, "N": 4, "phis": args.phis or list(PHIS), "repeats": args.repeats or 1, "target_D": 16}


def expected_blocks(w: Workload) -> int:
    """Shared blocks once, plus each session's own blocks for its suffix and answer (K/V of all but the last token)."""
    shared = w.shared // SEED_BLOCK
    return shared + w.N * (cdiv(w.L + w.D - 1, SEED_BLOCK) - shared)


def measure(every: list[System], w: Workload, repeats: int, allocations: bool) -> list[dict]:
    """Each system's point at ``w``: ``repeats`` timed ops taken in rotation (repeat r starts at the
    r-th system), so that a change of the machine's speed falls on every system alike; then each
    system's allocations, in one more op."""
    ops: dict[str, list[OpResult]] = {system.name: [] for system in every}
    for r in range(repeats):
        for system in rotated(every, r):
            ops[system.name].append(system.op(w))
    return [point(system, w, ops[system.name], allocations) for system in every]


def point(system: System, w: Workload, ops: list[OpResult], allocations: bool) -> dict:
    last = ops[-1]
    result = {"system": system.name, "phi": w.phi, "realized_phi": w.realized_phi, "shared_tokens": w.shared,
              "L": w.L, "D": w.D, "N": w.N, "seconds": [op.seconds for op in ops],
              "generated": [op.generated for op in ops], "tokens_per_s": [op.tokens_per_s for op in ops],
              "session_tokens_per_s": [op.session_tokens_per_s for op in ops], "fresh_blocks": last.fresh_blocks,
              "live_blocks": last.live_blocks, "kv_bytes": last.kv_bytes}
    if last.live_blocks is not None:
        result["expected_live_blocks"] = expected_blocks(w)
    if allocations:
        tally = system.allocations(w)
        result.update(alloc_count=tally.count, alloc_bytes=tally.bytes)
    return result


def run(model: TrellisLlama, args: argparse.Namespace) -> dict:
    s = settings(args)
    every = systems(model)
    warm_up(every)
    points = [p for phi in tqdm(s["phis"], desc="throughput vs phi", unit="phi")
              for p in measure(every, Workload(s["L"], s["D"], s["N"], phi), s["repeats"], allocations=True)]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    block_bytes = BlockPool.bytes_per_block(SEED_BLOCK, cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim,
                                            model.dtype)
    return {"info": describe(model, args.model), "settings": s, "block_bytes": block_bytes, "points": points,
            "targets": target_check(every, s)}


def target_check(every: list[System], s: dict) -> list[dict]:
    """N=4 sessions at φ=0 and φ=0.9 with the target's decode budget, every system."""
    return [p for phi in tqdm((0.0, 0.9), desc="target check", unit="phi")
            for p in measure(every, Workload(s["L"], s["target_D"], 4, phi), s["repeats"], allocations=False)]


def target_tables(result: dict) -> str:
    target = result["targets"][0]
    return "\n\n".join([
        f"Target check: N={target['N']}, L={target['L']}, D={target['D']}, tokens/s per op (warm-up included)",
        speed_table(result["targets"]),
        "Target check, tokens/s of the N sessions once the prefix is warm (warm-up excluded)",
        speed_table(result["targets"], "session_tokens_per_s"),
    ])


def speed_table(points: list[dict], key: str = "tokens_per_s") -> str:
    return markdown_table(speed_header(present(by_system(points))), speed_rows(points, key))


def tables(result: dict) -> str:
    """What the docs show (``report.py`` renders both), and the target check."""
    return "\n\n".join([throughput_table(result), allocations_table(result), kv_memory_table(result),
                          target_tables(result)])


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    blocks_axis = right.twinx()
    for name, pts in by_system(result["points"]).items():
        speed = Series()
        for p in pts:
            speed.add(p["realized_phi"], p["tokens_per_s"])
        left.errorbar(speed.x, speed.mean, yerr=speed.std, marker="o", capsize=3, color=COLORS[name],
                      label=LABELS[name])
        right.plot(speed.x, [p["alloc_bytes"] / 2**20 for p in pts], marker="o", color=COLORS[name],
                   label=LABELS[name])
        if pts[0]["fresh_blocks"] is not None:
            blocks_axis.plot(speed.x, [p["fresh_blocks"] for p in pts], marker="s", ls="--", alpha=0.6,
                             color=COLORS[name], label=f"{LABELS[name]}: fresh KV blocks")
    s = result["settings"]
    left.set(xlabel="shared prefix fraction φ", ylabel="generated tokens / s (per op)",
             title=f"Throughput, L={s['L']}, D={s['D']}, N={s['N']}")
    right.set(xlabel="shared prefix fraction φ", ylabel="MiB allocated per op (solid)", title="Allocations per op")
    blocks_axis.set_ylabel("fresh KV blocks per op (dashed)")
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="lower left")
    blocks_axis.legend(fontsize=8, loc="upper right")
    save_figure(fig, result["info"], path)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--targets-only", action="store_true", help="only the N=4, D=16 target check (no figure)")
    p.add_argument("--phis", type=float, nargs="+", help="the φ values (default: the seed's grid, PHIS)")
    args = p.parse_args()
    model = load_model(args)
    if not args.targets_only:
        finish(run(model, args), args, "throughput", plot, tables)
        return
    every = systems(model)
    warm_up(every)
    result = {"info": describe(model, args.model), "settings": settings(args),
              "targets": target_check(every, settings(args))}
    path = args.json or RESULTS / f"throughput_targets{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}\n\n{target_tables(result)}")


if __name__ == "__main__":
    main()
