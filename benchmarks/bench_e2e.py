"""End to end on one device: Trellis beside plain transformers on the same random weights.

    python benchmarks/bench_e2e.py [--device cuda] [--dtype bfloat16] [--model tinyllama|tiny]
                                   [--backend triton] [--prompt 512] [--decode 128] [--sessions 8]
                                   [--repeats 3] [--no-cuda-graphs] [--profile] [--json PATH]

One set of weights serves both systems (transformers runs them in its own ``LlamaForCausalLM``
with sdpa attention, as in the other benchmarks: ``common.attention``). Per system, medians of
--repeats after one untimed round (the first call of a shape compiles Triton's kernels):

  ttft_cold    a --prompt-token prompt, one token (Trellis' cache emptied first)
  ttft_cached  a prompt sharing all but its last 32-token block with the one just served
               (transformers keeps nothing across calls: the same cost as cold)
  decode       one session's decode rate: D / (t(prompt, D + 1 tokens) − t(prompt, 1 token)), cold
  sessions     --sessions prompts over a φ=0.5 shared prefix, D/2 tokens each, tokens/s of a whole
               op (``systems.py``): Trellis' engine against one batched ``generate()`` call

``--profile`` adds, per system, where one cold prompt's host time goes (the host launches every
kernel of a prefill, which bounds it on a GPU), from ``torch.profiler``: its wall time, the part
inside ATen and custom ops, the rest (Python, Triton's launcher among it), and the ops with the
most self CPU time.

``--model tinyllama`` is TinyLlama-1.1B's shape; ``tiny`` a 2-layer model for a self-test on CPU
(with ``--backend triton`` and ``TRITON_INTERPRET=1`` it runs the Triton kernels in the interpreter).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from common import TINYLLAMA, Workload, clock, describe, plain_llama
from report import e2e_table
from systems import HFGenerateBatched, Trellis
from transformers import LlamaConfig

from trellis import ops
from trellis.models.llama import TrellisLlama

TINY = {**TINYLLAMA, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}  # TinyLlama's vocabulary and GQA, 2 small layers
SYSTEMS = ("trellis", "transformers")


def build(name: str, dtype: torch.dtype, device: torch.device, backend: str | None) -> TrellisLlama:
    torch.manual_seed(0)
    with device:  # initialised where it runs: 1.1B parameters are slow to initialise on the host
        model = TrellisLlama._from_config(LlamaConfig(**(TINYLLAMA if name == "tinyllama" else TINY)),
                                          attn_implementation="trellis", dtype=dtype).eval()
    model.configure_cache(backend=backend)
    model.generation_config.eos_token_id = None  # every call generates exactly the tokens asked for
    return model


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of ``fn``, the device's queue drained on both sides."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = clock()
    fn()
    synchronize()
    return clock() - start


def single_session(model: TrellisLlama, system: str, w: Workload, decode: int, repeats: int) -> dict:
    first, second = (torch.tensor([w.prompt(i)], device=model.device) for i in (0, 1))  # share w.shared tokens

    runs = plain_llama(model, "sdpa") if system == "transformers" else model

    def generate(ids: torch.Tensor, new_tokens: int) -> Callable[[], object]:
        return lambda: runs.generate(ids, max_new_tokens=new_tokens, do_sample=False)

    def empty_cache() -> None:
        if system == "trellis":
            model.prefix_cache.reset()

    cold, cached, full = [], [], []
    for _ in range(repeats + 1):  # the first round compiles and is dropped
        empty_cache()
        cold.append(timed(generate(first, 1), model.device))
        cached.append(timed(generate(second, 1), model.device))  # Trellis: over the first prompt's prefix
        empty_cache()
        full.append(timed(generate(first, decode + 1), model.device))
    cold, cached, full = cold[1:], cached[1:], full[1:]
    decoding = statistics.median(full) - statistics.median(cold)
    return {"ttft_cold_s": cold, "ttft_cached_s": cached, "generate_decode_s": full,
            # None where the decode is shorter than the TTFT's spread: no rate can be told from it
            "decode_tokens_per_s": decode / decoding if decoding > 0 else None}


def profile_cold_prompt(model: TrellisLlama, system: str, w: Workload, top: int = 15) -> dict:
    """One cold prompt, profiled (after the timed rounds: nothing compiles): its wall time, the
    self CPU time of all ops, and the ``top`` ops by it."""
    ids = torch.tensor([w.prompt(0)], device=model.device)
    if system == "trellis":
        model.prefix_cache.reset()
    runs = plain_llama(model, "sdpa") if system == "transformers" else model
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        wall = timed(lambda: runs.generate(ids, max_new_tokens=1, do_sample=False), model.device)
    ops = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"wall_ms": 1e3 * wall, "in_ops_ms": sum(e.self_cpu_time_total for e in ops) / 1e3,
            "top": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in ops[:top]]}


def sessions(model: TrellisLlama, w: Workload, repeats: int) -> dict[str, list[float]]:
    """Tokens/s per op of Trellis' engine and of one batched generate() over the same N prompts."""
    out = {}
    for name, system in (("trellis", Trellis(model)), ("transformers", HFGenerateBatched(model))):
        system.op(w)  # compiles
        out[name] = [system.op(w).tokens_per_s for _ in range(repeats)]
    return out


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = build(args.model, dtype, device, args.backend)
    model.runner.use_cuda_graphs = not args.no_cuda_graphs
    w = Workload(L=args.prompt, D=args.decode, N=1, phi=1.0)  # φ=1: all but the last 32-token block shared
    result = {name: single_session(model, name, w, args.decode, args.repeats) for name in SYSTEMS}
    if args.profile:
        for name in SYSTEMS:
            result[name]["cold_prompt_profile"] = profile_cold_prompt(model, name, w)
    batch = Workload(L=args.prompt, D=max(args.decode // 2, 1), N=args.sessions, phi=0.5)
    for name, speeds in sessions(model, batch, args.repeats).items():
        result[name]["sessions_tokens_per_s"] = speeds
    model_name = {"tinyllama": "TinyLlama-1.1B shape, random init (timing only)",
                  "tiny": "2-layer Llama, TinyLlama's vocabulary, random init (self-test)"}[args.model]
    return {"info": {**describe(model, model_name), "device": str(device), "cuda_graphs": not args.no_cuda_graphs},
            "settings": {"prompt": args.prompt, "decode": args.decode, "shared_tokens": w.shared,
                         "sessions": args.sessions, "session_decode": batch.D, "session_phi": batch.realized_phi,
                         "repeats": args.repeats},
            "systems": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--model", default="tinyllama", choices=("tinyllama", "tiny"))
    parser.add_argument("--backend", choices=ops.BACKENDS, help="Trellis attention backend (default: the device's)")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (a multiple of 32)")
    parser.add_argument("--decode", type=int, default=128, help="decode tokens of the single session")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="Trellis runs every decode step eagerly")
    parser.add_argument("--profile", action="store_true", help="where one cold prompt's host time goes, per system")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(e2e_table(result))
    for name in SYSTEMS if args.profile else ():
        p = result["systems"][name]["cold_prompt_profile"]
        print(f"\n{name}, one cold prompt, profiled: {p['wall_ms']:.1f} ms, {p['in_ops_ms']:.1f} in ops; self CPU ms "
              "(calls): " + ", ".join(f"{op['op']} {op['self_cpu_ms']:.1f} ({op['calls']})" for op in p["top"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
