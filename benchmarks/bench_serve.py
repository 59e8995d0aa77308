"""A team sharing one server: K concurrent clients, one shared system prompt, distinct questions.

Each of K clients starts at a Poisson arrival time and asks ``--requests`` questions in turn over a
streamed chat completion (greedy, at most D tokens each); every request carries the same ~400-token
system prompt. Per system and K: time to first token and inter-token latency (p50, p99: the gaps
between streamed chunks), generated tokens per second over the run, and the share of prompt tokens
the server reports as cached. The systems, in one run on the same model and settings:

- ``trellis serve`` (HTTP, in a child process);
- ``transformers serve --continuous-batching`` (HTTP, in a child process), if it starts;
- Trellis' engine in this process, the same arrivals without HTTP (what HTTP costs).

Every server first answers one warm-up request with the system prompt, so the scenario is a team
whose system prompt is already known to the server. ``--rounds R`` repeats every system's runs R
times, each round starting with another system, and reports each system's fastest round (on a
shared machine, other jobs only ever slow a run down).

    python benchmarks/bench_serve.py [--quick] [--rounds 2] [--clients 1 4 16] [--max-tokens 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import torch
from common import RESULTS, caption, describe, markdown_table, rotated
from transformers import AutoTokenizer

from trellis.engine import Engine, SamplingParams
from trellis.grid.rendezvous import free_port
from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama
from trellis.runner import LINEAR_KERNELS

DOCS = RESULTS.parents[1] / "docs"

SYSTEM_PROMPT = " ".join([
    "You are the assistant of a small engineering team that shares one server.",
    "Answer in two or three sentences, plainly, and say so when you do not know.",
    "Prefer a concrete example over theory, and never invent a citation, a command or a number.",
    "The team works on databases, compilers, operating systems, networks and machine learning,",
    "and its members range from new graduates to engineers with twenty years of experience.",
    "When a question is ambiguous, answer the most likely reading and name the other one.",
    "When code helps, give a short Python snippet with no more than five lines.",
    "Use metric units, ISO dates and 24-hour times. Keep a friendly, direct tone.",
] * 3)
TOPICS = ["a radix tree", "a B-tree", "copy-on-write", "a page table", "TCP slow start", "a bloom filter",
          "garbage collection", "a mutex", "register allocation", "gradient descent", "a hash join", "RAID 5",
          "consistent hashing", "a write-ahead log", "branch prediction", "an LRU cache", "a trie", "MVCC",
          "a futex", "tail recursion", "SIMD", "a KV cache", "prefix caching", "speculative decoding",
          "a cuckoo hash", "the CAP theorem", "a skip list", "Raft", "a closure", "memoization", "an inode",
          "virtual memory"]
PHRASES = ["What is {}?", "Explain {} to a new colleague.", "When should we use {}?", "What can go wrong with {}?"]


def questions(k: int, requests: int, seed: int) -> list[list[str]]:
    """Distinct questions: ``requests`` per client, for ``k`` clients (the same for every system)."""
    rng = random.Random(seed)
    pool = [phrase.format(topic) for topic in TOPICS for phrase in PHRASES]
    rng.shuffle(pool)
    return [[pool[(c * requests + r) % len(pool)] + f" (ticket {seed}-{c}-{r})" for r in range(requests)]
            for c in range(k)]


def arrivals(k: int, mean_gap: float, seed: int) -> list[float]:
    """Start offsets of the K clients: a Poisson process with ``mean_gap`` seconds between arrivals."""
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(k):
        out.append(t)
        t += rng.expovariate(1 / mean_gap)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(system: str, k: int, records: list[dict], seconds: float) -> dict:
    """One row: latencies in ms, throughput in generated tokens per second."""
    ttft = [r["ttft"] for r in records]
    gaps = [g for r in records for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in records)
    prompt = sum(r["prompt_tokens"] for r in records if r["prompt_tokens"] is not None)
    cached = [r["cached_tokens"] for r in records if r["cached_tokens"] is not None]
    return {"system": system, "clients": k, "requests": len(records), "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99), "itl_p50_ms": 1e3 * percentile(gaps, 50),
            "itl_p99_ms": 1e3 * percentile(gaps, 99),
            "cached_share": sum(cached) / prompt if cached and prompt else None, "ttft": ttft}


def best_round(rounds: list[dict]) -> dict:
    """The round with the highest throughput, with every round's throughput and TTFT p50 beside it.
    On a shared machine other jobs only ever slow a run down, so the fastest round is the least disturbed."""
    best = max(rounds, key=lambda r: r["tokens_per_s"])
    return {**best, "round_tokens_per_s": [r["tokens_per_s"] for r in rounds],
            "round_ttft_p50_ms": [r["ttft_p50_ms"] for r in rounds]}


# --- over HTTP -------------------------------------------------------------------------------


async def ask(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                         {"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, usage, chunks = [], None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices") and data["choices"][0].get("delta", {}).get("content"):
                times.append(time.perf_counter())
                chunks += 1
            usage = data.get("usage") or usage
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {"ttft": times[0] - start if times else float("nan"), "gaps": [b - a for a, b in itertools.pairwise(times)],
            "tokens": (usage or {}).get("completion_tokens", chunks), "prompt_tokens": (usage or {}).get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens")}


async def run_http(url: str, model: str, k: int, args: argparse.Namespace, seed: int) -> tuple[list[dict], float]:
    asked = questions(k, args.requests, seed)
    starts = arrivals(k, args.mean_gap, seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800)) as client:
        async def client_loop(c: int) -> list[dict]:
            await asyncio.sleep(starts[c])
            return [await ask(client, url, model, q, args.max_tokens) for q in asked[c]]

        began = time.perf_counter()
        records = [r for rs in await asyncio.gather(*(client_loop(c) for c in range(k))) for r in rs]
        return records, time.perf_counter() - began


def start_server(command: list[str], port: int, log: Path) -> subprocess.Popen | None:
    """A server child process, once ``/health`` answers; None if it exits or takes over 10 minutes."""
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(process)
    return None


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


Runs = dict[int, tuple[list[dict], float]]  # K -> (per-request records, seconds of the run)


def bench_server(name: str, command: list[str], port: int, model: str, args: argparse.Namespace) -> Runs:
    log = Path(args.logs) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    process = start_server(command, port, log)
    if process is None:
        print(f"{name}: the server did not start; see {log}")
        return {}
    runs = {}
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_http(url, model, 1, argparse.Namespace(**{**vars(args), "requests": 1}), seed=999))  # warm-up
        for k in args.clients:
            runs[k] = asyncio.run(run_http(url, model, k, args, seed=k))
            print(row_text(summarize(name, k, *runs[k])), flush=True)
    finally:
        stop_server(process)
    return runs


# --- in process ------------------------------------------------------------------------------


def bench_engine(args: argparse.Namespace) -> Runs:
    """The same arrivals on Trellis' engine in this process: client threads add sessions, one thread steps."""
    if args.threads:
        torch.set_num_threads(args.threads)
    path = embedded_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = TrellisLlama.from_pretrained(path, dtype=torch.float32, device="cpu", linear_kernel=args.linear_kernel)
    engine = Engine(model, max_batch_tokens=args.max_batch_tokens)
    stop = SamplingParams.from_generation_config(model.generation_config).stop_token_ids
    params = SamplingParams(max_new_tokens=args.max_tokens, stop_token_ids=stop)

    def prompt(question: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
        return tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]

    def run(k: int, requests: int, seed: int) -> tuple[list[dict], float]:
        asked, starts = questions(k, requests, seed), arrivals(k, args.mean_gap, seed)
        records: list[dict] = []
        finished = threading.Condition()  # notified after each step that ended a session
        began = time.perf_counter()

        def client(c: int) -> None:
            time.sleep(max(0.0, began + starts[c] - time.perf_counter()))
            for q in asked[c]:
                session = engine.add(prompt(q), params)
                with finished:
                    while not session.done:
                        finished.wait()
                times = session.token_times
                records.append({"ttft": session.ttft, "gaps": [b - a for a, b in itertools.pairwise(times)],
                                "tokens": len(session.generated), "prompt_tokens": len(session.prompt),
                                "cached_tokens": session.num_cached_tokens})

        threads = [threading.Thread(target=client, args=(c,)) for c in range(k)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) or engine.has_work:
            if not engine.has_work:
                time.sleep(0.0005)
            elif engine.step():
                with finished:
                    finished.notify_all()
        return records, time.perf_counter() - began

    run(1, 1, seed=999)  # warm-up: the system prompt is cached
    runs = {}
    for k in args.clients:
        runs[k] = run(k, args.requests, seed=k)
        print(row_text(summarize("trellis_engine", k, *runs[k])), flush=True)
    return runs


# --- output ----------------------------------------------------------------------------------


def row_text(row: dict) -> str:
    share = "n/a" if row["cached_share"] is None else f"{row['cached_share']:.2f}"
    return (f"{row['system']:>22} K={row['clients']:<3} TTFT p50 {row['ttft_p50_ms']:8.0f} ms p99 "
            f"{row['ttft_p99_ms']:8.0f} ms | ITL p50 {row['itl_p50_ms']:6.1f} ms p99 {row['itl_p99_ms']:7.1f} ms | "
            f"{row['tokens_per_s']:6.1f} tok/s | cached {share}")


def table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        share = "n/a" if r["cached_share"] is None else f"{r['cached_share']:.0%}"
        out.append([r["system"], str(r["clients"]), f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p99_ms']:.0f}",
                    f"{r['itl_p50_ms']:.0f}", f"{r['itl_p99_ms']:.0f}", f"{r['tokens_per_s']:.1f}", share])
    return markdown_table(["system", "K", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "tokens/s",
                           "cached prompt share"], out)


COLORS = {"trellis_http": "tab:blue", "trellis_engine": "tab:green", "transformers_serve": "tab:orange"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for system in dict.fromkeys(r["system"] for r in result["runs"]):
        rows = [r for r in result["runs"] if r["system"] == system]
        ks, color = [r["clients"] for r in rows], COLORS.get(system)
        axes[0].plot(ks, [r["ttft_p50_ms"] for r in rows], "o-", color=color, label=f"{system} p50")
        axes[0].plot(ks, [r["ttft_p99_ms"] for r in rows], "x--", color=color, label=f"{system} p99")
        axes[1].plot(ks, [r["itl_p50_ms"] for r in rows], "o-", color=color, label=f"{system} p50")
        axes[1].plot(ks, [r["itl_p99_ms"] for r in rows], "x--", color=color, label=f"{system} p99")
        axes[2].plot(ks, [r["tokens_per_s"] for r in rows], "o-", color=color, label=system)
    for ax, title in zip(axes, ("time to first token (ms)", "inter-token latency (ms)", "generated tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["settings"]["clients"], [str(k) for k in result["settings"]["clients"]])
        ax.set_xlabel("concurrent clients K")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.suptitle(caption(result["environment"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="K = 1 and 4, 8 tokens, one request per client")
    p.add_argument("--clients", type=int, nargs="+", help="values of K (default 1 4 16)")
    p.add_argument("--requests", type=int, help="questions each client asks in turn (default 2)")
    p.add_argument("--max-tokens", type=int, help="D, tokens per answer at most (default 32)")
    p.add_argument("--mean-gap", type=float, default=0.25, help="mean seconds between client arrivals")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="Trellis' per-step token budget")
    p.add_argument("--threads", type=int, help="torch threads of every system (default: torch's)")
    p.add_argument("--linear-kernel", choices=LINEAR_KERNELS,
                   help="what runs Trellis' linear layers (default: Trellis' default here); transformers runs blas")
    p.add_argument("--systems", nargs="+", default=["trellis_http", "transformers_serve", "trellis_engine"],
                   choices=["trellis_http", "transformers_serve", "trellis_engine"])
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every system's runs, each round in another order; the fastest round counts")
    p.add_argument("--logs", default="/tmp/bench_serve_logs", help="where the servers' output goes")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    args.clients = args.clients or ([1, 4] if args.quick else [1, 4, 16])
    args.requests = args.requests or (1 if args.quick else 2)
    args.max_tokens = args.max_tokens or (8 if args.quick else 32)
    path = str(embedded_model_dir())
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the servers' torch threads
    # Every system in fp32 (the server's own default, --dtype auto, is bf16 where the CPU has bf16 dot products).
    trellis_command = [sys.executable, "-m", "trellis", "serve", "--model", path, "--dtype", "float32",
                       "--max-batch-tokens", str(args.max_batch_tokens), "--served-model-name", "smollm2",
                       "--log-level", "warning",
                       *(["--linear-kernel", args.linear_kernel] if args.linear_kernel else [])]
    # Trellis' block size and step budget, so both share prefixes at the same granularity.
    transformers_command = [str(Path(sys.executable).with_name("transformers")), "serve", path, "--continuous-batching",
                            "--cb-block-size", "32", "--cb-max-batch-tokens", str(args.max_batch_tokens), "--dtype",
                            "float32", "--device", "cpu", "--host", "127.0.0.1"]
    benches = {
        "trellis_http": lambda port: bench_server("trellis_http", trellis_command + ["--port", str(port)], port,
                                                  "smollm2", args),
        "transformers_serve": lambda port: bench_server("transformers_serve", transformers_command + ["--port", str(port)],
                                                        port, path, args),
        "trellis_engine": lambda port: bench_engine(args),
    }
    collected: dict[tuple[str, int], list[tuple[list[dict], float]]] = {}
    for r in range(args.rounds):  # each round starts with another system: a noisy neighbour hits them in turn
        order = rotated(args.systems, r)
        print(f"round {r + 1} of {args.rounds}: {', '.join(order)}", flush=True)
        for system in order:
            for k, run in benches[system](free_port()).items():
                collected.setdefault((system, k), []).append(run)
    rows = [best_round([summarize(system, k, records, seconds) for records, seconds in runs])
            for (system, k), runs in sorted(collected.items(), key=lambda item: (args.systems.index(item[0][0]),
                                                                                 item[0][1]))]
    model = TrellisLlama.from_pretrained(path, dtype=torch.float32, device="cpu", linear_kernel=args.linear_kernel)
    # "environment", not "info", and the figure in docs/: report.py renders every results file and
    # figure it finds into docs/benchmarks.md; this one is rendered by hand in docs/serving.md.
    result = {"environment": describe(model, "smollm2"), "what": "bench_serve",
              "settings": {"clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
                           "mean_gap_s": args.mean_gap, "max_batch_tokens": args.max_batch_tokens,
                           "system_prompt_tokens": len(AutoTokenizer.from_pretrained(path)(SYSTEM_PROMPT)["input_ids"]),
                           "threads": args.threads, "rounds": args.rounds, "missing": [s for s in args.systems
                                                                if not any(r["system"] == s for r in rows)]},
              "runs": rows}
    stem = ("serve_quick" if args.quick else "serve") + (f"_{args.linear_kernel}" if args.linear_kernel else "")
    json_path = args.json or RESULTS / f"{stem}.json"
    # The docs' figure by default; beside a JSON given elsewhere (a trial run leaves docs/ alone).
    default_png = json_path.with_suffix(".png") if args.json else DOCS / f"{stem.replace('serve', 'serving')}.png"
    png_path = args.plot or default_png
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    if rows:
        plot(result, png_path)
    print(f"wrote {json_path}" + (f" and {png_path}" if rows else "") + "\n")
    print(table(rows))
    by = {(r["system"], r["clients"]): r for r in rows}
    for k in args.clients:
        ours, theirs, local = by.get(("trellis_http", k)), by.get(("transformers_serve", k)), by.get(("trellis_engine", k))
        if ours and local:
            print(f"K={k}: HTTP throughput is {ours['tokens_per_s'] / local['tokens_per_s']:.0%} of the in-process engine's")
        if ours and theirs:
            print(f"K={k}: TTFT p50 {theirs['ttft_p50_ms'] / ours['ttft_p50_ms']:.1f}x, p99 "
                  f"{theirs['ttft_p99_ms'] / ours['ttft_p99_ms']:.1f}x, throughput "
                  f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.1f}x in Trellis' favour")


if __name__ == "__main__":
    main()
