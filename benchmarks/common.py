"""What the benchmarks share: the command line, the model, the seed's synthetic workload, and the
tables and figures.

Definitions (the seed post's): L prompt length, D decode budget per session, N sessions,
φ shared-prefix fraction, block-quantised to ``round(φ·L/32)`` shared 32-token blocks. One *op*
builds a fresh pipeline, warms the shared prefix, and runs all N sessions to completion.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from trellis import ops
from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama
from trellis.runner import LINEAR_KERNELS
from trellis.utils import cdiv

PHIS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)  # the seed's grid of shared-prefix fractions
SEED_BLOCK = 32  # φ is quantised to the seed's 32-token blocks, whatever the cache's block size
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COLORS = {"trellis": "tab:blue", "hf_generate_batch": "tab:orange", "hf_generate": "tab:gray",
          "hf_generate_batched": "tab:green", "hf_generate_cache": "tab:purple"}
LABELS = {"trellis": "Trellis engine", "hf_generate_batch": "transformers generate_batch",
          "hf_generate": "transformers generate()", "hf_generate_batched": "transformers generate(), batched",
          "hf_generate_cache": "transformers generate(), its cache passed back"}

# TinyLlama-1.1B's shape, random weights: the seed's model, for timing only.
TINYLLAMA = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
             "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


# --- command line, model, machine ----------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short run (small sizes, one repetition)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write the figure here (PNG)")
    p.add_argument("--model", choices=("smollm2", "tinyllama"), default="smollm2",
                   help="smollm2: the embedded SmolLM2-135M-Instruct; tinyllama: TinyLlama-1.1B shape, random init")
    p.add_argument("--backend", choices=ops.BACKENDS, help="Trellis attention backend (default: the fastest here)")
    p.add_argument("--repeats", type=int, help="timed ops per point")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the model's dtype, for every system")
    p.add_argument("--linear-kernel", choices=LINEAR_KERNELS,
                   help="what runs Trellis' linear layers (default: Trellis' default here); the peers run "
                        "transformers' own model")
    return p


def add_cpu_time_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the thread's CPU clock (with --threads 1 only): on a machine shared with other "
                        "jobs, time spent preempted does not count")


def chosen_clock(args: argparse.Namespace, p: argparse.ArgumentParser) -> Callable[[], float]:
    """The clock ``--cpu-time`` asks for: the thread's CPU time, else wall time."""
    if args.cpu_time and args.threads != 1:
        p.error("--cpu-time needs --threads 1 (other threads' time, spinning included, would not be seen)")
    return time.thread_time if args.cpu_time else time.perf_counter


def refuse_unused(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Refuse the shared options ``names`` where given: this benchmark does not read them (a run
    asked for bf16 or a figure must not quietly measure or draw something else)."""
    given = [name for name in names if getattr(args, name) != p.get_default(name)]
    if given:
        p.error(f"{', '.join('--' + n.replace('_', '-') for n in given)}: not used by this benchmark")


def load_model(args: argparse.Namespace) -> TrellisLlama:
    """One model's weights serve every system: the peers run them in transformers' own model (``attention``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name, backend, dtype = args.model, args.backend, getattr(torch, args.dtype)
    if name == "smollm2":
        model = TrellisLlama.from_pretrained(embedded_model_dir(), dtype=dtype, device="cpu", backend=backend)
    else:
        torch.manual_seed(0)  # initialised in fp32 whatever the dtype: every dtype runs the same weights, rounded
        model = TrellisLlama._from_config(LlamaConfig(**TINYLLAMA), attn_implementation="trellis").to(dtype).eval()
        model.configure_cache(backend=backend)
    if args.linear_kernel:  # else the dtype's default, which .to() already set
        model.set_linear_kernel(args.linear_kernel)
    model.generation_config.eos_token_id = None  # no stop token: every session generates exactly D tokens
    # transformers' continuous batching warns at every call about the persistent manager the peer needs.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    return model


def _amd_core(family: int, model: int) -> str | None:
    """The core generation of an AMD CPU from its family and model numbers: the generic marketing
    names of cloud guests ("AMD EPYC") say nothing of it, and Zen 4 and Zen 5 differ (Zen 5 runs
    512-bit vector operations in one pass, Zen 4 in two)."""
    if family == 0x1A:
        return "Zen 5"
    if family == 0x19:
        return "Zen 4" if model in range(0x10, 0x20) or model in range(0x60, 0x80) or model >= 0xA0 else "Zen 3"
    return "Zen 2" if family == 0x17 and model >= 0x30 else None


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), with the core generation for AMD, else what
    ``platform`` knows."""
    with contextlib.suppress(OSError, KeyError, ValueError), open("/proc/cpuinfo") as info:
        fields: dict[str, str] = {}
        for line in info:
            key, _, value = line.partition(":")
            if not key.strip():  # the first processor's block ends
                break
            fields.setdefault(key.strip(), value.strip())
        name = fields["model name"]
        core = (_amd_core(int(fields["cpu family"]), int(fields["model"]))
                if fields.get("vendor_id") == "AuthenticAMD" else None)
        return f"{name} ({core})" if core and core not in name else name
    return platform.processor() or platform.machine()


def trellis_commit() -> str | None:
    """``TRELLIS_COMMIT`` where set (a copied tree, as on a GPU machine, may carry no ``.git`` or a
    stale one); else the checkout's commit, ``+dirty`` when tracked files differ from it; else None:
    a table must be traceable to the code that measured it. Results and docs are not code: a run
    that follows another's, which rewrote a results file, still names the commit alone."""
    if os.environ.get("TRELLIS_COMMIT"):
        return os.environ["TRELLIS_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results",
                      ":(exclude)docs", ":(exclude)README.md")
        return commit + ("+dirty" if changed else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(dtype: torch.dtype | str | None, linear_kernel: str | None) -> dict:
    """What every results JSON records about its run, so each table can be checked against its file:
    versions, the machine, threads, dtype and linear kernel (None where the benchmark runs no linear layer)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "machine": f"{platform.system()} {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, "
                   f"torch threads {torch.get_num_threads()}",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD level torch's kernels use
        "gpu": gpu,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "linear_kernel": linear_kernel,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "trellis_commit": trellis_commit(),
        "load_average": os.getloadavg(),  # other processes on the machine add noise to every timing
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe(model: TrellisLlama, model_name: str) -> dict:
    return {
        **environment(model.dtype, model.linear_kernel),
        "model": {"smollm2": "SmolLM2-135M-Instruct (real weights)",
                  "tinyllama": "TinyLlama-1.1B shape, random init (timing only)"}.get(model_name, model_name),
        "trellis_backend": model.attention_backend(),
        "trellis_linear_kernel": model.linear_kernel,
    }


# --- timing ---------------------------------------------------------------------------------------

clock = time.perf_counter  # every timed region of the model benchmarks reads this (a test swaps it for a log)


def call_seconds(fn: Callable[[], object], device: torch.device, min_seconds: float, stat: str = "median",
                 max_calls: int = 50) -> float:
    """Seconds per call of ``fn`` (one untimed call first), the median or the fastest.

    On CUDA, Triton's ``do_bench``: CUDA events around each call and the L2 cache flushed before it,
    so a K/V that fits in L2 is still read from memory, as in a model whose layers each bring their own."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=max(int(min_seconds * 1e3), 25), return_mode=stat) / 1e3
    fn()
    times: list[float] = []
    start = clock()
    while len(times) < 3 or (clock() - start < min_seconds and len(times) < max_calls):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) if stat == "median" else min(times)


@contextlib.contextmanager
def attention(model: TrellisLlama, implementation: str) -> Iterator[LlamaForCausalLM]:
    """The model a system runs: ``model`` itself for ``"trellis"`` (its linear kernel restored on
    the way out, so that a Trellis system may pick its own), else transformers' own model in that
    attention implementation over the same weights (``plain_llama``): the peers run none of
    Trellis' code, its linear kernels included."""
    if implementation == "trellis":
        kernel = model.linear_kernel
        try:
            yield model
        finally:
            model.set_linear_kernel(kernel)
        return
    yield plain_llama(model, implementation)


def plain_llama(model: TrellisLlama, implementation: str) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` over ``model``'s parameter and buffer tensors: shared where Trellis
    keeps a weight row-major, as transformers does; a contiguous copy of a weight its kernel stores
    input-major (``state_dict``). Built on the meta device, so nothing is initialised."""
    with torch.device("meta"):
        plain = LlamaForCausalLM._from_config(copy.deepcopy(model.config), attn_implementation=implementation,
                                              dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    for name, buffer in model.named_buffers():  # the non-persistent ones too (RoPE's inv_freq)
        owner, _, attribute = name.rpartition(".")
        plain.get_submodule(owner)._buffers[attribute] = buffer
    plain.generation_config = copy.deepcopy(model.generation_config)  # eos_token_id None: every token generated
    return plain.eval()


# --- the workload ---------------------------------------------------------------------------------


def random_tokens(n: int, generator: torch.Generator) -> list[int]:
    """``n`` random token ids, inside every model's vocabulary."""
    return torch.randint(100, 30000, (n,), generator=generator).tolist()


@dataclass(frozen=True)
class Workload:
    L: int
    D: int
    N: int
    phi: float
    seed: int = 0
    # The shared prefix is a whole number of granules: the seed's 32-token blocks, or 1 for a
    # prefix of any length, which prompts leave inside a block.
    granule: int = SEED_BLOCK

    @property
    def shared(self) -> int:
        """Shared prefix tokens: ``round(φ·L/g)`` granules of g tokens, leaving at least the last one
        divergent."""
        g = self.granule
        return min(round(self.phi * self.L / g), self.L // g - 1) * g

    @property
    def realized_phi(self) -> float:
        return self.shared / self.L

    def _tokens(self, stream: int, n: int) -> list[int]:
        return random_tokens(n, torch.Generator().manual_seed(self.seed * 1000 + stream))

    def prefix(self) -> list[int]:
        return self._tokens(0, self.shared)

    def prompt(self, i: int) -> list[int]:
        """Session ``i``'s prompt: the shared prefix, then its own tokens."""
        return self.prefix() + self._tokens(1 + i, self.L - self.shared)

    def pool_blocks(self, block_size: int) -> int:
        """A pool that holds the warm-up and every session at once (the same size for both paged systems)."""
        return (self.N + 2) * cdiv(self.L + self.D, block_size)


def rotated(items: list, r: int) -> list:
    """``items`` starting at position ``r`` (mod its length): the systems' order in repeat ``r``, so
    that none always runs first or last."""
    return items[r % len(items):] + items[:r % len(items)] if items else []


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --- output ---------------------------------------------------------------------------------------


def finish(result: dict, args: argparse.Namespace, stem: str, plot: Callable[[dict, Path], None],
           tables: Callable[[dict], str]) -> None:
    """Write the JSON and the figure (``results/<stem>[_quick].{json,png}`` unless given; the figure
    beside a given JSON), print the tables."""
    stem += "_quick" if args.quick else ""
    json_path = args.json or RESULTS / f"{stem}.json"
    png_path = args.plot or json_path.with_suffix(".png")
    for path in (json_path, png_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    plot(result, png_path)
    print(f"wrote {json_path} and {png_path}\n")
    print(tables(result))


def save_figure(fig, info: dict, path: Path, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> None:
    """Caption ``fig`` with the machine and model, lay it out within ``rect``, write it, free it."""
    import matplotlib.pyplot as plt

    fig.suptitle(caption(info), fontsize=8)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def by_system(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in points:
        out.setdefault(p["system"], []).append(p)
    return out


def pm(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of ``values * scale`` (just the value when there is one)."""
    m, s = mean_std([v * scale for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def caption(info: dict) -> str:
    return (f"{info['model']}, {info['dtype']}, Trellis attention {info['trellis_backend']}, Trellis linear "
            f"{info['trellis_linear_kernel']}; {info['machine']}")


@dataclass
class Series:
    """Mean and spread of one measured quantity per x, for a plot line."""

    x: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def add(self, x: float, values: list[float]) -> None:
        m, s = mean_std(values)
        self.x.append(x)
        self.mean.append(m)
        self.std.append(s)
