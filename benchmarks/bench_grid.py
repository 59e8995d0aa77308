"""The grid on one machine: 1, 2 and 3 stages over loopback, and a model of the grid on a network.

Each configuration runs in its own process (fresh peak memory), through ``Engine``:

- the seed's workload: N=4 sessions of L=512 tokens sharing φ=0.9 of them, D new tokens each, the
  shared prefix computed once before each timed op (a new prefix per op); tokens/s = N·D / op time;
- TTFT of a cold 512-token prompt and of a φ=0.9 probe (its prefix cached), and one session's
  decode at ~512 tokens of context (ms per token);
- bytes the coordinator sends per decode step, every process's peak RSS and the weights each
  stage holds.

A ping-pong between two gloo processes measures one hop (latency and bandwidth over loopback).
From these the model predicts a grid of machines (``predict``): see docs/grid.md.

    python benchmarks/bench_grid.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import RESULTS, Workload, environment, markdown_table

from trellis import Engine, SamplingParams
from trellis.grid import GridOptions, GridRunner, LocalGrid, shared_host_environment
from trellis.grid.shared_host import SHARED_HOST_SPIN_COUNT
from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama

# (label, stages, threads per process, micro-batches, short OpenMP spin): one process with every
# core, then grids. On one machine a grid's default is one micro-batch, every process with every
# core and a short spin (shared_host_environment): the stages take turns. Two micro-batches of one
# thread each overlap the stages, as two machines would. The last row is one process with the
# grid's short spin, so the grid's setting is not compared against a process without it.
CONFIGS = [("1 process", 1, None, None, False),
           ("2 stages (default: 2 threads each, 1 micro-batch)", 2, None, None, True),
           ("2 stages, 1 thread each, 2 micro-batches", 2, 1, 2, True),
           ("3 stages (default: 2 threads each, 1 micro-batch)", 3, None, None, True),
           (f"1 process, GOMP_SPINCOUNT={SHARED_HOST_SPIN_COUNT}", 1, None, None, True)]
PING_SIZES = (1, 4, 64, 512)  # tokens of SmolLM2 activations (576 floats each)

# Networks for the model on paper: one-way latency (s) and usable bandwidth (bytes/s), assumed.
NETWORKS = {"gigabit Ethernet": (0.25e-3, 110e6), "Wi-Fi (802.11ac, one room)": (3e-3, 25e6)}
# Model shapes (hidden size, layers, weight bytes in fp32) for the predictions.
SHAPES = {"SmolLM2-135M": (576, 30, 538e6), "TinyLlama-1.1B": (2048, 22, 4.4e9)}


def rss(pid: int | str = "self", field: str = "VmHWM") -> int:
    """The process's peak (``VmHWM``) or current (``VmRSS``) resident memory, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def seed_op(engine: Engine, w: Workload) -> float:
    """Seconds for N sessions after their shared prefix was computed once (untimed)."""
    engine.generate([w.prefix() + w._tokens(99, 1)], SamplingParams(max_new_tokens=1))
    started = time.perf_counter()
    engine.generate([w.prompt(i) for i in range(w.N)], SamplingParams(max_new_tokens=w.D))
    return time.perf_counter() - started


def ttft(engine: Engine, prompt: list[int]) -> float:
    started = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_new_tokens=1))
    return time.perf_counter() - started


def measure(runner_or_model, settings: dict, seed: int) -> dict:
    engine = Engine(runner_or_model)
    L, repeats = settings["L"], settings["repeats"]
    engine.generate([Workload(L, 4, 2, 0.5, seed=seed + 500).prompt(0)], SamplingParams(max_new_tokens=4))  # warm-up
    out: dict = {}
    for D in settings["D"]:
        seconds = [seed_op(engine, Workload(L, D, settings["N"], 0.9, seed=seed + 10 * D + r)) for r in range(repeats)]
        out[f"seed_D{D}_s"] = seconds
        out[f"seed_D{D}_tokens_per_s"] = [settings["N"] * D / s for s in seconds]
    out["ttft_cold_s"] = [ttft(engine, Workload(L, 1, 1, 0.0, seed=seed + 200 + r).prompt(0)) for r in range(repeats)]
    probes = []
    for r in range(repeats):
        w = Workload(L, 1, 1, 0.9, seed=seed + 300 + r)
        engine.generate([w.prefix() + w._tokens(98, 1)], SamplingParams(max_new_tokens=1))
        probes.append(ttft(engine, w.prompt(0)))
    out["ttft_phi09_s"] = probes
    w = Workload(L, settings["decode_tokens"], 1, 0.0, seed=seed + 400)
    runner = engine.runner
    grid = isinstance(runner, GridRunner)
    bytes_before, steps_before = (runner.link.bytes_sent, runner.steps) if grid else (0, 0)
    (session,) = engine.generate([w.prompt(0)], SamplingParams(max_new_tokens=w.D))
    times = session.token_times
    out["decode_ms_per_token"] = 1000 * (times[-1] - times[0]) / (len(times) - 1)
    if grid:
        steps = runner.steps - steps_before
        out["bytes_per_step_coordinator"] = (runner.link.bytes_sent - bytes_before) / steps  # prefill step included
    return out


def child(label: str, stages: int, threads: int | None, micro_batches: int | None, short_spin: bool,
          settings: dict) -> dict:
    """One configuration, measured in this (fresh) process."""
    model_dir = str(embedded_model_dir())
    if stages == 1:
        if threads:
            torch.set_num_threads(threads)
        model = TrellisLlama.from_pretrained(model_dir, dtype=torch.float32, device="cpu", num_blocks=256)
        result = {"label": label, "stages": 1, "threads": torch.get_num_threads(),
                  "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"), **measure(model, settings, 0)}
        result["peak_rss_bytes"], result["rss_bytes"] = [rss()], [rss(field="VmRSS")]
        return result
    grid = LocalGrid(GridOptions(num_blocks=256, threads=threads, micro_batches=micro_batches, step_timeout=120), stages)
    with grid as runner:
        result = {"label": label, "stages": stages, "threads": threads or torch.get_num_threads(),
                  "micro_batches": runner.pipeline_depth, "layers": runner.placement.spec(),
                  "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
                  "stage_memory": runner.stage_memory, **measure(runner, settings, 0)}
        pids = ["self"] + [p.pid for p in grid.processes]
        result["peak_rss_bytes"] = [rss(pid) for pid in pids]
        result["rss_bytes"] = [rss(pid, "VmRSS") for pid in pids]
    return result


def ping_pong(rank: int, port: int, sizes: tuple[int, ...], hidden: int, rounds: int) -> dict:
    """Round trips of [T, hidden] fp32 activations between two gloo processes; one-way seconds by T."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=60))
    group = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=60))
    one_way = {}
    for tokens in sizes:
        tensor = torch.zeros(tokens, hidden)
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            if rank == 0:
                group.send([tensor], 1, 0).wait()
                group.recv([tensor], 1, 0).wait()
            else:
                group.recv([tensor], 0, 0).wait()
                group.send([tensor], 0, 0).wait()
            samples.append((time.perf_counter() - started) / 2)
        one_way[tokens] = statistics.median(samples)
    return {"one_way_s": one_way, "hidden": hidden}


def run_child(args_list: list[str], env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True, timeout=1800,
                         check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"bench_grid child {args_list} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def hop_fit(one_way: dict[int, float], hidden: int, dtype_bytes: int = 4) -> tuple[float, float]:
    """Latency (s) and bandwidth (bytes/s) of one hop, from the smallest and largest message."""
    small, large = min(one_way), max(one_way)
    bandwidth = (large - small) * hidden * dtype_bytes / max(one_way[large] - one_way[small], 1e-9)
    return one_way[small], bandwidth


def predict(single: dict, grid2: dict, loopback: tuple[float, float], settings: dict) -> list[dict]:
    """Two machines like this one on a network, each holding half the layers: tokens/s and TTFT.

    A step costs what it costs on one machine (the halves run one after the other), plus, per
    stage, one hop (``latency + bytes / bandwidth``, bytes = tokens × hidden × 4 in fp32) and one
    hand-over: the rest of what a stage boundary cost on loopback, calibrated from the measured
    2-stage grid on this machine (its decode step minus one process's and the two loopback hops).
    The ``ideal`` figures leave the hand-over out (what the hops alone cost). TinyLlama's compute
    is SmolLM2's scaled by weight bytes (decode is memory-bound). The N=4 figure is decode and
    suffix prefill of the seed's workload, one micro-batch (stages take turns).
    """
    stages, L, N = 2, settings["L"], settings["N"]
    D = max(settings["D"])
    decode_s = single["decode_ms_per_token"] / 1000
    cold_s = statistics.median(single["ttft_cold_s"])
    seed_step_s = N / statistics.median(single[f"seed_D{D}_tokens_per_s"])  # per token of each session
    loop_latency, loop_bandwidth = loopback
    handoff = max(0.0, (grid2["decode_ms_per_token"] / 1000 - decode_s
                        - stages * (loop_latency + 576 * 4 / loop_bandwidth)) / stages)
    rows = []
    for model, (hidden, _, weight_bytes) in SHAPES.items():
        scale = weight_bytes / SHAPES["SmolLM2-135M"][2]
        for network, (latency, bandwidth) in {"loopback": loopback, **NETWORKS}.items():
            if model != "SmolLM2-135M" and network == "loopback":
                continue

            def hops(tokens: int, with_handoff: bool = True, latency=latency, hidden=hidden, bandwidth=bandwidth) -> float:
                return stages * (latency + tokens * hidden * 4 / bandwidth + (handoff if with_handoff else 0.0))

            rows.append({
                "model": model, "network": network, "hop_latency_ms": 1000 * latency, "bandwidth_MBps": bandwidth / 1e6,
                "handoff_ms": 1000 * handoff,
                "single_machine_decode_tokens_per_s": 1 / (decode_s * scale),
                "decode_tokens_per_s": 1 / (decode_s * scale + hops(1)),
                "decode_tokens_per_s_ideal": 1 / (decode_s * scale + hops(1, False)),
                "single_machine_ttft_cold_s": cold_s * scale, "ttft_cold_s": cold_s * scale + hops(L),
                "single_machine_seed_tokens_per_s": N / (seed_step_s * scale),
                "seed_tokens_per_s": N / (seed_step_s * scale + hops(N)),
            })
    rows.append({"model": "SmolLM2-135M", "network": "loopback, measured (2 stages, 2 threads each)",
                 "decode_tokens_per_s": 1000 / grid2["decode_ms_per_token"],
                 "ttft_cold_s": statistics.median(grid2["ttft_cold_s"]),
                 "seed_tokens_per_s": statistics.median(grid2[f"seed_D{D}_tokens_per_s"])})
    return rows


def model_table(rows: list[dict]) -> str:
    def f(row: dict, key: str, digits: int = 1) -> str:
        return f"{row[key]:.{digits}f}" if key in row else ""
    return markdown_table(
        ["model", "network", "decode tok/s, one machine", "decode tok/s, 2 machines (ideal)",
         "TTFT cold s, one machine", "TTFT cold s, 2 machines", "N=4 tok/s, one machine", "N=4 tok/s, 2 machines"],
        [[r["model"], r["network"], f(r, "single_machine_decode_tokens_per_s"),
          f"{f(r, 'decode_tokens_per_s')}" + (f" ({f(r, 'decode_tokens_per_s_ideal')})" if "decode_tokens_per_s_ideal" in r else ""),
          f(r, "single_machine_ttft_cold_s", 2), f(r, "ttft_cold_s", 2), f(r, "single_machine_seed_tokens_per_s"),
          f(r, "seed_tokens_per_s")] for r in rows])


def tables(result: dict) -> str:
    rows = []
    for c in result["configs"]:
        med = statistics.median
        D = max(result["settings"]["D"])
        weights = " / ".join(f"{m['weight_bytes'] / 1e6:.0f}" for m in c.get("stage_memory", [])) or "all"
        rows.append([c["label"], c.get("layers", "0-29"), f"{med(c[f'seed_D{D}_tokens_per_s']):.1f}",
                     f"{med(c['seed_D16_tokens_per_s']):.1f}" if "seed_D16_tokens_per_s" in c else "",
                     f"{1000 * med(c['ttft_cold_s']):.0f}", f"{1000 * med(c['ttft_phi09_s']):.0f}",
                     f"{c['decode_ms_per_token']:.1f}", f"{c.get('bytes_per_step_coordinator', 0) / 1e3:.1f}",
                     weights, " / ".join(f"{b / 1e6:.0f}" for b in c["rss_bytes"]),
                     " / ".join(f"{b / 1e6:.0f}" for b in c["peak_rss_bytes"])])
    header = ["configuration", "layers", f"N=4 φ=0.9 D={max(result['settings']['D'])} tok/s", "D=16 tok/s",
              "TTFT cold ms", "TTFT φ=0.9 ms", "decode ms/token", "KB sent per step (rank 0)",
              "weights MB per stage", "RSS MB per process", "peak RSS MB"]
    return markdown_table(header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", type=Path, help="default: results/grid.json (--quick: grid_quick.json)")
    p.add_argument("--model-only", action="store_true", help="recompute the model from the --json file's measurements")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ping", type=int, nargs=2, help=argparse.SUPPRESS)  # rank, port
    args = p.parse_args()
    args.json = args.json or RESULTS / ("grid_quick.json" if args.quick else "grid.json")
    settings = ({"L": 128, "D": [8], "N": 4, "repeats": 1, "decode_tokens": 8} if args.quick else
                {"L": 512, "D": [16, 64], "N": 4, "repeats": 3, "decode_tokens": 64})
    if args.ping:
        print(json.dumps(ping_pong(*args.ping, PING_SIZES, 576, 20 if args.quick else 200)))
        return
    if args.model_only:
        result = json.loads(args.json.read_text())
        loopback = (result["hop"]["latency_s"], result["hop"]["bandwidth_Bps"])
        result["model"] = predict(result["configs"][0], result["configs"][1], loopback, result["settings"])
        args.json.write_text(json.dumps(result, indent=1))
        print(tables(result) + "\n\n" + model_table(result["model"]))
        return
    if args.child:
        print(json.dumps(child(*json.loads(args.child), settings)))
        return
    configs = [run_child(["--child", json.dumps(list(c)), *(["--quick"] if args.quick else [])],
                         shared_host_environment() if c[-1] else None) for c in CONFIGS]
    port = 29000 + os.getpid() % 1000
    partner = subprocess.Popen([sys.executable, __file__, "--ping", "1", str(port), *(["--quick"] if args.quick else [])],
                               stdout=subprocess.DEVNULL)
    ping = run_child(["--ping", "0", str(port), *(["--quick"] if args.quick else [])])
    partner.wait(60)
    one_way = {int(k): v for k, v in ping["one_way_s"].items()}
    loopback = hop_fit(one_way, ping["hidden"])
    single = configs[0]
    grid2 = configs[1]
    result = {"environment": environment(torch.float32, None), "settings": settings, "configs": configs,
              "hop": {"one_way_s": one_way, "latency_s": loopback[0], "bandwidth_Bps": loopback[1]},
              "model": predict(single, grid2, loopback, settings)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(tables(result) + "\n\n" + model_table(result["model"]))
    print(f"\nloopback hop: {1e6 * loopback[0]:.0f} µs + {loopback[1] / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
