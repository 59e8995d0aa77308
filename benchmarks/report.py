"""Render the measured results under ``benchmarks/results/`` into the docs.

    python benchmarks/report.py           # rewrite the generated parts of the docs and README.md
    python benchmarks/report.py --check   # exit 1 if any differs from what the JSON gives

The generated parts sit between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` markers:
``results`` in docs/results.md (one subsection per machine directory: ``results/`` itself and
each folder under it), ``headline`` in README.md (one table, from ``HEADLINE_MACHINE``), and in
docs/benchmarks.md ``peers PATH``, the systems' table of the ``bench_peers.py`` run in ``PATH``
(relative to the repository), which the text around it discusses. Everything else in those files
is written by hand. Standard library only: no torch, no Trellis.

Tables show what the benchmark scripts print: ``mean ± std`` over the repetitions, and ratios
of the means. The README's headline uses medians, which one stray repetition cannot move.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from floors import TARGET_HEADER, ceilings_line, target_rows

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS_DOC = ROOT / "docs" / "results.md"
PEERS_MARKER = re.compile(r"<!-- (peers \S+):begin -->")  # a peers run's table, the file named in the marker
README = ROOT / "README.md"
HEADLINE_MACHINE = "xeon-icelake"  # the machine directory whose results the README quotes
SIMD = {"AVX512": "AVX-512", "AVX2": "AVX2", "DEFAULT": "portable code"}  # torch's CPU capability names
PEERS = ("trellis", "hf_generate_batch", "hf_generate", "hf_generate_batched")  # column order
HEADERS = {"trellis": "Trellis", "hf_generate_batch": "generate_batch", "hf_generate": "generate()",
           "hf_generate_batched": "generate() batched"}
RATIOS = ("hf_generate", "hf_generate_batched", "hf_generate_batch")  # the order of the Trellis / peer columns
Results = dict[str, dict]  # file name -> its JSON, for one machine directory

# --- formatting ------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def pm(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of ``values * scale`` (the value alone when there is one)."""
    scaled = [v * scale for v in values]
    if len(scaled) == 1:
        return f"{scaled[0]:.{digits}f}"
    return f"{mean(scaled):.{digits}f} ± {statistics.stdev(scaled):.{digits}f}"


def times(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def source(name: str, directory: Path) -> str:
    """A link from docs/ to a results file."""
    return f"[`{name}`](../{(directory / name).relative_to(ROOT).as_posix()})"


def by_system(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in points:
        out.setdefault(p["system"], []).append(p)
    return out


# --- reading ---------------------------------------------------------------------------------


def load(directory: Path) -> Results:
    """The JSON files directly in ``directory``, but ``*_quick.json``. A combined suite file (``bench_prefix.py --json``)
    is split into its parts, and a part equal to a file of its own is dropped as a duplicate."""
    files = {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))
             if not p.stem.endswith("_quick")}  # --quick runs, which git ignores too
    for name, data in list(files.items()):
        if {"throughput", "ttft", "block_size"} <= data.keys():
            del files[name]
            for part, result in data.items():
                if files.get(f"{part}.json") != result:
                    files[f"{name} ({part})"] = result
    return files


def infos(results: Results) -> list[dict]:
    """What each file records about its run (the benchmarks' ``describe``; the kernels' ``machine``)."""
    found = []
    for data in results.values():
        info = data.get("info") or data.get("machine")
        if isinstance(info, dict):
            found.append(info)
    return found


def machine(results: Results) -> str:
    """``CPU, SIMD level, cores`` as the JSON records them."""
    described = {i["machine"] for i in infos(results) if isinstance(i.get("machine"), str) and "cores" in i["machine"]}
    names = {m.split(", ")[1] for m in described}  # "Linux x86_64, AMD EPYC (Zen 4), 2 cores, ..."
    # Newer files name the generation ("AMD EPYC (Zen 4)") where older ones of the machine did not.
    names = sorted(n for n in names if not any(other != n and other.startswith(n) for other in names))
    cores = sorted({m.split(", ")[2] for m in described})
    simd = sorted({SIMD.get(i["cpu_capability"], i["cpu_capability"]) for i in infos(results) if "cpu_capability" in i})
    gpus = sorted({i["gpu"] for i in infos(results) if i.get("gpu")})  # a GPU check's machine
    return ", ".join([*gpus, *names, *simd, *cores])


def versions(results: Results, key: str) -> str:
    """Every value of ``key`` in the files' info (a file that ran several, bench_dtype's dtypes, lists them)."""
    values = (v for i in infos(results) for v in (i.get(key) if isinstance(i.get(key), list) else [i.get(key)]))
    return ", ".join(sorted({v for v in values if isinstance(v, str)}))


# --- one function per kind of table ----------------------------------------------------------


def present(names: list[str] | set[str]) -> list[str]:
    """The systems of ``PEERS`` among ``names``, in column order (files before the batched
    ``generate()`` peer have three)."""
    return [s for s in PEERS if s in names]


def ttft_table(data: dict) -> str:
    groups = by_system(data["points"])
    cold = mean(groups["trellis"][0]["ttft"])
    rows = []
    for tr, gb, gen in zip(*(groups[s] for s in PEERS[:3])):
        rows.append([f"{tr['realized_phi']:.3f}", pm(tr["ttft"], 1e3, 0), f"{mean(tr['hit_rate']):.3f}",
                     pm(gb["ttft"], 1e3, 0), f"{mean(gb['hit_rate']):.3f}", pm(gen["ttft"], 1e3, 0),
                     f"{mean(tr['ttft']) / cold:.3f}", times(mean(gen["ttft"]), mean(tr["ttft"]))])
    s = data["settings"]
    # bench_ttft.py --granule: a shared prefix of any number of tokens rather than the seed's blocks
    steps = f"; the shared prefix in {s['granule']}-token steps" if s.get("granule", 32) != 32 else ""
    return (f"Time to first token, ms (mean ± std of {s['repeats']}), L={s['L']}, Trellis linear kernel "
            f"`{data['info']['trellis_linear_kernel']}`; hit-rate ceiling {data['hit_rate_ceiling']:.4f}{steps}.\n\n"
            + table(["φ", "Trellis", "Trellis hit rate", "generate_batch", "generate_batch hit rate", "generate()",
                     "Trellis TTFT / TTFT(φ=0)", "generate() / Trellis"], rows))


def chat_table(data: dict) -> str:
    """bench_chat.py: a chat's second turn, per system."""
    s, rows = data["settings"], []
    plain = statistics.median(next(r for r in data["rows"] if r["system"] == "hf_generate")["ttft"])
    for row in data["rows"]:
        ttft = statistics.median(row["ttft"])
        reused = f"{statistics.median(row['reused']):.0f} of {statistics.median(row['turn_tokens']):.0f}"
        rows.append([row["system"], f"{ttft * 1e3:.1f}", reused, times(plain, ttft)])
    return (f"Turn 2 of a chat (a {s['prompt']}-token prompt, a {s['answer']}-token answer, {s['message']} new "
            f"tokens): time to its first token, ms, median of {s['repeats']}.\n\n"
            + table(["system", "turn-2 TTFT", "prompt tokens reused", "generate() / system"], rows))


def speed_header(names: list[str]) -> list[str]:
    return ["φ", *(HEADERS[n] for n in names), *(f"Trellis / {HEADERS[n]}" for n in RATIOS if n in names)]


def speed_rows(points: list[dict], key: str) -> list[list[str]]:
    groups = by_system(points)
    names = present(groups)
    rows = []
    for at_phi in zip(*(groups[s] for s in names)):
        by = dict(zip(names, at_phi))
        ours = mean(by["trellis"][key])
        rows.append([f"{by['trellis']['realized_phi']:.3f}", *(pm(by[n][key]) for n in names),
                     *(times(ours, mean(by[n][key])) for n in RATIOS if n in names)])
    return rows


def throughput_table(data: dict) -> str:
    s, header = data["settings"], speed_header(present(by_system(data["points"])))
    return (f"Throughput, generated tokens/s per op (mean ± std of {s['repeats']}), L={s['L']}, D={s['D']}, "
            f"N={s['N']}; an op includes the warm-up.\n\n" + table(header, speed_rows(data["points"], "tokens_per_s"))
            + "\n\nThe same ops, tokens/s of the N sessions alone (the warm-up left out).\n\n"
            + table(header, speed_rows(data["points"], "session_tokens_per_s")))


def allocations_table(data: dict) -> str:
    groups = by_system(data["points"])
    names = present(groups)

    def alloc(p: dict) -> str:
        return f"{mib(p['alloc_bytes'])} ({p['alloc_count']:,})"

    rows = []
    for at_phi in zip(*(groups[s] for s in names)):
        by = dict(zip(names, at_phi))
        rows.append([f"{by['trellis']['realized_phi']:.3f}", *(alloc(by[n]) for n in names),
                     str(by["trellis"]["fresh_blocks"]), str(by["hf_generate_batch"]["fresh_blocks"])])
    return ("Allocations per op: bytes (count) of tensor allocations by PyTorch's CPU allocator; fresh 32-token "
            "KV blocks taken from the pool.\n\n"
            + table(["φ", *(HEADERS[n] for n in names), "Trellis fresh blocks", "generate_batch fresh blocks"], rows))


def kv_memory_table(data: dict) -> str:
    groups, block = by_system(data["points"]), data["block_bytes"]
    rows = []
    for tr, gen in zip(groups["trellis"], groups["hf_generate"]):
        held = tr["live_blocks"] * block
        rows.append([f"{tr['realized_phi']:.3f}", str(tr["shared_tokens"] // 32),
                     f"{tr['live_blocks']} (expected {tr['expected_live_blocks']})", f"{held / 2**20:.1f}",
                     f"{gen['kv_bytes'] / 2**20:.1f}", times(gen["kv_bytes"], held)])
    n = data["settings"]["N"]
    return (f"KV memory held for the N={n} sessions at their peak; expected = shared + N · "
            "(⌈(L + D − 1)/32⌉ − shared) blocks.\n\n"
            + table(["φ", "shared blocks", "Trellis blocks held", "Trellis KV MiB", f"generate() KV MiB ({n} caches)",
                     "generate() / Trellis"], rows))


def targets_table(results: Results, directory: Path) -> str:
    """The N=4, D=16 check (``bench_throughput.py --targets-only``, and the suite's own pass), every run;
    a peer a file lacks (the batched ``generate()`` came later) is shown as —."""
    files = {name: by_system(data["targets"]) for name, data in results.items() if "targets" in data}
    names = present({s for groups in files.values() for s in groups})
    rows = []
    for name, groups in files.items():
        for at_phi in zip(*(groups[s] for s in present(groups))):
            by = dict(zip(present(groups), at_phi))
            tr = by["trellis"]
            per_op, warm = (mean(tr[k]) for k in ("tokens_per_s", "session_tokens_per_s"))
            rows.append([source(name.split(" ")[0], directory), f"`{results[name]['info']['trellis_linear_kernel']}`",
                         str(len(tr["tokens_per_s"])), f"{tr['realized_phi']:.3f}",
                         *(pm(by[n]["tokens_per_s"]) if n in by else "—" for n in names),
                         *(times(per_op, mean(by[n]["tokens_per_s"])) if n in by else "—" for n in RATIOS if n in names),
                         times(warm, mean(by["hf_generate"]["session_tokens_per_s"]))])
    shapes = sorted({(p["N"], p["L"], p["D"]) for data in results.values() if "targets" in data for p in data["targets"]})
    workload = "; ".join(f"N={n} sessions, L={length}, D={d}" for n, length, d in shapes)
    return (f"{workload}, tokens/s per op (mean ± std); the last column leaves the warm-up out. "
            "The peers always run transformers' own linear layers.\n\n"
            + table(["file", "Trellis linear kernel", "ops", *speed_header(names), "warm: Trellis / generate()"], rows))


def block_size_table(data: dict) -> str:
    groups, s = by_system(data["points"]), data["settings"]
    rows = []
    for size in s["block_sizes"]:
        at = {name: [p for p in points if p["block_size"] == size] for name, points in groups.items()}
        tr = at["trellis"]
        rows.append([str(size), pm([p["leaves"] for p in tr]), pm([p["nodes"] for p in tr]),
                     pm([p["cached_blocks"] for p in tr]), pm([p["ttft"] for p in tr], 1e3, 0),
                     pm([p["hit_rate"] for p in tr], digits=3), pm([p["ttft"] for p in at["hf_generate_batch"]], 1e3, 0),
                     pm([p["ttft"] for p in at["hf_generate"]], 1e3, 0)])
    return (f"Block size B (mean ± std over L ∈ {{{', '.join(map(str, s['lengths']))}}}; the tree after a warm-up "
            f"and N={s['N']} sessions of D={s['D']} at φ={s['phi']}; TTFT in ms at φ={s['phi']}).\n\n"
            + table(["B", "leaves", "nodes", "cached blocks", "Trellis TTFT", "Trellis hit rate",
                     "generate_batch TTFT", "generate() TTFT"], rows))


def decode_table(data: dict) -> str:
    names = [k for k in data["rows"][0] if k != "L"]
    ours = [n for n in names if n.startswith("trellis cpp")]
    rows = [[str(r["L"]), *(f"{r[n]:.1f}" for n in names), *(times(r["transformers sdpa"], r[n]) for n in ours)]
            for r in data["rows"]]
    return (f"Decode, {data['statistic']} ({data['steps']} steps × {data['repeats']} repeats per system) after an "
            "L-token prompt.\n\n"
            + table(["L", *names, *(f"sdpa / {n.removeprefix('trellis ')}" for n in ours)], rows))


def step_table(data: dict) -> str:
    extend = "extend_ms" in data["rows"][0]  # files from before the extend timing lack it
    rows = [[r["config"], r["path"], *(f"{r[k]:.2f}" for k in ("step_ms", "matmul_ms", "attention_ms", "other_ms")),
             f"{r['ops']:.0f}", *([f"{r['extend_ms']:.1f}"] if extend else [])] for r in data["rows"]]
    return (f"One session's decode step at a {data['context']}-token context, {data['info']['threads']} threads, "
            f"{data['statistic']} ({data['steps']} steps × {data['repeats']} repeats); its parts from a profiled "
            "run (bench_step.py)"
            + (f"; extend: the forward of {data['suffix']} new tokens after a cached prefix" if extend else "")
            + ".\n\n" + table(["config", "decoder path", "step ms", "matmuls ms", "attention ms", "other ms", "ops / step",
                     *(["extend ms"] if extend else [])], rows))


def linear_table(data: dict) -> str:
    names = [k for k in data["rows"][0] if k not in ("rows", "shapes")]
    rows = [[str(r["rows"]), *(f"{r[n]:.1f}" for n in names)] for r in data["rows"]]
    text = (f"All of the model's decoder linear layers at M rows ({data['info']['model']}, {data['info']['dtype']}, "
            f"{data['info']['machine'].rpartition(', ')[2]}), {data['statistic']}.\n\n" + table(["rows", *names], rows))
    if "shapes" not in data["rows"][0]:  # files from before the per-shape timings
        return text
    by_shape = [[str(r["rows"]), f"`{shape}`", *(f"{t[n]:.2f}" for n in names)]
                for r in data["rows"] for shape, t in r["shapes"].items()]
    return (text + "\n\nEach shape's share: all the layers of that shape in a pass (the LM head, not in the pass, "
            "once), ms.\n\n" + table(["rows", "shape (out x in)", *names], by_shape))


def dtypes_table(data: dict) -> str:
    """Rows of every dtype's systems; a quantized row (``--quantized``) has only Trellis' default,
    and files from ``--quantized`` runs name each row's default and its ratio to fp32's."""
    # a quantized row's one system is its default
    not_systems = ("dtype", "default_kernel", "trellis quantized", "default_repeat_medians", "paired vs fp32")
    systems = list(dict.fromkeys(k for r in data["dtypes"] for k in r if k not in not_systems))
    fp32 = next((r.get("default") for r in data["dtypes"] if r["dtype"] == "float32"), None)
    ratios = fp32 and "default" in systems
    paired = ratios and "paired vs fp32" in data["dtypes"][0]  # files from runs that pair each repeat's ratio
    columns = (["dtype", *systems] + (["default vs fp32's"] if ratios else [])
               + (["paired (median of the repeats' ratios)"] if paired else []))
    rows = [[f"`{r['dtype']}`", *(f"{r[s]:.1f}" if s in r else "" for s in systems)]
            + ([f"{fp32 / r['default']:.2f}× ({r['default_kernel']})"] if ratios else [])
            + ([f"{r['paired vs fp32']:.2f}×"] if paired else [])
            for r in data["dtypes"]]
    return (f"One session's decode step after a {data['context']}-token prompt by dtype ({data['info']['model']}, "
            f"{data['info']['machine'].rpartition(', ')[2]}), {data['statistic']} ({data['steps']} steps × "
            f"{data['repeats']} repeats per system and dtype, in turns).\n\n" + table(columns, rows))


def speculative_table(data: dict) -> str:
    names = [k for k in data["rows"][0] if k not in ("task", "prompt_tokens")]
    rows = [[r["task"], str(r["prompt_tokens"]), *(f"{r[n]:.2f}" for n in names),
             times(r["transformers greedy"], r["transformers prompt lookup"]),
             times(r["trellis greedy"], r["trellis prompt lookup"]),
             times(r["transformers prompt lookup"], r["trellis prompt lookup"])] for r in data["rows"]]
    return (f"Greedy decoding with and without prompt lookup (10 draft tokens), D={data['new_tokens']}, "
            f"{data['statistic']} over {data['repeats']} repeats, prefill included.\n\n"
            + table(["task", "prompt tokens", *names, "prompt lookup speed-up, transformers", "Trellis",
                     "Trellis / transformers, prompt lookup"], rows))


def eval_table(data: dict) -> str:
    """Files before the batched peers (``plain-batched``, ``lm-eval-hf-batched``) have no batched columns."""
    best: dict[str, dict[str, dict]] = {}
    for r in data["results"]:
        best.setdefault(r["workload"], {})[r["backend"]] = r
    batched = [b for b in ("plain-batched", "lm-eval-hf-batched") if any(b in by for by in best.values())]
    rows = []
    for workload, b in best.items():
        plain, hf, ours, warm = b["plain"], b["lm-eval-hf"], b["trellis"], b["trellis-warm"]
        peers = [r for name, r in b.items() if not name.startswith("trellis")]
        fastest = min(peers, key=lambda r: r["seconds"])
        rows.append([f"`{workload}`", str(plain["requests"]), f"{plain['seconds']:.1f}", f"{hf['seconds']:.1f}",
                     *(f"{b[name]['seconds']:.1f}" for name in batched), f"{ours['seconds']:.1f}",
                     times(plain["seconds"], ours["seconds"]), times(hf["seconds"], ours["seconds"]),
                     *([f"{times(fastest['seconds'], ours['seconds'])} ({fastest['backend']})"] if batched else []),
                     f"{ours['hit_rate']:.0%}", f"{plain['tokens']} / {ours['tokens']}", f"{warm['seconds']:.2f}",
                     f"{warm['hit_rate']:.0%}", f"{max(r['max_abs_dlogp'] for r in b.values()):.1e}"])
    meta = data.get("info", data)  # older files keep threads and dtype at the top level
    batch = f", batched peers {meta['batch_size']} requests per forward" if batched else ""
    return (f"Multiple-choice scoring, seconds (best of the runs), {meta['threads']} torch thread(s), "
            f"{meta['dtype']}{batch}.\n\n"
            + table(["workload", "requests", "plain transformers", "lm-eval HF",
                     *({"plain-batched": "plain, batched", "lm-eval-hf-batched": "lm-eval HF, batched"}[n]
                       for n in batched), "Trellis", "vs plain", "vs lm-eval",
                     *(["vs the fastest peer"] if batched else []), "context tokens from cache",
                     "tokens computed (plain / Trellis)", "Trellis, contexts cached", "its hit rate",
                     "max abs Δ log-prob vs plain"], rows))


BASELINES = {"gather+sdpa": "gather + SDPA", "sdpa": "SDPA, contiguous K/V", "sdpa fold": "SDPA, query groups folded",
             "sdpa flash": "SDPA flash"}


def kernels_table(data: dict) -> str:
    """Files before the contiguous-K/V baselines have gather + SDPA alone, and read bandwidth under older keys."""
    cells: dict[tuple, dict[str, dict]] = {}
    overhead = ""
    for r in data["rows"]:
        if "call_pair_us_torch_ops" in r:
            if r["method"] == "cpp":
                overhead = (f" One layer's decode call pair (`store_kv` + `paged_attention`, {r['method']}): "
                            f"{r['call_pair_us_public']:.1f} µs through `trellis.ops`, "
                            f"{r['call_pair_us_torch_ops']:.1f} µs through `torch.ops.trellis`.")
            continue
        cells.setdefault((r["device"], r["model"], r["kind"], r["batch"], r["context"], r["new_tokens"]),
                         {})[r["method"]] = r
    devices = {key[0] for key in cells}
    rows = []
    for (device, model, kind, batch, context, new), m in cells.items():
        kernel = "cpp" if "cpp" in m else "triton"
        ours, compared = m[kernel], [b for b in BASELINES if b in m]
        pct = ours.get("pct_bandwidth", ours.get("pct_read_bandwidth"))
        merit = f"{ours['kv_gbps']:.1f} GB/s ({pct:.0f} %)" if kind == "decode" else f"{ours['tflops']:.3f} TFLOP/s"
        strongest = min(compared, key=lambda b: m[b]["us"])
        lead = times(m[strongest]["us"], ours["us"]) + ("" if compared == ["gather+sdpa"] else f" ({strongest})")
        rows.append([f"{model} {kind}" + (f" ({device})" if len(devices) > 1 else ""), str(batch), str(context),
                     str(new), f"{m['reference']['us']:,.0f}", f"{ours['us']:,.0f}",
                     *(f"{m[b]['us']:,.0f}" for b in compared), merit, lead])
    first, info = data["rows"][0], data["machine"]
    kernel = "cpp" if any("cpp" in m for m in cells.values()) else "triton"
    compared = [b for b in BASELINES if any(b in m for m in cells.values())]
    if compared == ["gather+sdpa"]:
        bandwidth, lead = f"measured read bandwidth {first['read_bandwidth_gbps']:.1f} GB/s", "SDPA / cpp"
    else:
        bandwidth = f"measured {first['bandwidth_method']} bandwidth {first['bandwidth_gbps']:.1f} GB/s"
        lead = f"strongest baseline / {kernel}"
    return (f"Paged attention alone, µs per call ({first['stat']}), {first['dtype'].removeprefix('torch.')}, "
            f"{info['threads']} torch thread(s); {bandwidth}.{overhead}\n\n"
            + table(["configuration", "sequences", "context", "new tokens", "reference", kernel,
                     *(BASELINES[b] for b in compared), f"{kernel}: KV read (% of bandwidth) or compute", lead], rows))


E2E_METRICS = {"ttft_cold_s": "TTFT, cold prompt", "ttft_cached_s": "TTFT, prefix cached",
               "decode_tokens_per_s": "one session's decode, tokens/s", "sessions_tokens_per_s": "N sessions, tokens/s"}


def e2e_summary(result: dict) -> dict[str, tuple[float | None, float | None]]:
    """``bench_e2e.py``'s metrics -> (Trellis, transformers), medians of the repetitions."""
    tr, hf = (result["systems"][s] for s in ("trellis", "transformers"))
    rows: dict[str, tuple[float | None, float | None]] = {}
    for key in E2E_METRICS:
        values = (tr[key], hf[key])
        rows[key] = tuple(statistics.median(v) if isinstance(v, list) else v for v in values)
    return rows


def e2e_table(result: dict) -> str:
    s, info = result["settings"], result["info"]
    rows = []
    for key, (ours, theirs) in e2e_summary(result).items():
        if ours is None or theirs is None:
            rows.append([E2E_METRICS[key], "—", "—", "decode too short to time"])
            continue
        is_time = key.startswith("ttft")  # lower is better; the rest are rates
        shown = (f"{1e3 * ours:.1f} ms", f"{1e3 * theirs:.1f} ms") if is_time else (f"{ours:.1f}", f"{theirs:.1f}")
        rows.append([E2E_METRICS[key], *shown, times(theirs, ours) if is_time else times(ours, theirs)])
    graph_notes = {True: ", decode steps replayed from CUDA graphs", False: ", every decode step eager (CUDA graphs off)"}
    graph_note = graph_notes.get(info.get("cuda_graphs"), "") if info["device"].startswith("cuda") else ""
    return (f"{info['model']}, {info['dtype']} on {info['device']}, Trellis attention `{info['trellis_backend']}`"
            f"{graph_note}: a {s['prompt']}-token prompt ({s['shared_tokens']} tokens cached for the second TTFT), "
            f"{s['decode']} decoded tokens; N={s['sessions']} sessions of {s['session_decode']} tokens at φ={s['session_phi']:.2f}; "
            f"medians of {s['repeats']}.\n\n" + table(["metric", "Trellis", "transformers", "Trellis lead"], rows)
            + profile_note(result["systems"]))


def profile_note(systems: dict) -> str:
    """``bench_e2e --profile``: one cold prompt's host time, in ops and the rest, per system."""
    profiles = {name: r["cold_prompt_profile"] for name, r in systems.items() if "cold_prompt_profile" in r}
    if not profiles:
        return ""
    parts = [f"{name} {p['wall_ms']:.1f} ms ({p['in_ops_ms']:.1f} in ops; most: "
             + ", ".join(f"`{op['op']}` {op['self_cpu_ms']:.1f}" for op in p["top"][:3]) + ")"
             for name, p in profiles.items()]
    return "\n\nOne cold prompt, profiled on the host: " + "; ".join(parts) + "."


def gpu_check_table(data: dict) -> str:
    """``scripts/gpu_check.py``: each step's outcome, then what the steps measured."""
    steps = data["steps"]
    status = [[name, "passed" if step["ok"] else "timed out" if step["timed_out"] else f"failed (exit {step['rc']})",
               f"{step['seconds']:.0f}"] for name, step in steps.items()]
    parts = [table(["step", "outcome", "seconds"], status)]
    tests = steps.get("tests", {}).get("result")
    if tests:
        parts.append(f"CUDA tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                     f"{tests['skipped']} skipped" + (f": {', '.join(tests['failed'])}." if tests["failed"] else "."))
    parity = steps.get("parity", {}).get("result")
    if parity:
        rows = [[dtype, *(f"{r[f'{name}_error']:.2e} ({r[f'{name}_sdpa_error']:.2e})" for name in ("cold", "decode", "hit")),
                 str(r["reused_tokens"]), "yes" if r["greedy_equal"] else "no", "yes" if r["sampling_reproducible"] else "no",
                 "passed" if r["ok"] else "FAILED"] for dtype, r in parity["dtypes"].items()]
        parts.append(f"Model parity on {parity['device']} (scripts/gpu_parity.py): Trellis' largest logit error against "
                     "fp32 sdpa, sdpa's own in brackets.\n\n" + table(
                         ["dtype", "cold", "decode", "cache hit", "reused tokens", "greedy equal", "sampling reproducible",
                          "outcome"], rows))
    if steps.get("kernels", {}).get("result"):
        parts.append(kernels_table(steps["kernels"]["result"]))
    if steps.get("e2e", {}).get("result"):
        parts.append(e2e_table(steps["e2e"]["result"]))
    return "\n\n".join(parts)


def shared_decode_table(data: dict) -> str:
    rows = [[str(r["sessions"]), str(r["prompt_tokens"]), str(r["shared_tokens"]), pm(r["shared_ms"]), pm(r["own_ms"]),
             times(mean(r["own_ms"]), mean(r["shared_ms"]))] for r in data["rows"]]
    return (f"Decode step of N sessions (ms, `{data['info']['dtype']}`; median time between tokens over "
            f"{data['new_tokens']} tokens, mean ± std over {data['repeats']} repeats per set, in turns): their "
            "prompts over one shared prefix, or each over its own of the same length.\n\n"
            + table(["N", "prompt", "shared", "one shared prompt", "own prompts", "shared faster"], rows))


def bf16_parity_table(data: dict) -> str:
    rows = data["prompts"]

    def span(key: str, digits: int = 2) -> str:
        values = [r[key] for r in rows]
        return f"{min(values):.{digits}f} to {max(values):.{digits}f}"

    generated = sum(r["generated"] for r in rows)
    each = ", ".join(f"{r['free_running_agreed']}/{r['generated']}" for r in rows)
    worst = max(r["greedy_shortfall_max"] for r in rows)
    shortfall = f" (the others at most {worst:.3f} below its choice)" if worst > 0 else ""
    return (f"SmolLM2 in bf16, Trellis beside transformers (sdpa), the fp32 model the oracle: {len(rows)} chat "
            f"prompts over one system prompt, {data['new_tokens']} greedy tokens each; figures over each "
            "prompt's generated text (the range over prompts).\n\n" + table(["", "SmolLM2-135M-Instruct"], [
                ["max logit error, transformers bf16 vs fp32", span("transformers_vs_fp32_max")],
                ["max logit error, Trellis bf16 vs fp32", span("trellis_vs_fp32_max")],
                ["mean logit error vs fp32, transformers / Trellis",
                 f"{span('transformers_vs_fp32_mean', 3)} / {span('trellis_vs_fp32_mean', 3)}"],
                ["max logit error, Trellis vs transformers, both bf16", span("trellis_vs_transformers_max")],
                ["mean logit error of the decode steps vs fp32 (each over its own text), transformers / Trellis",
                 f"{span('transformers_decode_vs_fp32_mean', 3)} / {span('trellis_decode_vs_fp32_mean', 3)}"],
                ["greedy token = transformers bf16's, on the same text",
                 f"{sum(r['greedy_agreed'] for r in rows)} of {generated}" + shortfall],
                ["free-running greedy, tokens before the first difference",
                 f"{sum(r['free_running_agreed'] for r in rows)} of {generated} ({each})"],
                ["a prefix-cache hit against the cold run of Trellis", f"up to {span('cache_hit_vs_cold_max')}"],
            ]))


# --- the CPU peers (bench_peers.py) ----------------------------------------------------------


def peers_ratios(result: dict) -> list[tuple[str, float]]:
    """The targets of issue 18 as ratios (> 1: Trellis ahead): one-session decode against llama.cpp on
    the same GGUF; the N=4 op against vLLM in the same dtype; and TTFT(probe)/TTFT(cold) per system."""
    summary, weights = result["summary"], {name: s["weights"] for name, s in result["systems"].items()}
    out = []
    for trellis in [n for n in summary if n.startswith("trellis")]:
        if "llamacpp" in summary and "decode_ms_per_token" in summary[trellis]:
            out.append((f"decode ms/token, llama.cpp / {trellis} (target ≥ 1 for the trellis_gguf systems)",
                        summary["llamacpp"]["decode_ms_per_token"] / summary[trellis]["decode_ms_per_token"]))
        for vllm in [n for n in summary if n.startswith("vllm") and weights[n] == weights[trellis]]:
            for op in sorted(k for k in summary[trellis] if k.startswith("op_D") and k in summary[vllm]):
                out.append((f"N=4 φ=0.9 {op.removeprefix('op_')} s/op, {vllm} / {trellis} (target ≥ 1.5)",
                            summary[vllm][op]["seconds"] / summary[trellis][op]["seconds"]))
    for name, s in summary.items():
        if "ttft_cold" in s:
            out.append((f"TTFT probe / cold, {name} (target ≤ 0.15 for Trellis)", s["ttft_probe"] / s["ttft_cold"]))
    return out


def peers_table(result: dict) -> str:
    """One row per measurement, one column per system, as bench_peers.py prints it."""
    summary, systems = result["summary"], result["systems"]
    names = [n for n in systems if n in summary]
    w = result["workload"]

    def op_cell(s: dict, D: int) -> str:
        op = s.get(f"op_D{D}")
        return f"{op['seconds']:.2f} s ({op['tokens_per_s']:.0f} tok/s)" if op else "—"

    rows = [["TTFT, cold prompt (s)"] + [f"{summary[n]['ttft_cold']:.3f}" for n in names],
            [f"TTFT, φ={w['realized_phi']:.3f} probe (s)"] + [f"{summary[n]['ttft_probe']:.3f}" for n in names]]
    rows += [[f"N={w['N']}, D={D}: s per op (tokens/s)"] + [op_cell(summary[n], D) for n in names]
             for D in w["decode_budgets"]]
    rows.append([f"one session's decode, ms/token at ~{w['L']} context"]
                + [f"{summary[n]['decode_ms_per_token']:.1f}" for n in names])
    return table([""] + [systems[n]["label"] for n in names], rows)


def peers_tables(result: dict) -> str:
    """Everything bench_peers.py prints of a run: the systems, the target ratios, the floors."""
    text = peers_table(result)
    text += "\n\nRatios (> 1: Trellis ahead; TTFT: lower is better):\n\n"
    text += table(["", "ratio"], [[label, f"{value:.2f}"] for label, value in peers_ratios(result)])
    if "floors" in result:
        text += f"\n\n{ceilings_line(result['floors']['ceilings'])}:\n\n" + table(TARGET_HEADER, target_rows(result))
    if result.get("unavailable"):
        text += "\n\nNot run: " + "; ".join(f"{n}: {why}" for n, why in result["unavailable"].items())
    return text


def peers_runs_table(results: Results, directory: Path) -> str:
    """Issue 18's ratios, one row per peers run of a machine: how far apart repeated runs land."""
    def ratio(summary: dict, ours: str, theirs: str, key: str) -> str:
        if key not in summary.get(ours, {}) or key not in summary.get(theirs, {}):
            return "—"
        a, b = summary[theirs][key], summary[ours][key]
        return f"{a['seconds'] / b['seconds']:.2f}×" if isinstance(a, dict) else f"{a / b:.2f}×"

    def share(s: dict | None) -> str:
        return f"{s['ttft_probe'] / s['ttft_cold']:.3f}" if s and "ttft_cold" in s else "—"

    rows = []
    runs = sorted((name for name, data in results.items() if kind_of(data) == "peers"),
                  key=lambda name: results[name].get("info", {}).get("date", ""))  # undated files first, by name
    for name in runs:
        data = results[name]
        summary = data["summary"]
        commit = (data.get("info", {}).get("trellis_commit") or "")[:7] or "—"
        rows.append([source(name, directory), commit,
                     *(ratio(summary, f"trellis_{w}", f"vllm_{w}", f"op_D{D}") for w in ("bf16", "fp32") for D in (16, 64)),
                     ratio(summary, "trellis_gguf", "llamacpp", "decode_ms_per_token"),
                     ratio(summary, "trellis_gguf_q8", "llamacpp", "decode_ms_per_token"),
                     share(summary.get("trellis_bf16")), share(summary.get("trellis_fp32")), share(summary.get("vllm_bf16"))])
    return table(["run", "Trellis at", "bf16 D=16", "bf16 D=64", "fp32 D=16", "fp32 D=64", "GGUF decode", "8-bit x",
                  "TTFT ratio bf16", "fp32", "vLLM bf16"], rows)


def kind_of(data: dict) -> str:
    if data.get("what") in ("gpu_check", "shared_decode", "bf16_parity", "chat"):
        return data["what"]
    if {"workload", "summary", "systems"} <= data.keys():  # bench_peers.py
        return "peers"
    if "systems" in data and "sessions" in data.get("settings", {}):
        return "e2e"
    if "results" in data:
        return "eval"
    if "dtypes" in data:
        return "dtypes"
    if "rows" in data:
        first = data["rows"][0]
        return ("kernels" if "method" in first else "step" if "other_ms" in first
                else "decode" if "transformers sdpa" in first
                else "linear" if "F.linear (blas)" in first else "speculative")
    if "points" in data:
        first = data["points"][0]
        return "block_size" if "block_size" in first else "throughput" if "tokens_per_s" in first else "ttft"
    return "targets" if "targets" in data else "elsewhere"


# kind -> (section title, renderers of one file); the N=4 targets are one table over every file.
SECTIONS: dict[str, tuple[str, list[Callable[[dict], str]]]] = {
    "throughput": ("Throughput, allocations and KV memory vs φ", [throughput_table, allocations_table, kv_memory_table]),
    "targets": ("Four sessions, short answers", []),
    "ttft": ("Time to first token vs φ", [ttft_table]),
    "block_size": ("Block size", [block_size_table]),
    "decode": ("Decode step", [decode_table]),
    "step": ("Where a decode step goes", [step_table]),
    "linear": ("Linear layers", [linear_table]),
    "dtypes": ("Decode step by dtype", [dtypes_table]),
    "speculative": ("Prompt-lookup decoding", [speculative_table]),
    "eval": ("Scoring with shared contexts", [eval_table]),
    "kernels": ("Attention kernels", [kernels_table]),
    "shared_decode": ("Sessions over one system prompt", [shared_decode_table]),
    "gpu_check": ("GPU check", [gpu_check_table]),
    "e2e": ("End to end", [e2e_table]),
    "bf16_parity": ("bf16 parity", [bf16_parity_table]),
    "chat": ("A chat's next turn", [chat_table]),
    "peers": ("CPU peers", [peers_tables]),
    "elsewhere": ("Rendered in the docs", []),  # no table of their own here: listed with the pages quoting them
}


def machine_section(directory: Path) -> str:
    results = load(directory)
    where = directory.relative_to(ROOT).as_posix() + "/"
    parts = [f"### {machine(results)} (`{where}`)",
             f"torch {versions(results, 'torch')}; transformers {versions(results, 'transformers')}; "
             f"{versions(results, 'model')}, {versions(results, 'dtype')}; Trellis attention "
             f"`{versions(results, 'trellis_backend')}`."
             + "".join(f" Figures: {', '.join(figures)}." for figures in [[f"[`{p.name}`](../{p.relative_to(ROOT).as_posix()})"
                                                                          for p in sorted(directory.glob("*.png"))]] if figures)]
    kinds = {name: kind_of(data) for name, data in results.items()}
    if "peers" in kinds.values():
        parts += ["#### CPU peers, run by run",
                  ("Issue 18's ratios per `bench_peers.py` run, in the order of the dates files record (by name for "
                  "those that record none): the four-session op, vLLM's seconds over "
                  "Trellis' in the same dtype; one session's GGUF decode, llama.cpp's ms/token over Trellis'; TTFT, "
                  "the probe's over the cold prompt's."), peers_runs_table(results, directory)]
    for kind, (title, renderers) in SECTIONS.items():
        names = [n for n, k in kinds.items() if k == kind]
        if kind == "targets" and any("targets" in data for data in results.values()):
            parts += [f"#### {title}", targets_table(results, directory)]
        if kind == "elsewhere" and names:
            parts += [f"#### {title}", "\n".join(f"- {source(name.split(' ')[0], directory)}: {quoted_in(directory / name)}"
                                                  for name in names)]
        for name in names if renderers else []:
            parts.append(f"#### {title}: {source(name.split(' ')[0], directory)}")
            parts += [render(results[name]) for render in renderers]
    return "\n\n".join(parts)


def quoted_in(path: Path) -> str:
    """The docs pages (results.md aside) that name ``path``, as links; what a results file without a
    table of its own here is rendered by."""
    relative = path.relative_to(ROOT).as_posix()
    pages = [page for page in sorted((ROOT / "docs").glob("*.md"))
             if page.name != "results.md" and relative.removeprefix("benchmarks/") in page.read_text()]
    return ", ".join(f"[{page.name}]({page.name})" for page in pages) or "quoted by no page"


def results_section() -> str:
    machines = [RESULTS, *sorted(p for p in RESULTS.iterdir() if p.is_dir())]
    return "\n\n".join(machine_section(m) for m in machines)


# --- the README's headline -------------------------------------------------------------------


HEADLINE_PEERS = {"hf_generate": "`generate()` per request", "hf_generate_batched": "one batched `generate()`",
                  "hf_generate_batch": "`generate_batch`"}


def median_of(points: list[dict], system: str, phi: float, key: str) -> float:
    return statistics.median(next(p for p in points if p["system"] == system and p["phi"] == phi)[key])


def headline() -> str:
    directory = RESULTS / HEADLINE_MACHINE
    results = load(directory)
    ttft, tput = results["ttft.json"]["points"], results["throughput.json"]["points"]
    decode, spec = results["decode.json"]["rows"][-1], results["speculative.json"]["rows"][0]
    trellis_decode = f"trellis cpp, {results['decode.json']['info']['trellis_linear_kernel']}"  # the default kernel
    n, length, d = (results["throughput.json"]["settings"][k] for k in ("N", "L", "D"))

    def row(what: str, ours: float, theirs: float, unit: str, digits: int, faster: float, file: str,
            peer: str = "") -> list[str]:
        return [what, f"{ours:.{digits}f} {unit}", f"{theirs:.{digits}f} {unit}{peer}", f"{faster:.2f}×",
                f"[`{file}`](benchmarks/results/{HEADLINE_MACHINE}/{file})"]

    def fastest(points: list[dict], phi: float, key: str, best: Callable) -> tuple[float, str]:
        """The transformers peer that did best at ``phi`` (``best``: min for times, max for rates)."""
        peers = {p["system"] for p in points} - {"trellis"}
        value, name = best((median_of(points, s, phi, key), s) for s in peers)
        return value, f" ({HEADLINE_PEERS[name]})"

    def shared(points: list[dict], phi: float) -> int:
        point = next(p for p in points if p["phi"] == phi)
        return round(point["realized_phi"] * point["L"])

    rows = []
    for phi in (0.0, 0.9):
        ours, (theirs, peer) = median_of(ttft, "trellis", phi, "ttft"), fastest(ttft, phi, "ttft", min)
        cached = f"{shared(ttft, phi)} tokens cached" if shared(ttft, phi) else "nothing cached"
        rows.append(row(f"Time to first token, {ttft[0]['L']}-token prompt, {cached}", 1e3 * ours, 1e3 * theirs,
                        "ms", 0, theirs / ours, "ttft.json", peer))
    for phi in (0.0, 0.9):
        ours, (theirs, peer) = median_of(tput, "trellis", phi, "tokens_per_s"), fastest(tput, phi, "tokens_per_s", max)
        common = f"sharing a {shared(tput, phi)}-token prefix" if shared(tput, phi) else "sharing nothing"
        rows.append(row(f"{n} sessions: {length}-token prompts {common}, {d} new tokens each", ours, theirs,
                        "tokens/s", 1, ours / theirs, "throughput.json", peer))
    rows.append(row(f"One decode step at a {decode['L']}-token context", decode[trellis_decode],
                    decode["transformers sdpa"], "ms", 1, decode["transformers sdpa"] / decode[trellis_decode],
                    "decode.json"))
    rows.append(row(f"Copy a passage from a {spec['prompt_tokens']}-token prompt with prompt-lookup decoding, "
                    f"{results['speculative.json']['new_tokens']} tokens", spec["trellis prompt lookup"],
                    spec["transformers prompt lookup"], "s", 2,
                    spec["transformers prompt lookup"] / spec["trellis prompt lookup"], "speculative.json"))
    return (f"Measured on {machine(results)} (2 torch threads), SmolLM2-135M-Instruct in fp32, torch "
            f"{versions(results, 'torch')}, transformers {versions(results, 'transformers')}. Each row compares "
            "Trellis with plain transformers in the same run: the fastest of its ways to serve the workload "
            "(named: `generate()` per request, one batched `generate()` call, or `generate_batch`), or the same "
            "decoding loop with sdpa attention. Throughput counts a whole op: a fresh pipeline (Trellis' KV pool, "
            "emptied, kept from op to op, as a server keeps it), the shared prefix warmed, all sessions run. Medians "
            "of the repetitions.\n\n"
            + table(["workload", "Trellis", "transformers", "Trellis speed-up", "data"], rows))


# --- writing and checking --------------------------------------------------------------------


def splice(text: str, name: str, body: str) -> str:
    """``text`` with the part between ``<!-- name:begin -->`` and ``<!-- name:end -->`` replaced by ``body``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(rf"{re.escape(begin)}\n.*?{re.escape(end)}", re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"no {begin} / {end} markers found")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text, count=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a document is out of date; write nothing")
    args = parser.parse_args()
    stale = []
    documents = {RESULTS_DOC: {"results": results_section()}, README: {"headline": headline()},
                 DOC: {name: peers_table(json.loads((ROOT / name.removeprefix("peers ")).read_text()))
                       for name in PEERS_MARKER.findall(DOC.read_text())}}
    for path, parts in documents.items():
        text = rendered = path.read_text()
        for name, body in parts.items():
            rendered = splice(rendered, name, body)
        if rendered != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not args.check:
                path.write_text(rendered)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python benchmarks/report.py", file=sys.stderr)
        return 1
    print(f"rewrote {', '.join(stale)}" if stale and not args.check else "up to date")
    return 0

if __name__ == "__main__":
    sys.exit(main())
