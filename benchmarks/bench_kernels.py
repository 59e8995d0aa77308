"""Paged attention microbenchmark: each backend on this machine beside the SDPA baselines and the
machine's measured memory bandwidth, one row per configuration.

    python benchmarks/bench_kernels.py [--quick | --size full|quick|gpu|tiny] [--device cpu|cuda]
                                       [--json PATH] [--dtype float32] [--threads N]

Baselines, all ``scaled_dot_product_attention``:
  gather+sdpa  the blocks gathered into contiguous K/V in every call, then one SDPA (``enable_gqa``)
  sdpa         K/V already contiguous ([B, Hkv, L, D], as transformers' ``DynamicCache`` holds
               them), through transformers' own ``sdpa_attention_forward``: ``enable_gqa`` without a
               mask (decode), K/V heads repeated under a mask (extend)
  sdpa fold    contiguous K/V with the query heads of each K/V head folded into its rows
               ([B, Hkv, G·Q, D]): one multi-head SDPA over Hkv heads, K/V read once
  sdpa flash   CUDA, half precision: contiguous K/V (heads repeated beforehand, untimed), a
               bottom-right causal bias, the flash backend forced
Each row also states the kernel's lead: the strongest (fastest) baseline's time / the kernel's.

Decode reads each sequence's whole K/V once per step, so its figure of merit is GB/s of K/V
read, as a share of the device's bandwidth: on CPU what a plain ``x.sum()`` over a large tensor
reads per second; on CUDA a device-to-device copy (bytes read + written per second). Extend
(new tokens over a cached prefix) is compute-bound: TFLOP/s counts 4 * D flops per visible
(query, key) pair and query head. Block tables are random permutations (scattered blocks). Each
configuration is planned once (``ops.plan_attention``, as a model plans once per forward) and
timed per layer (``ops.run_attention``).
Times are medians over repeated calls (``--stat min`` for the fastest call: on a machine other
processes share, a thread that loses its core stalls the others at the join, and the median
then measures the scheduler). The load average is printed for that reason. On CUDA, calls are
timed with CUDA events and the L2 cache flushed before each (``common.call_seconds``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from common import call_seconds, environment
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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


def configs(size: str) -> list[Config]:
    """``full`` (the published CPU grid), ``quick``, ``gpu`` (sizes where a GPU's time is the kernel's,
    a few seconds in all) or ``tiny`` (a self-test that the interpreter runs in seconds)."""
    if size == "tiny":
        return [Config("SmolLM2", 2, 96, 1), Config("SmolLM2", 1, 96, 32)]
    if size == "quick":
        return [
            Config("TinyLlama", 8, 4096, 1),
            Config("SmolLM2", 8, 1024, 1),
            Config("TinyLlama", 1, 2048, 1),
            Config("TinyLlama", 1, 1024, 512),
            Config("SmolLM2", 1, 1024, 512),
        ]
    if size == "gpu":
        decode = [Config(model, batch, context, 1) for model in MODELS
                  for batch, context in ((1, 8192), (8, 4096), (32, 4096), (32, 16384))]
        extend = [Config(model, batch, context, new) for model in MODELS
                  for batch, context, new in ((1, 4096, 512), (4, 8192, 1024), (16, 2048, 2048))]
        return decode + extend
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


def causal_mask(config: Config, device: torch.device) -> torch.Tensor | None:
    """[Q, L] bool, bottom-right causal (the new tokens are the last Q of L); None for decode."""
    if config.new_tokens == 1:
        return None
    key_pos = torch.arange(config.context, device=device)
    return key_pos[None, :] <= key_pos[-config.new_tokens:, None]


def gather(problem: Problem, cache: torch.Tensor, config: Config) -> torch.Tensor:
    """Each sequence's blocks as contiguous K or V: [B, Hkv, L, D]."""
    blocks = cache[problem.block_table.long()]  # [B, blocks, S, Hkv, D]
    return blocks.flatten(1, 2)[:, : config.context].transpose(1, 2)


def queries(problem: Problem, config: Config) -> torch.Tensor:
    num_q_heads, _, head_dim = MODELS[config.model]
    return problem.q.view(config.batch, config.new_tokens, num_q_heads, head_dim).transpose(1, 2)  # [B, Hq, Q, D]


Method = Callable[[], torch.Tensor]


def gather_sdpa(problem: Problem, config: Config) -> Method:
    """Gather each sequence's blocks into contiguous K/V, then one batched SDPA: the paged baseline."""
    p, mask = problem, causal_mask(config, problem.q.device)

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(queries(p, config), gather(p, p.k_cache, config),
                                              gather(p, p.v_cache, config), attn_mask=mask, scale=p.scale,
                                              enable_gqa=True)

    return run


def contiguous_sdpa(problem: Problem, config: Config) -> Method:
    """K/V contiguous ahead of the call, through transformers' sdpa attention as a ``DynamicCache``
    model calls it (a boolean [B, 1, Q, L] mask where there is a prefix, none for decode)."""
    p, (num_q_heads, num_kv_heads, _) = problem, MODELS[config.model]
    k, v = gather(p, p.k_cache, config).contiguous(), gather(p, p.v_cache, config).contiguous()
    mask = causal_mask(config, p.q.device)
    mask = None if mask is None else mask.expand(config.batch, 1, *mask.shape)
    layer = SimpleNamespace(num_key_value_groups=num_q_heads // num_kv_heads, is_causal=True)
    return lambda: sdpa_attention_forward(layer, queries(p, config), k, v, mask, scaling=p.scale)[0]


def folded_sdpa(problem: Problem, config: Config) -> Method:
    """Contiguous K/V, the G query heads of each K/V head folded into its rows: a multi-head SDPA
    over Hkv heads that reads each K/V head once (the mask repeated per folded head)."""
    p, (num_q_heads, num_kv_heads, head_dim) = problem, MODELS[config.model]
    groups = num_q_heads // num_kv_heads
    k, v = gather(p, p.k_cache, config).contiguous(), gather(p, p.v_cache, config).contiguous()
    mask = causal_mask(config, p.q.device)
    mask = None if mask is None else mask.repeat(groups, 1)  # [G·Q, L]: folded row g·Q + i is query i

    def run() -> torch.Tensor:
        q = p.q.view(config.batch, config.new_tokens, num_kv_heads, groups, head_dim)  # [B, Q, Hkv, G, D]
        q = q.permute(0, 2, 3, 1, 4).reshape(config.batch, num_kv_heads, groups * config.new_tokens, head_dim)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=p.scale)  # [B, Hkv, G·Q, D]

    return run


def flash_sdpa(problem: Problem, config: Config) -> Method:
    """CUDA: contiguous K/V with their heads repeated beforehand (untimed, flash's best case) and a
    bottom-right causal bias, on the flash backend alone (an error, not a silent fallback, if it refuses)."""
    p, (num_q_heads, num_kv_heads, _) = problem, MODELS[config.model]
    k, v = (gather(p, c, config).repeat_interleave(num_q_heads // num_kv_heads, 1).contiguous()
            for c in (p.k_cache, p.v_cache))
    bias = None if config.new_tokens == 1 else causal_lower_right(config.new_tokens, config.context)

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(queries(p, config), k, v, attn_mask=bias, scale=p.scale)

    return run


def baselines(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[Problem, Config], Method]]:
    found = {"gather+sdpa": gather_sdpa, "sdpa": contiguous_sdpa, "sdpa fold": folded_sdpa}
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        found["sdpa flash"] = flash_sdpa
    return found


def device_bandwidth(device: torch.device) -> tuple[float, str]:
    """GB/s of the device's memory and how it was measured: on CPU the fastest plain sum over a
    tensor far larger than the caches (bytes read); on CUDA a 1 GiB device-to-device copy (bytes
    read and written), the roof a kernel that streams K/V can approach."""
    if device.type == "cuda":
        src = torch.ones(2**28, device=device)  # 1 GiB of fp32
        dst = torch.empty_like(src)
        seconds = call_seconds(lambda: dst.copy_(src), device, 0.2, "median")
        return 2 * src.numel() * src.element_size() / seconds / 1e9, "copy"
    x = torch.ones(128 * 2**20 // 2, device=device)  # 256 MB of fp32
    seconds = call_seconds(x.sum, device, 1.0, "min")
    return x.numel() * x.element_size() / seconds / 1e9, "read"


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


def bench_device(device: torch.device, dtype: torch.dtype, size: str, stat: str) -> tuple[list[dict], list[dict]]:
    """Every configuration on ``device``: one row per method, and one lead per configuration."""
    bandwidth, measured = device_bandwidth(device)
    backends = backends_for(device)
    kernels = [name for name in backends if name != "reference"]
    compared = baselines(device, dtype)
    min_seconds = 0.3 if size != "full" else 1.0
    print(
        f"\n{device.type}: {measured} bandwidth {bandwidth:.1f} GB/s, {dtype}, {stat} times, backends "
        f"{', '.join(backends)}; baselines {', '.join(compared)}"
    )
    width = 26
    print(f"{'config':<32}" + "".join(f"{name:>{width}}" for name in [*backends, *compared]) + "   lead over the strongest")
    print(" " * 32 + "".join(f"{'us  KV GB/s  %bw TFLOP/s':>{width}}" for _ in range(len(backends) + len(compared))))
    rows, leads = [], []
    for config in configs(size):
        problem = make_problem(config, dtype, device)
        methods = {name: paged(problem, config, name) for name in backends}
        methods.update({name: make(problem, config) for name, make in compared.items()})
        line = f"{config.model} {config.kind} B={config.batch} L={config.context} new={config.new_tokens}"
        line = f"{line:<32}"
        seconds = {}
        for name, fn in methods.items():
            seconds[name] = call_seconds(fn, device, min_seconds, stat)
            gbps = kv_bytes(problem, config) / seconds[name] / 1e9
            tflops = flops(config) / seconds[name] / 1e12
            row = {**asdict(config), "kind": config.kind, "device": device.type, "dtype": str(dtype), "method": name,
                   "stat": stat, "us": seconds[name] * 1e6, "kv_gbps": gbps, "tflops": tflops,
                   "bandwidth_gbps": bandwidth, "bandwidth_method": measured,
                   "pct_bandwidth": 100 * gbps / bandwidth}
            rows.append(row)
            line += f"{seconds[name] * 1e6:>9.0f}{gbps:>8.1f}{100 * gbps / bandwidth:>5.0f}{tflops:>7.3f}  "
        if kernels:
            kernel = min(kernels, key=seconds.get)
            baseline = min(compared, key=seconds.get)
            lead = seconds[baseline] / seconds[kernel]
            leads.append({**asdict(config), "kind": config.kind, "device": device.type, "kernel": kernel,
                          "kernel_us": seconds[kernel] * 1e6, "baseline": baseline,
                          "baseline_us": seconds[baseline] * 1e6, "lead": lead})
            line += f"{kernel} {lead:.2f}x vs {baseline}"
        print(line, flush=True)
        del problem, methods
    # torch.ops.trellis reaches the device's own kernels: C++ on CPU (also under Triton's interpreter), Triton on CUDA.
    for name in [name for name in kernels if name == ops.default_backend(device)]:
        entries = call_overhead(device, name)
        print(
            f"{name}: one layer's decode call pair (store_kv + paged attention, 32 keys): "
            + ", ".join(f"{us:.1f} us through {entry}" for entry, us in entries.items())
        )
        rows.append({"device": device.type, "method": name, **{ROW_KEYS[e]: us for e, us in entries.items()}})
    return rows, leads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few configurations, under a minute (--size quick)")
    parser.add_argument("--size", choices=("full", "quick", "gpu", "tiny"), help="which configurations (default full)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="only this device (default: CPU, and CUDA if present)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stat", default="median", choices=["median", "min"], help="which call time to report")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    size = args.size or ("quick" if args.quick else "full")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}"
    )
    if args.device:
        devices = [torch.device(args.device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows, leads = [], []
    for device in devices:
        device_rows, device_leads = bench_device(device, dtype, size, args.stat)
        rows += device_rows
        leads += device_leads
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {**environment(dtype, None), "size": size}  # no linear layer runs here
        args.json.write_text(json.dumps({"machine": meta, "rows": rows, "leads": leads}, indent=1))


if __name__ == "__main__":
    main()
