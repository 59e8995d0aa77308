"""Prompt-lookup decoding (speculative drafts copied from the prompt) beside plain greedy decoding.

transformers' ``generate(prompt_lookup_num_tokens=k)`` proposes up to k tokens that continue an
n-gram of the prompt, checks them in one forward and crops the rejected ones off the cache; the
greedy tokens are those of plain greedy decoding. Trellis' paged sessions roll back with
copy-on-write (``KVCacheManager.truncate``). Two chat tasks on SmolLM2: copying a passage (most
drafts are right) and answering a question (few are). Every system starts from an empty cache and
generates D tokens (the stop token is switched off); systems take turns in a rotating order; the
figure is the median seconds per ``generate()`` call, prefill included.

    .venv/bin/python benchmarks/bench_speculative.py [--quick] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from common import describe, load_model, parser, refuse_unused, rotated
from systems import attention
from transformers import AutoTokenizer

from trellis.models.llama import TrellisLlama

PASSAGE = ("A radix tree stores strings by their shared beginnings: each edge carries a run of symbols, and "
           "a node branches only where two stored strings first differ. Looking a string up walks down from "
           "the root, comparing one edge at a time, so the cost depends on the length of the string and not "
           "on how many strings the tree holds. Serving systems use the same structure over token ids to find "
           "the longest part of a new prompt whose keys and values are already cached, and they evict the "
           "least recently used leaves when memory runs short.")
TASKS = {"copy a passage": f"Copy this text exactly, word for word:\n\n{PASSAGE}",
         "answer a question": "Explain in a few sentences why the sky is blue and why sunsets are red."}
# name -> (attention implementation, prompt_lookup_num_tokens)
SYSTEMS = {"transformers greedy": ("sdpa", None), "transformers prompt lookup": ("sdpa", 10),
           "trellis greedy": ("trellis", None), "trellis prompt lookup": ("trellis", 10)}


def timed_generate(model: TrellisLlama, ids: torch.Tensor, new_tokens: int, lookup: int | None) -> tuple[float, list[int]]:
    if model.config._attn_implementation == "trellis":
        model.prefix_cache.reset()  # every system starts cold
    extra = {} if lookup is None else {"prompt_lookup_num_tokens": lookup}
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **extra)
    return time.perf_counter() - start, out[0, ids.shape[1]:].tolist()


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, help="D, tokens generated per call (default 128; --quick: 32)")
    args = p.parse_args()
    refuse_unused(p, args, "plot")
    if args.model != "smollm2":
        p.error("prompt lookup needs real text: this benchmark runs on the embedded SmolLM2 only")
    model = load_model(args)
    tok = AutoTokenizer.from_pretrained(model.name_or_path)
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    names = list(SYSTEMS)
    info = describe(model, args.model)
    print(f"{info}\nD={new_tokens}, median s per generate() over {repeats} repeats\n")
    print("| task | prompt tokens | " + " | ".join(names) + " | prompt lookup speed-up, transformers | Trellis |")
    print("|---|---|" + "---|" * (len(names) + 2))
    rows = []
    with torch.inference_mode():
        for task, text in TASKS.items():
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            times: dict[str, list[float]] = {name: [] for name in names}
            outputs = {}
            for r in range(repeats + 1):  # the first round is untimed: first-call costs
                for name in rotated(names, r):
                    implementation, lookup = SYSTEMS[name]
                    with attention(model, implementation) as system:
                        seconds, outputs[name] = timed_generate(system, ids, new_tokens, lookup)
                    if r:
                        times[name].append(seconds)
            if any(out != outputs[names[0]] for out in outputs.values()):
                raise RuntimeError(f"{task}: the systems generated different greedy tokens")
            row = {"task": task, "prompt_tokens": ids.shape[1], **{n: statistics.median(t) for n, t in times.items()}}
            rows.append(row)
            print(f"| {task} | {row['prompt_tokens']} | " + " | ".join(f"{row[n]:.2f}" for n in names)
                  + f" | {row['transformers greedy'] / row['transformers prompt lookup']:.2f}×"
                  + f" | {row['trellis greedy'] / row['trellis prompt lookup']:.2f}× |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "new_tokens": new_tokens, "repeats": repeats,
                                         "statistic": "median s per generate()", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
