"""What the benchmarks share: the command line, the model, the seed's synthetic workload, and the
tables and figures.

Definitions (the seed post's): L prompt length, D decode budget per session, N sessions,
φ shared-prefix fraction, block-quantised to ``round(φ·L/32)`` shared 32-token blocks. One *op*
builds a fresh pipeline, warms the shared prefix, and runs all N sessions to completion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig

from trellis import ops
from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama
from trellis.runner import LINEAR_KERNELS

PHIS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9)  # the seed's grid of shared-prefix fractions
SEED_BLOCK = 32  # φ is quantised to the seed's 32-token blocks, whatever the cache's block size
RESULTS = Path(__file__).resolve().parent / "results"
COLORS = {"trellis": "tab:blue", "hf_generate_batch": "tab:orange", "hf_generate": "tab:gray"}
LABELS = {"trellis": "Trellis engine", "hf_generate_batch": "transformers generate_batch",
          "hf_generate": "transformers generate()"}

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
    p.add_argument("--linear-kernel", choices=LINEAR_KERNELS,
                   help="what runs Trellis' linear layers (default: Trellis' default here); the peers always "
                        "run transformers' own (blas)")
    return p


def load_model(args: argparse.Namespace) -> TrellisLlama:
    """One model serves all three systems: the peers switch it to transformers' own attention."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name, backend = args.model, args.backend
    if name == "smollm2":
        model = TrellisLlama.from_pretrained(embedded_model_dir(), dtype=torch.float32, device="cpu", backend=backend)
    else:
        torch.manual_seed(0)
        model = TrellisLlama._from_config(LlamaConfig(**TINYLLAMA), attn_implementation="trellis").eval()
        model.configure_cache(backend=backend)
    if args.linear_kernel:
        model.set_linear_kernel(args.linear_kernel)
    model.generation_config.eos_token_id = None  # no stop token: every session generates exactly D tokens
    # transformers' continuous batching warns at every call about the persistent manager the peer needs.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    return model


def describe(model: TrellisLlama, model_name: str) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    return {
        "machine": f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, "
                   f"torch threads {torch.get_num_threads()}",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD level torch's kernels use
        "model": {"smollm2": "SmolLM2-135M-Instruct (real weights)",
                  "tinyllama": "TinyLlama-1.1B shape, random init (timing only)"}.get(model_name, model_name),
        "dtype": str(model.dtype).removeprefix("torch."),
        "trellis_backend": model.attention_backend(),
        "trellis_linear_kernel": model.linear_kernel,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average": os.getloadavg(),  # other processes on the machine add noise to every timing
    }


# --- the workload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    L: int
    D: int
    N: int
    phi: float
    seed: int = 0

    @property
    def shared(self) -> int:
        """Shared prefix tokens: ``round(φ·L/32)`` blocks, leaving at least the last block divergent."""
        return min(round(self.phi * self.L / SEED_BLOCK), self.L // SEED_BLOCK - 1) * SEED_BLOCK

    @property
    def realized_phi(self) -> float:
        return self.shared / self.L

    def _tokens(self, stream: int, n: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + stream)
        return torch.randint(100, 30000, (n,), generator=generator).tolist()  # inside every model's vocabulary

    def prefix(self) -> list[int]:
        return self._tokens(0, self.shared)

    def prompt(self, i: int) -> list[int]:
        """Session ``i``'s prompt: the shared prefix, then its own tokens."""
        return self.prefix() + self._tokens(1 + i, self.L - self.shared)

    def pool_blocks(self, block_size: int) -> int:
        """A pool that holds the warm-up and every session at once (the same size for both paged systems)."""
        return (self.N + 2) * -(-(self.L + self.D) // block_size)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --- output ---------------------------------------------------------------------------------------


def finish(result: dict, args: argparse.Namespace, stem: str, plot: Callable[[dict, Path], None],
           tables: Callable[[dict], str]) -> None:
    """Write the JSON and the figure (``results/<stem>[_quick].{json,png}`` unless given), print the tables."""
    stem += "_quick" if args.quick else ""
    json_path, png_path = args.json or RESULTS / f"{stem}.json", args.plot or RESULTS / f"{stem}.png"
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
