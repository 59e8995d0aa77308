"""The next turn of a chat: time to its first token, Trellis beside transformers.

Per repeat and system: turn 1 is a ``--prompt``-token prompt answered with ``--answer`` greedy
tokens; turn 2 is that prompt, the answer and ``--message`` new tokens, answered with one token,
timed. Each system builds turn 2 from its own answer, as a chat client does.

  trellis             one engine over an emptied prefix cache serves both turns: turn 2 finds
                      all turn 1 computed (its full blocks shared, its last, partly filled block
                      copied from the tail it left) and computes the rest
  hf_generate         transformers ``generate()`` on turn 2 alone: it keeps nothing across calls
  hf_generate_cache   transformers ``generate()`` continuing turn 1's returned cache: a caller who
                      keeps the cache of their one conversation and passes it back

    python benchmarks/bench_chat.py [--quick] [--prompt 300] [--answer 20] [--message 20] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import (
    COLORS,
    LABELS,
    SEED_BLOCK,
    attention,
    clock,
    describe,
    finish,
    load_model,
    parser,
    random_tokens,
    rotated,
    save_figure,
)
from report import chat_table
from systems import engine_over_empty_cache

from trellis.engine.sampling import SamplingParams
from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG
from trellis.utils import cdiv

SYSTEMS = ("trellis", "hf_generate", "hf_generate_cache")


def trellis_turn(model: TrellisLlama, prompt: list[int], answer: int, message: list[int]) -> tuple[float, int, int]:
    """Turn 2's TTFT, the prompt tokens the cache served it and its length."""
    engine = engine_over_empty_cache(model, SEED_BLOCK, 2 * cdiv(len(prompt) + answer + len(message) + 1, SEED_BLOCK))
    first = engine.generate([prompt], SamplingParams(max_new_tokens=answer))[0]
    turn = prompt + first.generated + message
    start = clock()
    second = engine.generate([turn], SamplingParams(max_new_tokens=1))[0]
    return clock() - start, second.num_cached_tokens, len(turn)


def hf_turn(model: TrellisLlama, prompt: list[int], answer: int, message: list[int],
            keep_cache: bool) -> tuple[float, int, int]:
    with attention(model, "sdpa") as plain:
        ids = torch.tensor([prompt])
        out = plain.generate(ids, max_new_tokens=answer, do_sample=False, return_dict_in_generate=True)
        turn = torch.cat([out.sequences, torch.tensor([message])], dim=1)
        cache = getattr(out, CACHE_ARG) if keep_cache else None
        reused = cache.get_seq_length() if keep_cache else 0
        start = clock()
        plain.generate(turn, max_new_tokens=1, do_sample=False, **({CACHE_ARG: cache} if keep_cache else {}))
        return clock() - start, reused, turn.shape[1]


def run(model: TrellisLlama, args: argparse.Namespace) -> dict:
    sizes = (64, 8, 8) if args.quick else (300, 20, 20)  # what a size left unset takes
    prompt_len, answer, message_len = (given or size for given, size in zip((args.prompt, args.answer, args.message), sizes))
    repeats = args.repeats or (1 if args.quick else 5)
    points = {name: {"system": name, "ttft": [], "reused": [], "turn_tokens": []} for name in SYSTEMS}
    generator = torch.Generator().manual_seed(0)
    eos, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None  # answers run full length
    try:
        for r in range(repeats + 1):  # the first round warms every path up, untimed
            prompt, message = random_tokens(prompt_len, generator), random_tokens(message_len, generator)
            for name in rotated(list(SYSTEMS), r):
                if name == "trellis":
                    seconds, reused, length = trellis_turn(model, prompt, answer, message)
                else:
                    seconds, reused, length = hf_turn(model, prompt, answer, message, name == "hf_generate_cache")
                if r > 0:
                    point = points[name]
                    point["ttft"].append(seconds)
                    point["reused"].append(reused)
                    point["turn_tokens"].append(length)
    finally:
        model.generation_config.eos_token_id = eos
    return {"what": "chat", "info": describe(model, args.model),
            "settings": {"prompt": prompt_len, "answer": answer, "message": message_len, "repeats": repeats,
                         "block_size": SEED_BLOCK},
            "rows": list(points.values())}


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axis = plt.subplots(figsize=(7, 4))
    medians = [statistics.median(row["ttft"]) * 1e3 for row in rows]
    axis.bar([LABELS[row["system"]] for row in rows], medians, color=[COLORS[row["system"]] for row in rows])
    s = result["settings"]
    axis.set(ylabel="turn 2: time to first token (ms, median)",
             title=f"A chat's next turn: {s['prompt']}-token prompt, {s['answer']}-token answer, "
                   f"{s['message']} new tokens")
    save_figure(fig, result["info"], path)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompt", type=int, help="turn 1's prompt tokens (default 300; --quick: 64)")
    p.add_argument("--answer", type=int, help="turn 1's answer tokens (default 20; --quick: 8)")
    p.add_argument("--message", type=int, help="turn 2's new tokens (default 20; --quick: 8)")
    args = p.parse_args()
    for name in ("prompt", "answer", "message"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1 token, got {getattr(args, name)}")
    model = load_model(args)
    finish(run(model, args), args, "chat", plot, chat_table)


if __name__ == "__main__":
    main()
