"""Model-level parity on this machine's device: a tiny random-init Llama run by Trellis (the paged
cache and the device's attention backend: Triton on CUDA) against transformers' sdpa on the same
weights, device and dtype. The GPU check's ``parity`` step, run before its benchmarks.

    python3 scripts/gpu_parity.py [--json PATH]

On CUDA in fp32 and bf16; without CUDA (the GPU check's ``--self-test``) on the CPU in fp32, the
Triton kernels in Triton's interpreter and the lean decoder off, as on CUDA, where it never runs.
Per dtype:
  cold      every logit of a batch of fresh prompts (the extend kernel)
  decode    the logits of one more token each, through the cache the cold forward returned
  hit       the last logits of a prompt whose first blocks are cached, and that it reused them
  greedy    generate()'s tokens: equal in fp32; in bf16 recorded (a near-tie may differ)
  sampling  an engine run with seeded top-k / top-p sampling, twice from a cold cache: full
            lengths and the same tokens
Logits pass when Trellis' largest error against fp32 sdpa is at most twice sdpa's own in that
dtype plus ``RTOL`` of the largest logit (fp32 rounding: packing a batch's rows into one sequence
changes the matmuls' shapes, ~1e-5 of it on the CPU; a wrong attention is off by 1e-2 and more). Prints one JSON line; exit status 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # Triton's kernels on CPU tensors: chosen before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.models, from any working directory
from transformers import LlamaForCausalLM

from tests.models import tiny_config
from trellis.engine.engine import Engine
from trellis.engine.sampling import SamplingParams
from trellis.models.llama import TrellisLlama
from trellis.models.paged_cache import CACHE_ARG

RTOL = 1e-4
BLOCK, PROMPT, SHARED, NEW_TOKENS = 16, 70, 64, 12  # SHARED: the whole blocks a later prompt reuses
# head dim 64 and a GQA group of 2, as in most Llamas; a large init range gives peaked logits, so
# greedy tokens are not decided by rounding noise.
CONFIG = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
          "num_key_value_heads": 2, "eos_token_id": None}


def models(device: torch.device, dtype: torch.dtype) -> tuple[LlamaForCausalLM, TrellisLlama]:
    """transformers' sdpa Llama and a TrellisLlama with the same random weights."""
    config = tiny_config(**CONFIG)
    torch.manual_seed(0)
    reference = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa")
    trellis = TrellisLlama._from_config(copy.deepcopy(config), attn_implementation="trellis")
    trellis.load_state_dict(reference.state_dict())
    trellis.configure_cache(block_size=BLOCK, num_blocks=64, backend="triton")  # interpreted on the CPU
    trellis.runner.use_lean_decoder = False  # what CUDA runs: the lean path serves CPU weights only
    return reference.to(device, dtype).eval(), trellis.to(device, dtype).eval()


def logit_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item()


def sampled_tokens(model: TrellisLlama, prompts: list[list[int]]) -> list[list[int]]:
    """Seeded top-k / top-p sampling on the engine, from a cold cache; every session's tokens."""
    model.prefix_cache.reset()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, seed=1)
    sessions = Engine(model).generate(prompts, params)
    errors = [s.error for s in sessions if s.error is not None]
    if errors:
        raise RuntimeError(f"the engine failed a session: {errors[0]}")
    return [s.generated for s in sessions]


@torch.no_grad()
def check(device: torch.device, dtype: torch.dtype,
          oracle: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """One dtype's checks; ``oracle`` holds fp32 sdpa's logits (filled by the fp32 run)."""
    reference, trellis = models(device, dtype)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, CONFIG["vocab_size"], (2, PROMPT), generator=g).to(device)  # [2, PROMPT]
    # The first SHARED tokens of row 0 (whole blocks), then tokens of its own.
    longer = torch.cat([prompts[:1, :SHARED], torch.randint(3, CONFIG["vocab_size"], (1, 9), generator=g).to(device)], 1)

    following = torch.randint(3, CONFIG["vocab_size"], (2, 1), generator=g).to(device)  # [2, 1]
    sdpa = {"cold": reference(prompts).logits, "decode": reference(torch.cat([prompts, following], 1)).logits[:, -1],
            "hit": reference(longer).logits[:, -1]}
    oracle = oracle or {name: logits.float() for name, logits in sdpa.items()}  # fp32 runs first
    cold = trellis(prompts)
    mine = {"cold": cold.logits, "decode": trellis(following, **{CACHE_ARG: cold[CACHE_ARG]}).logits[:, -1]}
    del cold  # its sessions' blocks go back to the pool; the computed prefixes stay cached
    hits_before = trellis.prefix_cache.stats()["hit_tokens"]
    mine["hit"] = trellis(longer, logits_to_keep=1).logits[:, -1]
    reused = trellis.prefix_cache.stats()["hit_tokens"] - hits_before
    row = {"backend": trellis.attention_backend(), "reused_tokens": reused}
    ok = reused == SHARED
    for name, theirs in sdpa.items():
        error, sdpa_error = logit_error(mine[name], oracle[name]), logit_error(theirs, oracle[name])
        row[f"{name}_error"], row[f"{name}_sdpa_error"] = error, sdpa_error
        ok &= error <= 2 * sdpa_error + RTOL * oracle[name].abs().max().item()

    greedy = trellis.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    row["greedy_equal"] = torch.equal(greedy, reference.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False))
    ok &= row["greedy_equal"] or dtype != torch.float32

    rows = [prompts[0].tolist(), prompts[1, :40].tolist()]
    first, second = sampled_tokens(trellis, rows), sampled_tokens(trellis, rows)
    row["sampled"] = first
    row["sampling_reproducible"] = first == second and all(len(tokens) == NEW_TOKENS for tokens in first)
    row["ok"] = bool(ok and row["sampling_reproducible"])
    return row, oracle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    result, oracle = {"device": str(device), "dtypes": {}}, {}
    for dtype in [torch.float32, *([torch.bfloat16] if device.type == "cuda" else [])]:
        result["dtypes"][str(dtype).removeprefix("torch.")], oracle = check(device, dtype, oracle)
    result["ok"] = all(row["ok"] for row in result["dtypes"].values())
    result["seconds"] = round(time.perf_counter() - started, 1)
    line = json.dumps(result)
    if args.json is not None:
        args.json.write_text(line)
    print(line)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
