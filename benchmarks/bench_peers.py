"""Trellis beside the CPU engines people pick instead, in one run: llama.cpp (llama-cpp-python on the
embedded GGUF) and vLLM's CPU build (fp32 and bf16, prefix caching on), each in its own virtual
environment (``scripts/setup_peers.sh``), against Trellis fp32, bf16 and with the GGUF kept quantized.

Every system runs as a worker process (``benchmarks/peers/``) loaded once; the driver hands each the
same token ids (``common.Workload``) and, repeat by repeat, lets one system at a time run all its
measurements, in an order rotated across repeats. The same thread count for every system. Measured:

- the seed's op (L=512, N=4, φ=0.9: warm the shared prefix with one token, then the four sessions to
  D tokens) at D=16 and D=64, from an empty prefix cache: seconds per op and generated tokens/s;
- TTFT from an empty cache of a cold L-token prompt, then of a φ=0.9 probe sharing its prefix (wall
  clock around a one-token request);
- one session's decode after an L-token prompt: the median time between consecutive tokens.

Figures are medians over the repeats (decode: over every step of every repeat).

    scripts/setup_peers.sh                                             # once: the peers' environments
    .venv/bin/python benchmarks/bench_peers.py [--repeats 3] [--threads 2] [--systems ...] [--json PATH]
    .venv/bin/python benchmarks/bench_peers.py --render benchmarks/results/peers.json   # the tables again
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from common import RESULTS, ROOT, Workload, environment, rotated
from floors import DTYPES, Shape, floors, higher_ceilings, measure_ceilings
from report import peers_tables
from transformers import AutoConfig

from trellis.models.embedded import EMBEDDED_GGUF, embedded_gguf_path, embedded_model_dir

PEERS_DIR = ROOT / ".peers"
WORKERS = ROOT / "benchmarks" / "peers"
START_TIMEOUT = 900  # loading, and vLLM's compilation on a first start
TASK_TIMEOUT = 600
TCMALLOC = [Path(d) / "libtcmalloc_minimal.so.4"  # Debian's libtcmalloc-minimal4, and elsewhere
            for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")]


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    venv: Path
    worker: str  # a script under benchmarks/peers/
    args: tuple[str, ...]
    weights: str  # what the linear layers read: float32, bfloat16, or the GGUF's quantization
    env: dict[str, str] = field(default_factory=dict)
    setup: str | None = None  # the setup_peers.sh peer that installs it

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def unavailable(self) -> str | None:
        """Why this system cannot run here, or None."""
        if self.python.exists():
            return None
        note = self.venv / "UNAVAILABLE"
        if note.is_file():
            return note.read_text().strip()
        if self.setup is None:  # Trellis and transformers run in the project's own environment
            return "not set up: run make setup"
        return f"not set up: run scripts/setup_peers.sh {self.setup}"


def peers(threads: int, vllm_block_size: int | None, vllm_kv_space: int) -> list[Peer]:
    main, gguf, model_dir = ROOT / ".venv", embedded_gguf_path(), embedded_model_dir()
    t = ("--threads", str(threads))
    vllm_venv = PEERS_DIR / "vllm"
    # vLLM's CPU docs: preload Intel OpenMP (its venv's) and tcmalloc (the system's, where installed)
    tcmalloc = next((lib for lib in TCMALLOC if lib.exists()), None)
    preload = [str(lib) for lib in (tcmalloc, vllm_venv / "lib" / "libiomp5.so") if lib is not None and lib.exists()]
    vllm_env = {"VLLM_CPU_KVCACHE_SPACE": str(vllm_kv_space),
                "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads <= (os.cpu_count() or 1) else "auto",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                **({"LD_PRELOAD": ":".join(preload)} if preload else {})}
    block = ("--block-size", str(vllm_block_size)) if vllm_block_size else ()
    quant = EMBEDDED_GGUF.removesuffix(".gguf").rsplit(".", 1)[-1]  # Q4_1
    return [
        Peer("trellis_fp32", "Trellis fp32", main, "trellis_worker.py", ("--variant", "fp32", *t), "float32"),
        Peer("trellis_bf16", "Trellis bf16", main, "trellis_worker.py", ("--variant", "bf16", *t), "bfloat16"),
        Peer("trellis_gguf", f"Trellis GGUF {quant}", main, "trellis_worker.py", ("--variant", "gguf", *t), quant),
        Peer("trellis_gguf_q8", f"Trellis GGUF {quant}, 8-bit activations", main, "trellis_worker.py",
             ("--variant", "gguf_q8", *t), quant),
        Peer("llamacpp", f"llama.cpp {quant}", PEERS_DIR / "llamacpp", "llamacpp_worker.py", ("--gguf", str(gguf), *t),
             quant, setup="llamacpp"),
        Peer("vllm_fp32", "vLLM CPU fp32", vllm_venv, "vllm_worker.py",
             ("--model", str(model_dir), "--dtype", "float32", *block), "float32", vllm_env, setup="vllm"),
        Peer("vllm_bf16", "vLLM CPU bf16", vllm_venv, "vllm_worker.py",
             ("--model", str(model_dir), "--dtype", "bfloat16", *block), "bfloat16", vllm_env, setup="vllm"),
    ]


class Running:
    """A worker process: one JSON request per line in, one JSON reply per line out; its stderr to a log."""

    def __init__(self, peer: Peer, threads: int, log: Path) -> None:
        self.peer, self.log = peer, log
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), **peer.env}
        env.pop("VIRTUAL_ENV", None)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as err:
            self.proc = subprocess.Popen([str(peer.python), str(WORKERS / peer.worker), *peer.args], cwd=ROOT, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def ask(self, timeout: float, **request) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it exited: the reader says so below
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError(f"{self.peer.name}: no reply to {request['task']} in {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"{self.peer.name} exited ({self.proc.wait()}); see {self.log}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"{self.peer.name}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"task": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# --- the measurements ---------------------------------------------------------------------------


def tasks(L: int, N: int, phi: float, decode_budgets: tuple[int, ...], decode_tokens: int) -> list[dict]:
    """The requests of one system's turn, token ids included (the same for every system)."""
    out = []
    for D in decode_budgets:
        w = Workload(L=L, D=D, N=N, phi=phi)
        out.append({"task": "op", "prefix": w.prefix(), "prompts": [w.prompt(i) for i in range(N)],
                    "max_new_tokens": D})
    probe = Workload(L=L, D=1, N=2, phi=phi, seed=1)
    out.append({"task": "ttft", "warm": probe.prompt(0), "probe": probe.prompt(1)})
    one = Workload(L=L, D=decode_tokens, N=1, phi=0.0, seed=2)
    out.append({"task": "decode", "prompt": one.prompt(0), "max_new_tokens": decode_tokens + 1})
    return out


def warm_up_tasks() -> list[dict]:
    """Untimed, once per worker: first-call costs (threads, kernels, packing, compilation)."""
    return [{**t, "max_new_tokens": min(t["max_new_tokens"], 4)} if "max_new_tokens" in t else t
            for t in tasks(L=64, N=2, phi=0.5, decode_budgets=(2,), decode_tokens=3)]


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per system: medians over the repeats (decode: over every step of every repeat)."""
    out: dict[str, dict] = {}
    for system in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == system]
        s: dict = {}
        for r in mine:
            if r["task"] == "op":
                key = f"op_D{r['max_new_tokens']}"
                s.setdefault(key, {"seconds": [], "tokens_per_s": [], "session_seconds": []})
                s[key]["seconds"].append(r["seconds"])
                s[key]["session_seconds"].append(r["session_seconds"])
                s[key]["tokens_per_s"].append(r["generated"] / r["seconds"])
        for key in [k for k in s if k.startswith("op_D")]:
            s[key] = {name: statistics.median(values) for name, values in s[key].items()}
        ttft = [r for r in mine if r["task"] == "ttft"]
        if ttft:
            s["ttft_cold"] = statistics.median(r["cold"] for r in ttft)
            s["ttft_probe"] = statistics.median(r["probe"] for r in ttft)
            s["probe_cached_tokens"] = ttft[-1]["probe_cached_tokens"]
        steps = [x for r in mine if r["task"] == "decode" for x in r["token_seconds"]]
        if steps:
            s["decode_ms_per_token"] = 1000 * statistics.median(steps)
        out[system] = s
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, systems, w = result["summary"], result["systems"], result["workload"]
    names = [n for n in systems if n in summary]
    panels = [("TTFT cold (s)", lambda s: s["ttft_cold"]), (f"TTFT φ={w['realized_phi']:.3f} probe (s)",
                                                           lambda s: s["ttft_probe"])]
    panels += [(f"N={w['N']}, D={D}: s per op", lambda s, D=D: s[f"op_D{D}"]["seconds"]) for D in w["decode_budgets"]]
    panels.append(("decode ms/token", lambda s: s["decode_ms_per_token"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, value) in zip(axes, panels):
        ax.bar(range(len(names)), [value(summary[n]) for n in names], color=colors[:len(names)])
        ax.set_xticks(range(len(names)), [systems[n]["label"] for n in names], rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    info = result["info"]
    fig.suptitle(f"SmolLM2-135M-Instruct, L={w['L']}, {info['cpu_model']}, {result['threads']} threads "
                 "(lower is better)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)  # the driver only makes token ids; recorded as every system's
    every = peers(args.threads, args.vllm_block_size, args.vllm_kv_space)
    chosen = [p for p in every if not args.systems or p.name in args.systems]
    L, N, budgets = (128, 4, (4, 8)) if args.quick else (args.context, 4, (16, 64))
    decode_tokens = 8 if args.quick else args.decode_tokens
    repeats = 1 if args.quick else args.repeats
    workload = Workload(L=L, D=budgets[0], N=N, phi=args.phi)
    result = {"info": environment(None, None), "threads": args.threads, "repeats": repeats, "settle_s": args.settle,
              "workload": {"L": L, "N": N, "phi": args.phi, "realized_phi": workload.realized_phi,
                           "shared_tokens": workload.shared, "decode_budgets": list(budgets),
                           "decode_tokens": decode_tokens},
              "systems": {}, "unavailable": {}, "runs": []}
    shape = Shape.of(AutoConfig.from_pretrained(embedded_model_dir()))
    weight_bytes = {w: shape.weight_bytes(w) for w in DTYPES}
    ceilings = [measure_ceilings(args.threads, weight_bytes)]  # before any worker runs, and after the last
    workers: dict[str, Running] = {}
    try:
        for peer in chosen:  # one at a time: loading is not timed, but a neighbour's loading would slow a system
            why = peer.unavailable()
            if why:
                result["unavailable"][peer.name] = why
                print(f"{peer.name}: not run: {why}", flush=True)
                continue
            print(f"{peer.name}: starting", flush=True)
            worker = Running(peer, args.threads, PEERS_DIR / "logs" / f"{peer.name}.log")
            try:
                info = worker.ask(START_TIMEOUT, task="info")
                for request in warm_up_tasks():
                    worker.ask(TASK_TIMEOUT, **request)
            except RuntimeError as error:
                worker.close()
                result["unavailable"][peer.name] = f"failed to start: {str(error).strip().splitlines()[-1]}"
                print(f"{peer.name}: failed to start:\n{error}", flush=True)
                continue
            workers[peer.name] = worker
            result["systems"][peer.name] = {"label": peer.label, "weights": peer.weights, "python": str(peer.python),
                                            "args": list(peer.args), "env": peer.env, "info": info}
        turn = tasks(L, N, args.phi, budgets, decode_tokens)
        for r in range(repeats):
            for name in rotated(list(workers), r):
                # Idle first: the system before may still hold both cores for a while after its last
                # reply (OpenMP threads spin before they sleep), which would slow this one's first task.
                time.sleep(args.settle)
                for request in turn:
                    reply = workers[name].ask(TASK_TIMEOUT, **request)
                    meta = {k: v for k, v in request.items() if k in ("task", "max_new_tokens")}
                    result["runs"].append({"repeat": r, "system": name, **meta, **reply})
                print(f"repeat {r + 1}/{repeats}: {name} done", flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    result["load_average_after"] = os.getloadavg()
    ceilings.append(measure_ceilings(args.threads, weight_bytes))
    best = higher_ceilings(*ceilings)
    result["floors"] = {"ceilings": best, "measured_ceilings": ceilings, "shape": asdict(shape),
                        "by_weights": {w: floors(shape, w, best, L, N, workload.shared, list(budgets)) for w in DTYPES}}
    result["summary"] = summarize(result["runs"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3, help="turns of every system (rotated order)")
    p.add_argument("--threads", type=int, default=2, help="threads of every system")
    p.add_argument("--systems", nargs="+", help="a subset, by name (default: all that are set up)")
    p.add_argument("--context", type=int, default=512, help="L: prompt tokens")
    p.add_argument("--phi", type=float, default=0.9, help="shared-prefix fraction of the op and the TTFT probe")
    p.add_argument("--decode-tokens", type=int, default=64, help="timed decode steps of the one-session decode")
    p.add_argument("--vllm-block-size", type=int, default=32,
                   help="vLLM's KV block size, Trellis' by default (0: vLLM's own default for CPU)")
    p.add_argument("--vllm-kv-space", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE, GiB")
    p.add_argument("--settle", type=float, default=2.0, help="seconds of idle before each system's turn")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (a smoke test)")
    p.add_argument("--json", type=Path, help="default: benchmarks/results/peers.json (--quick: .peers/results/)")
    p.add_argument("--plot", type=Path, help="default: beside the JSON, .png")
    p.add_argument("--render", type=Path, help="print the tables of a results JSON, measure nothing")
    args = p.parse_args()
    if args.render:
        print(peers_tables(json.loads(args.render.read_text())))
        return
    valid = {peer.name for peer in peers(args.threads, None, 1)}
    if args.systems and not set(args.systems) <= valid:
        p.error(f"--systems: choose from {sorted(valid)}")
    result = run(args)
    # a smoke test's files stay out of results/, whose figures report.py lists in the docs
    json_path = args.json or (PEERS_DIR / "results" / "peers_quick.json" if args.quick else RESULTS / "peers.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    png_path = args.plot or json_path.with_suffix(".png")
    if result["summary"]:
        plot(result, png_path)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if result["summary"] else "") + "\n")
    print(peers_tables(result))
    if not result["summary"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
