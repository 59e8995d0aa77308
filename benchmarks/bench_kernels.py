"""Paged attention microbenchmark: each backend on this machine beside gather + SDPA and the
machine's measured memory-read bandwidth, one row per configuration.

    python benchmarks/bench_kernels.py [--quick] [--json PATH] [--dtype float32] [--threads N]

Decode reads each sequence's whole K/V once per step, so its figure of merit is GB/s of K/V
read, as a share of what a plain ``x.sum()`` over a large tensor reads per second here. Extend
(new tokens over a cached prefix) is compute-bound: TFLOP/s counts 4 * D flops per visible
(query, key) pair and query head. Block tables are random permutations (scattered blocks). Each
configuration is planned once (``ops.plan_attention``, as a model plans once per forward) and
timed per layer (``ops.run_attention``).
Times are medians over repeated calls (``--stat min`` for the fastest call: on a machine other
processes share, a thread that loses its core stalls the others at the join, and the median
then measures the scheduler). The load average is printed for that reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trellis import ops

MODELS = {"TinyLlama": (32, 4, 64), "SmolLM2": (9, 3, 64)}  # query heads, KV heads, head dim
BLOCK_SIZE = 32


@dataclass(frozen=True)
class Config:
    model: str
    batch: int
    context: int  # K/V length of each sequence after this step
    new_tokens: int  # queries per sequence: 1 is decode, more is extend over a cached prefix

    @property
    def kind(self) -> str:
        return "decode" if self.new_tokens == 1 else "extend"


def configs(quick: bool) -> list[Config]:
    if quick:
        return [
            Config("TinyLlama", 8, 4096, 1),
            Config("SmolLM2", 8, 1024, 1),
            Config("TinyLlama", 1, 2048, 1),
            Config("TinyLlama", 1, 1024, 512),
            Config("SmolLM2", 1, 1024, 512),
        ]
    decode = [
        Config(model, batch, context, 1)
        for model in MODELS
        for batch in (1, 8, 32)
        for context in (512, 1024, 2048, 4096, 8192)
    ]
    extend = [
        Config(model, batch, context, new)
        for model in MODELS
        for batch, context, new in ((1, 1024, 512), (1, 4096, 512), (4, 2048, 256))
    ]
    return decode + extend


@dataclass
class Problem:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [N, S, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [B, max_blocks] int32, a random permutation of the blocks
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    scale: float


def make_problem(config: Config, dtype: torch.dtype, device: torch.device) -> Problem:
    num_q_heads, num_kv_heads, head_dim = MODELS[config.model]
    blocks_per_seq = math.ceil(config.context / BLOCK_SIZE)
    num_blocks = config.batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    return Problem(
        q=torch.randn(config.batch * config.new_tokens, num_q_heads, head_dim, device=device, dtype=dtype),
        k_cache=torch.randn(shape, device=device, dtype=dtype),
        v_cache=torch.randn(shape, device=device, dtype=dtype),
        block_table=torch.randperm(num_blocks, device=device).view(config.batch, blocks_per_seq).int(),
        seq_lens=torch.full((config.batch,), config.context, dtype=torch.int32, device=device),
        cu_seqlens_q=torch.arange(
            0, config.batch * config.new_tokens + 1, config.new_tokens, dtype=torch.int32, device=device
        ),
        scale=head_dim**-0.5,
    )


def plan(problem: Problem, config: Config, backend: str) -> ops.AttentionPlan:
    p = problem
    return ops.plan_attention(
        p.block_table,
        p.seq_lens,
        p.cu_seqlens_q,
        num_tokens=p.q.shape[0],
        num_q_heads=p.q.shape[1],
        k_cache=p.k_cache,
        max_q_len=config.new_tokens,
        max_kv_len=config.context,
        backend=backend,
    )


def paged(problem: Problem, config: Config, backend: str):
    out = torch.empty_like(problem.q)
    p, attention_plan = problem, plan(problem, config, backend)
    return lambda: ops.run_attention(attention_plan, p.q, p.k_cache, p.v_cache, p.scale, out=out)


def gather_sdpa(problem: Problem, config: Config):
    """The baseline: gather each sequence's blocks into contiguous K/V, then one batched SDPA."""
    p = problem
    num_q_heads, _, head_dim = MODELS[config.model]
    key_pos = torch.arange(config.context, device=p.q.device)
    query_pos = key_pos[-config.new_tokens :]
    mask = None if config.new_tokens == 1 else key_pos[None, :] <= query_pos[:, None]  # bottom-right causal

    def run() -> torch.Tensor:
        def gather(cache: torch.Tensor) -> torch.Tensor:
            blocks = cache[p.block_table.long()]  # [B, blocks, S, Hkv, D]
            return blocks.flatten(1, 2)[:, : config.context].transpose(1, 2)  # [B, Hkv, L, D]

        q = p.q.view(config.batch, config.new_tokens, num_q_heads, head_dim).transpose(1, 2)  # [B, Hq, Q, D]
        return F.scaled_dot_product_attention(
            q, gather(p.k_cache), gather(p.v_cache), attn_mask=mask, scale=p.scale, enable_gqa=True
        )

    return run


def call_seconds(fn, device: torch.device, min_seconds: float, stat: str = "median", max_calls: int = 50) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) if stat == "median" else min(times)


def read_bandwidth(device: torch.device) -> float:
    """GB/s that a plain sum over a tensor far larger than the caches reads here."""
    x = torch.ones(128 * 2**20 // 2, device=device)  # 256 MB of fp32
    seconds = call_seconds(x.sum, device, 1.0, "min")
    return x.numel() * x.element_size() / seconds / 1e9


def kv_bytes(problem: Problem, config: Config) -> int:
    _, num_kv_heads, head_dim = MODELS[config.model]
    return 2 * config.batch * config.context * num_kv_heads * head_dim * problem.k_cache.element_size()


def flops(config: Config) -> int:
    num_q_heads, _, head_dim = MODELS[config.model]
    prefix = config.context - config.new_tokens
    visible = sum(prefix + i + 1 for i in range(config.new_tokens))  # (query, key) pairs per sequence
    return 4 * head_dim * num_q_heads * visible * config.batch


# entry point -> its key in the JSON rows (benchmarks/report.py reads the first two)
ROW_KEYS = {
    "trellis.ops": "call_pair_us_public",
    "torch.ops.trellis": "call_pair_us_torch_ops",
    "torch.ops.trellis_cpp": "call_pair_us_trellis_cpp",
}


def call_overhead(device: torch.device, backend: str) -> dict[str, float]:
    """Microseconds for one layer's decode step, store_kv + paged attention with a plan, on a tiny
    problem (B=1, 32 keys, SmolLM2 heads), by entry point: what a 30-layer model pays per token.
    ``torch.ops.trellis`` on CPU goes through the Python kernel that forwards to the C++ library."""
    config = Config("SmolLM2", 1, 32, 1)
    p = make_problem(config, torch.float32, device)
    out, attention_plan = torch.empty_like(p.q), plan(p, config, backend)
    k = torch.randn(1, *p.k_cache.shape[2:], device=device)  # [T, Hkv, D]
    slots = torch.tensor([31], device=device)
    attention_args = (p.q, p.k_cache, p.v_cache, p.block_table, p.seq_lens, p.cu_seqlens_q, p.scale, out)

    def public() -> None:
        ops.store_kv(k, k, p.k_cache, p.v_cache, slots, backend=backend)
        ops.run_attention(attention_plan, p.q, p.k_cache, p.v_cache, p.scale, out=out)

    def through(namespace) -> Callable[[], None]:
        def call() -> None:
            namespace.store_kv(k, k, p.k_cache, p.v_cache, slots)
            namespace.paged_attention(*attention_args, attention_plan.backend_plan)

        return call

    entries = {"trellis.ops": public, "torch.ops.trellis": through(torch.ops.trellis)}
    if backend == "cpp":
        entries["torch.ops.trellis_cpp"] = through(torch.ops.trellis_cpp)
    return {name: call_seconds(fn, device, 0.3, "min", max_calls=2000) * 1e6 for name, fn in entries.items()}


def backends_for(device: torch.device) -> list[str]:
    names = []
    for name in ops.BACKENDS:
        try:
            ops.check_backend(name, device)  # raises for another device's backend or one that cannot load
        except (ValueError, RuntimeError):
            continue
        names.append(name)
    return names


def bench_device(device: torch.device, dtype: torch.dtype, quick: bool, stat: str) -> list[dict]:
    bandwidth = read_bandwidth(device)
    backends = backends_for(device)
    min_seconds = 0.3 if quick else 1.0
    print(
        f"\n{device.type}: read bandwidth {bandwidth:.1f} GB/s (fastest x.sum() over 256 MB), {dtype}, "
        f"{stat} times, backends {', '.join(backends)} + gather+SDPA"
    )
    header = f"{'config':<32}" + "".join(f"{name:>28}" for name in [*backends, "gather+sdpa"]) + f"{'best/sdpa':>11}"
    print(header + "\n" + " " * 32 + "".join(f"{'us   KV GB/s  %bw  TFLOP/s':>28}" for _ in range(len(backends) + 1)))
    rows = []
    for config in configs(quick):
        problem = make_problem(config, dtype, device)
        methods = {name: paged(problem, config, name) for name in backends}
        methods["gather+sdpa"] = gather_sdpa(problem, config)
        line = f"{config.model} {config.kind} B={config.batch} L={config.context} new={config.new_tokens}"
        line = f"{line:<32}"
        seconds = {}
        for name, fn in methods.items():
            seconds[name] = call_seconds(fn, device, min_seconds, stat)
            gbps = kv_bytes(problem, config) / seconds[name] / 1e9
            tflops = flops(config) / seconds[name] / 1e12
            rows.append(
                {
                    **asdict(config),
                    "kind": config.kind,
                    "device": device.type,
                    "dtype": str(dtype),
                    "method": name,
                    "stat": stat,
                    "us": seconds[name] * 1e6,
                    "kv_gbps": gbps,
                    "pct_read_bandwidth": 100 * gbps / bandwidth,
                    "tflops": tflops,
                    "read_bandwidth_gbps": bandwidth,
                }
            )
            line += f"{seconds[name] * 1e6:>11.0f}{gbps:>8.1f}{100 * gbps / bandwidth:>5.0f}{tflops:>7.3f}  "
        best = min(seconds[name] for name in backends)
        print(f"{line}{seconds['gather+sdpa'] / best:>9.1f}x", flush=True)
        del problem, methods
    for name in [name for name in backends if name != "reference"]:  # what torch.ops reaches here
        entries = call_overhead(device, name)
        print(
            f"{name}: one layer's decode call pair (store_kv + paged attention, 32 keys): "
            + ", ".join(f"{us:.1f} us through {entry}" for entry, us in entries.items())
        )
        rows.append({"device": device.type, "method": name, **{ROW_KEYS[e]: us for e, us in entries.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few configurations, under a minute")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stat", default="median", choices=["median", "min"], help="which call time to report")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}"
    )
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [row for device in devices for row in bench_device(device, dtype, args.quick, args.stat)]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": os.getloadavg()[0],
        }
        args.json.write_text(json.dumps({"machine": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
