"""Lower bounds on the peers' figures from this machine's ceilings: how fast any system could run
the seed's op, a cold prompt and the cached-prefix probe here, given the model's arithmetic and
bytes and the best rates this CPU reaches in the same run (``bench_peers.py`` records them).

Ceilings, measured with the run's thread count:

- GEMM: the faster of two products of 2048 x 2048 x 2048 per dtype, each the best of a few
  calls: ``torch.matmul`` (MKL in fp32, oneDNN in bf16) and, where they serve the dtype on this
  CPU, Trellis' panels (``panel_linear``; MKL's fp32 GEMM on AMD's cores runs at less than half
  their rate: 217 against 504 GFLOP/s on a 2-core Zen 5). The fastest this machine computes that
  arithmetic with the kernels at hand; not the hardware peak, which none reaches, nor the rate at
  the model's own small shapes, which is lower.
- read bandwidth, per dtype: the faster of two readers over as many bytes as the model's weights
  in that dtype (this CPU's large L3 serves buffers under ~128 MB at nearly twice the rate of
  larger ones, so the size matters; SmolLM2's weights take 270 MB in bf16, 540 in fp32), each the
  best of a few passes: ``x.sum()`` over fp32 (the hardware prefetchers alone) and Trellis' one-row
  streaming matmul over a weight in the dtype (``quant_linear``, which prefetches in software: the
  fastest reader known here, ~10 % ahead of ``x.sum()`` on the AMX Xeon).
- ``bench_peers.py`` measures them before the first system starts and after the last one ends,
  and takes each ceiling's higher figure: another tenant's burst lowers a measurement, never raises it.

A forward's floor is max(FLOPs / GEMM rate, bytes / bandwidth): it does every multiply-add at no
more than the ceiling rate and reads every weight at least once, at best both at once. The FLOPs
are the linear layers' (2 per weight per token), attention's (QK^T and PV: 4 * head_dim per query
head per visible key) and the LM head's rows'; the bytes are the weights (LM head included) and
the K/V the forward reads, each cached key once (a shared prefix is read once for all sessions).
The floors leave out everything else (norms, RoPE, sampling, Python), so no system running at these
ceilings reaches them: a target below its floor would take arithmetic or reads faster than anything
measured on this machine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

GEMM_SIZE = 2048
DTYPES = {"float32": 4, "bfloat16": 2}  # the dtypes with floors, and their bytes per element
STREAM_QTYPES = {"float32": "F32", "bfloat16": "BF16"}  # quant_linear's names of plain weights
STREAM_K = 1024  # the streamed weight's row length: whole 32-weight blocks


def measure_ceilings(threads: int, weight_bytes: dict[str, int], calls: int = 5) -> dict[str, float]:
    """Per dtype (``DTYPES``): the GEMM rate (GFLOP/s) and the rate (GB/s) of reading
    ``weight_bytes[dtype]`` bytes, each the fastest of ``calls`` timed calls (three at least; after
    an untimed one)."""
    import torch  # here only: report.py renders the floors with the standard library alone
    from common import call_seconds

    from trellis import ops
    from trellis.ops.panels import pack_panels
    from trellis.runner.cpu_linear import panels_serve

    def fastest(fn: Callable[[], object]) -> float:
        return call_seconds(fn, torch.device("cpu"), min_seconds=60.0, stat="min", max_calls=calls)  # (calls end it)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for name, element_bytes in DTYPES.items():
            generator = torch.Generator().manual_seed(0)
            dtype = getattr(torch, name)
            a, b = (torch.randn(GEMM_SIZE, GEMM_SIZE, generator=generator).to(dtype) for _ in "ab")
            seconds = fastest(functools.partial(torch.matmul, a, b))
            if panels_serve("packed", dtype):  # a @ b as x @ W^T, W = b^T in panels
                panels = pack_panels(b.t().contiguous())
                seconds = min(seconds, fastest(functools.partial(ops.panel_linear, a, panels, None, GEMM_SIZE, backend="cpp")))
            out[f"gemm_gflops_{name}"] = 2 * GEMM_SIZE**3 / seconds / 1e9
            flat = torch.ones(weight_bytes[name] // 4)
            seconds = fastest(flat.sum)
            del flat
            # A weight in the dtype, read by the streaming kernel (its K a whole number of blocks)
            weight = torch.ones(weight_bytes[name] // (STREAM_K * element_bytes), STREAM_K, dtype=dtype)
            row = torch.ones(1, STREAM_K, dtype=weight.dtype)
            stream = functools.partial(ops.quant_linear, row, weight, STREAM_QTYPES[name], backend="cpp")
            seconds = min(seconds, fastest(stream) * weight_bytes[name] / weight.nbytes)
            out[f"read_gb_per_s_{name}"] = weight_bytes[name] / seconds / 1e9
            del weight
        return out
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class Shape:
    """What a Llama model's forward computes and reads, from its config."""

    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.intermediate_size, config.vocab_size)

    @property
    def layer_weights(self) -> int:
        """Weights of every decoder layer's seven linear layers, all layers."""
        q, kv = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate)

    @property
    def head_weights(self) -> int:
        return self.vocab * self.hidden

    def weight_bytes(self, dtype: str) -> int:
        """The weights one forward reads (LM head included), in ``dtype``."""
        return (self.layer_weights + self.head_weights) * DTYPES[dtype]

    def kv_bytes_per_key(self, element_bytes: int) -> int:
        """K and V of one cached token, every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * element_bytes

    def forward_flops(self, new_tokens: int, cached: int, logit_rows: int) -> float:
        """One sequence's forward over ``new_tokens`` after ``cached`` keys, ``logit_rows`` LM-head rows."""
        visible_keys = new_tokens * cached + new_tokens * (new_tokens + 1) // 2  # causal: token i sees cached + i
        attention = 4 * self.head_dim * self.q_heads * self.layers * visible_keys
        return 2 * new_tokens * self.layer_weights + attention + 2 * logit_rows * self.head_weights


def forward_floor(flops: float, read_bytes: float, gflops: float, gb_per_s: float) -> float:
    """Seconds: every multiply-add at the GEMM ceiling, every byte at the read ceiling, overlapped."""
    return max(flops / (gflops * 1e9), read_bytes / (gb_per_s * 1e9))


def floors(shape: Shape, dtype: str, ceilings: dict[str, float], L: int, N: int, shared: int,
           decode_budgets: list[int]) -> dict[str, float]:
    """Floors (seconds) of the peers' measurements for weights and K/V in ``dtype`` (float32 or
    bfloat16): ``ttft_cold`` (an L-token prompt), ``ttft_probe`` (its last L - shared tokens after
    ``shared`` cached ones), ``decode_step`` (one session's token after L cached ones) and
    ``op_D{D}`` (warm the shared prefix with one token, then N prompts of L tokens sharing it, each
    to D tokens: their suffixes in one forward, then D - 1 decode steps of all N)."""
    gflops, bandwidth = ceilings[f"gemm_gflops_{dtype}"], ceilings[f"read_gb_per_s_{dtype}"]
    weights, kv = shape.weight_bytes(dtype), shape.kv_bytes_per_key(DTYPES[dtype])

    def forward(flops: float, cached_keys_read: int) -> float:
        return forward_floor(flops, weights + kv * cached_keys_read, gflops, bandwidth)

    out = {"ttft_cold": forward(shape.forward_flops(L, 0, 1), 0),
           "ttft_probe": forward(shape.forward_flops(L - shared, shared, 1), shared),
           "decode_step": forward(shape.forward_flops(1, L, 1), L)}
    warm = forward(shape.forward_flops(shared, 0, 1), 0)
    suffixes = forward(N * shape.forward_flops(L - shared, shared, 1), shared)
    for D in decode_budgets:
        steps = 0.0
        for context in range(L, L + D - 1):  # keys before each step's new token
            own = context - shared  # each session's keys past the shared prefix
            steps += forward(N * shape.forward_flops(1, context, 1), shared + N * own)
        out[f"op_D{D}"] = warm + suffixes + steps
    return out


PEER_OVER_1_5, COLD_TIMES_0_15 = "1/1.5 of the peer's", "0.15 x Trellis' cold TTFT"


def targets(budgets: list[int]) -> list[tuple[str, str, str, str | None, str | None]]:
    """(what, Trellis system, its measurement, how its target follows (None: no target), the
    peer that target compares with), for issue 18's targets and each dtype's one-session decode step."""
    dtypes = ("fp32", "bf16")
    return ([(f"N=4 op, D={D}, {dtype}", f"trellis_{dtype}", f"op_D{D}", PEER_OVER_1_5, f"vllm_{dtype}")
             for D in budgets for dtype in dtypes]
            + [(f"TTFT, cached-prefix probe, {dtype}", f"trellis_{dtype}", "ttft_probe", COLD_TIMES_0_15, None)
               for dtype in dtypes]
            + [(f"one session's decode step, {dtype}", f"trellis_{dtype}", "decode_step", None, None)
               for dtype in dtypes])


def measured(summary: dict, measurement: str) -> float | None:
    """One system's measurement in seconds (``floors``' names), or None where it lacks it."""
    if measurement == "decode_step":
        return summary["decode_ms_per_token"] / 1000 if "decode_ms_per_token" in summary else None
    value = summary.get(measurement)
    return value["seconds"] if isinstance(value, dict) else value


def target_rows(result: dict) -> list[list[str]]:
    """Per target of issue 18 (and each dtype's decode step): the floor, the target and Trellis'
    measurement, each time with the share of floor speed it is (floor / time)."""
    summary, weights, rows = result["summary"], result["floors"]["by_weights"], []
    for what, system, measurement, rule, peer in targets(result["workload"]["decode_budgets"]):
        if system not in summary:
            continue
        floor = weights[result["systems"][system]["weights"]][measurement]
        target = None
        if rule == PEER_OVER_1_5 and peer in summary:
            target = measured(summary[peer], measurement) / 1.5
        elif rule == COLD_TIMES_0_15:
            target = 0.15 * summary[system]["ttft_cold"]
        rows.append([what, f"{floor:.3g}", seconds_and_share(target, floor),
                     seconds_and_share(measured(summary[system], measurement), floor)])
    return rows


def seconds_and_share(seconds: float | None, floor: float) -> str:
    """``seconds`` and the share of floor speed it is (100 %: at the floor), or — where unknown."""
    return f"{seconds:.3g} ({100 * floor / seconds:.0f} %)" if seconds else "—"


TARGET_HEADER = ["seconds", "floor", "target (share of floor speed)", "Trellis (share of floor speed)"]


def ceilings_line(ceilings: dict[str, float]) -> str:
    return ("Floors at this run's ceilings (benchmarks/floors.py: GEMM " + ", ".join(
        f"{name} {ceilings[f'gemm_gflops_{name}']:.0f} GFLOP/s" for name in DTYPES) + "; weights read at " + ", ".join(
        f"{name} {ceilings[f'read_gb_per_s_{name}']:.1f} GB/s" for name in DTYPES) + ")")


def higher_ceilings(*measured: dict[str, float]) -> dict[str, float]:
    """Each ceiling's highest measurement."""
    return {key: max(m[key] for m in measured) for key in measured[0]}
