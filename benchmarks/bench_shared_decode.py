"""Sessions over one system prompt: the decode step of N sessions that share a cached prompt,
beside N sessions of the same lengths whose prompts are all different.

Both sets run in one engine over the same model: N prompts of L tokens, each generating D greedy
tokens, decoded together. In the shared set the prompts begin with the same S tokens (whole blocks,
about φ·L), so their block tables begin with the same blocks and the C++ attention reads those keys
once per step for all N sessions (shared-prefix items, docs/architecture.md); in the other set every
prompt is its own, so each session's K/V are read on their own. The linear layers, the LM head and
every shape are the same in both: the difference is attention over shared keys. The sets take turns
in a rotating order; the figure is the median time between consecutive tokens (one decode step of
all N sessions) over each repeat's steps.

    .venv/bin/python benchmarks/bench_shared_decode.py [--quick] [--json PATH] [--dtype bfloat16]
"""

from __future__ import annotations

import itertools
import json
import statistics

import torch
from common import RESULTS, Workload, describe, load_model, parser, refuse_unused, rotated
from systems import MAX_BATCH_TOKENS

from trellis.engine.engine import Engine
from trellis.engine.sampling import SamplingParams
from trellis.utils import cdiv

BLOCK_SIZE = 32
PHI = 0.95
CONFIGS = [(4, 512), (16, 512), (4, 2048), (16, 2048)]  # (sessions N, prompt tokens L)
QUICK = [(4, 256)]


def prompts(sessions: int, length: int, shared: bool) -> list[list[int]]:
    """``sessions`` prompts of ``length`` tokens, each its own tail after ``Workload.shared`` tokens
    of prefix: one shared prefix, or each session's own (another seed's, of the same length)."""
    workload = Workload(L=length, D=1, N=sessions, phi=PHI)
    tails = [workload.prompt(i)[workload.shared:] for i in range(sessions)]
    if shared:
        return [workload.prefix() + tail for tail in tails]
    return [Workload(L=length, D=1, N=sessions, phi=PHI, seed=1 + i).prefix() + tail for i, tail in enumerate(tails)]


def step_ms(engine: Engine, batch: list[list[int]], new_tokens: int) -> float:
    """Median milliseconds between consecutive tokens of the batch's first session."""
    first = engine.generate(batch, SamplingParams(max_new_tokens=new_tokens))[0]
    stamps = first.token_times
    return 1e3 * statistics.median(b - a for a, b in itertools.pairwise(stamps))


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=24, help="tokens each session generates (D)")
    args = p.parse_args()
    refuse_unused(p, args, "plot")
    model = load_model(args)
    configs = QUICK if args.quick else CONFIGS
    repeats = args.repeats or (1 if args.quick else 3)
    rows = []
    for sessions, length in configs:
        # Room for both sets at once, so that neither evicts the other's prompts between turns.
        blocks = 2 * sessions * cdiv(length + args.new_tokens, BLOCK_SIZE) + 8
        model.configure_cache(block_size=BLOCK_SIZE, num_blocks=blocks, backend=args.backend)
        engine = Engine(model, max_batch_tokens=MAX_BATCH_TOKENS)
        sets = {name: prompts(sessions, length, name == "shared") for name in ("shared", "own")}
        for batch in sets.values():  # prefill both (untimed): every turn after is decode over cached prompts
            engine.generate(batch, SamplingParams(max_new_tokens=1))
        times: dict[str, list[float]] = {name: [] for name in sets}
        for r in range(repeats):
            for name in rotated(list(sets), r):
                times[name].append(step_ms(engine, sets[name], args.new_tokens))
        row = {"sessions": sessions, "prompt_tokens": length, "shared_tokens": Workload(length, 1, sessions, PHI).shared,
               "shared_ms": times["shared"], "own_ms": times["own"]}
        rows.append(row)
        print(f"N={sessions} L={length} (shared {row['shared_tokens']}): a step over one shared prompt "
              f"{statistics.median(times['shared']):.1f} ms, over their own prompts {statistics.median(times['own']):.1f} ms "
              f"({statistics.median(times['own']) / statistics.median(times['shared']):.2f}x)", flush=True)
    result = {"what": "shared_decode", "info": describe(model, args.model), "phi": PHI, "block_size": BLOCK_SIZE,
              "new_tokens": args.new_tokens, "repeats": repeats, "rows": rows}
    path = args.json or RESULTS / f"shared_decode{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
