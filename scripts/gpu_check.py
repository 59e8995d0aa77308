"""The GPU check in one command: the CUDA tests, a model-level parity check, the Triton kernel
benchmarks and an end-to-end TinyLlama-shape run, each a child process under its own time limit,
into one JSON file.

    python3 scripts/gpu_check.py [--json PATH] [--only tests parity kernels e2e]  # a CUDA machine (make gpu-check)
    python scripts/gpu_check.py --self-test                                      # without one (make gpu-check-selftest)

Steps (the limits add up to 445 s, so the check fits a 10-minute command with its start-up; a step
that runs out is recorded as timed out and the next one starts):
  environment  versions (torch, Triton, transformers, Trellis' commit), the GPU, nvidia-smi
  tests        the tests that run on CUDA: tests/test_ops_triton.py (bf16, an 8k-token decode and
               opcheck included there), the Triton cases of tests/test_ops_api.py and
               tests/test_cuda_graphs.py (decode steps replayed from CUDA graphs against eager ones)
  parity       scripts/gpu_parity.py: a tiny random Llama, Trellis against transformers' sdpa on the
               same weights in fp32 and bf16 (logits cold, at a decode step and over a cached prefix;
               greedy tokens; a seeded sampling run)
  kernels      benchmarks/bench_kernels.py --device cuda --size gpu --dtype bfloat16: decode in GB/s
               against the device's measured copy bandwidth, extend in TFLOP/s beside SDPA flash
  e2e          benchmarks/bench_e2e.py: TinyLlama's shape, random weights, bf16: TTFT (cold and over
               a cached prefix), one session's decode rate, 8 sessions; Trellis and transformers

The report is written again after every step (``"finished": false`` until the last), so a check
cut short keeps what it measured. With ``--json``, each step's whole output goes beside the report
as it runs (``<name>_<step>.log``), and the tests' JUnit XML too (``<name>_tests.xml``).

Nothing is fetched and nothing is installed into the machine's Python: Trellis runs from this
checkout (PYTHONPATH), against the machine's own torch, Triton and transformers. Wheels in
``.whl/`` (see docs/testing.md), if any, are unpacked into a private folder first and put ahead
(a failed unpack is recorded and the check runs on without them). Exit status: 0 when every step
passed, 1 when one failed or timed out, 2 when there is no CUDA device (and not --self-test):
nothing is measured then.

--self-test runs the same steps on CPU at tiny sizes, the Triton kernels in Triton's interpreter
(TRITON_INTERPRET=1, fp32): it checks this script and the benchmarks' CUDA-free paths, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
TAIL = 4000  # characters of each step's output kept in the JSON
FAILURES, MESSAGE, DETAILS = 30, 500, 2000  # failed tests kept, and characters of each one's message and traceback


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: float
    writes: Path | None = None  # the JSON (or JUnit XML) the step leaves, read into the report


ENVIRONMENT = """
import json, subprocess, sys, torch
sys.path.insert(0, "benchmarks")
from common import environment
info = environment(torch.bfloat16 if torch.cuda.is_available() else torch.float32, None)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu_memory_gib=p.total_memory / 2**30, gpu_capability=f"{p.major}.{p.minor}",
                gpu_multiprocessors=p.multi_processor_count, cuda=torch.version.cuda)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as error:
    info["nvidia_smi"] = f"not run: {error}"
print(json.dumps(info))
"""


def steps(self_test: bool, work: Path, junit: Path) -> list[Step]:
    python = sys.executable
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if self_test:  # CPU, tiny sizes, the interpreter: minutes on a 2-core machine
        tests = [*pytest, "tests/test_ops_triton.py", "-k", "split_k_decode or strided"]
        kernels = ["--device", "cpu", "--size", "tiny", "--dtype", "float32"]
        e2e = ["--device", "cpu", "--dtype", "float32", "--model", "tiny", "--backend", "triton", "--prompt", "64",
               "--decode", "4", "--sessions", "2", "--repeats", "1", "--profile"]
        limits = (60, 240, 120, 240, 400)
    else:  # 445 s in all: the check, with its start-up, fits a 10-minute command
        tests = [*pytest, "tests/test_ops_triton.py", "tests/test_ops_api.py", "tests/test_cuda_graphs.py", "-k",
                 "triton or cuda"]
        kernels = ["--device", "cuda", "--size", "gpu", "--dtype", "bfloat16"]
        e2e = ["--device", "cuda", "--dtype", "bfloat16", "--model", "tinyllama", "--prompt", "512", "--decode", "128",
               "--sessions", "8", "--repeats", "3", "--profile"]
        limits = (45, 150, 60, 90, 100)
    return [
        Step("environment", [python, "-c", ENVIRONMENT], limits[0]),
        Step("tests", tests, limits[1], junit),
        Step("parity", [python, "scripts/gpu_parity.py", "--json", str(work / "parity.json")], limits[2],
             work / "parity.json"),
        Step("kernels", [python, "benchmarks/bench_kernels.py", *kernels, "--json", str(work / "kernels.json")],
             limits[3], work / "kernels.json"),
        Step("e2e", [python, "benchmarks/bench_e2e.py", *e2e, "--json", str(work / "e2e.json")], limits[4],
             work / "e2e.json"),
    ]


def junit_counts(path: Path) -> dict:
    """The tests' counts, the failed tests' names, and each failure's message and the end of its traceback."""
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []  # (test, its <failure> or <error>)
    for case in suite.iter("testcase"):
        problem = case.find("failure")
        problem = case.find("error") if problem is None else problem
        if problem is not None:
            failed.append((f"{case.get('classname')}::{case.get('name')}", problem))
    counts["failed"] = sorted(test for test, _ in failed)
    counts["failure_details"] = [{"test": test, "kind": problem.tag, "message": (problem.get("message") or "")[:MESSAGE],
                                  "details": (problem.text or "")[-DETAILS:]}  # a traceback ends with its error
                                 for test, problem in failed[:FAILURES]]
    return counts


def read_result(step: Step, output: str) -> dict:
    """What the step measured: the environment's last output line, else the file it wrote."""
    if step.name == "environment":
        return json.loads(output.strip().splitlines()[-1])
    if step.writes.suffix == ".xml":
        return junit_counts(step.writes)
    return json.loads(step.writes.read_text())


def run_step(step: Step, env: dict[str, str], log: Path) -> dict:
    shown = " ".join(step.command)
    print(f"\n=== {step.name} (limit {step.timeout_s:.0f} s): {shown[:150]}{' ...' if len(shown) > 150 else ''}",
          flush=True)
    if step.writes is not None:
        step.writes.unlink(missing_ok=True)  # only what this run leaves is read
    start = time.monotonic()
    # The output goes straight to its log, so a check killed mid-step keeps what the step printed. A new
    # session, so a timeout ends the step's own children too (and nothing else); so does the end of
    # this process (SIGTERM, Ctrl-C), which would otherwise leave them running.
    timed_out = False
    with open(log, "w") as out:
        process = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            process.wait(timeout=step.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    output = log.read_text(errors="replace")
    record = {"command": step.command, "rc": process.returncode, "timed_out": timed_out,
              "seconds": round(time.monotonic() - start, 1), "output_tail": output[-TAIL:]}
    print(output[-TAIL:], flush=True)
    if step.name == "environment" or (step.writes is not None and step.writes.exists()):
        try:
            record["result"] = read_result(step, output)
        except (ValueError, IndexError, OSError, ET.ParseError) as error:  # what it left is unreadable: say so
            record["result_error"] = f"{type(error).__name__}: {error}"[:MESSAGE]
    record["ok"] = process.returncode == 0 and not timed_out and "result_error" not in record
    print(f"=== {step.name}: {'ok' if record['ok'] else 'TIMED OUT' if timed_out else 'FAILED'} "
          f"in {record['seconds']} s", flush=True)
    return record


def unpack_wheels(work: Path) -> tuple[list[str], str | None]:
    """Wheels carried in .whl/ (the GPU machine has no network), unpacked into a private folder:
    their names, and pip's output if it failed (the check then runs without them)."""
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    if not wheels:
        return [], None
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--target", str(work / "site"), *wheels], capture_output=True, text=True, check=False)
    error = None if run.returncode == 0 else f"pip exited {run.returncode}: {(run.stdout + run.stderr)[-TAIL:]}"
    return [Path(w).name for w in wheels], error


def write_report(path: Path, report: dict) -> None:
    """The report as it stands; a new file replaces the old at once, so a kill leaves one whole."""
    report["ok"] = all(s["ok"] for s in report["steps"].values())
    e2e = report["steps"].get("e2e", {}).get("result", {}).get("info", {})
    # The environment, and what report.py names a results folder's runs by (model, attention backend).
    report["info"] = {**report["steps"].get("environment", {}).get("result", {}),
                      **{key: e2e[key] for key in ("model", "trellis_backend") if key in e2e}}
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(report, indent=1))
    staging.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-test", action="store_true", help="no GPU: the same steps on CPU, tiny sizes")
    parser.add_argument("--json", type=Path, help="where to write the report, the steps' logs beside it (default: "
                                                  "benchmarks/results/gpu/ on a GPU, the temporary folder for "
                                                  "--self-test, without logs)")
    parser.add_argument("--only", nargs="+", choices=("tests", "parity", "kernels", "e2e"), help="run only these steps")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # ends the running step too (run_step)

    try:
        import torch  # the machine's own
    except ImportError:
        print(f"no torch in {sys.executable}: run this with the Python that has the machine's torch "
              "(make gpu-check GPU_PYTHON=...)", file=sys.stderr)
        return 2
    if not args.self_test and not torch.cuda.is_available():
        print(f"no CUDA device here (torch {torch.__version__}: torch.cuda.is_available() is False), so nothing was "
              "checked or measured. Run this on a machine with an NVIDIA GPU; `make gpu-check-selftest` checks the "
              "script itself on CPU.", file=sys.stderr)
        return 2
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    default = (Path(tempfile.gettempdir()) / "gpu_check_selftest.json" if args.self_test
               else ROOT / "benchmarks" / "results" / "gpu" / f"gpu_check_{stamp}.json")
    path = args.json or default
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    logs = path.parent if args.json else work  # the logs stay only where the report was asked for
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    wheels, wheels_error = unpack_wheels(work)
    env["PYTHONPATH"] = os.pathsep.join([*([str(work / "site")] if wheels and not wheels_error else []), str(ROOT),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.self_test:
        env["TRITON_INTERPRET"] = "1"  # Triton's kernels on CPU tensors, before any import defines them

    report = {"what": "gpu_check", "self_test": args.self_test, "started": stamp, "finished": False, "wheels": wheels,
              "steps": {}}
    if wheels_error:
        report["wheels_error"] = wheels_error
        print(f"the wheels in {WHEELS} did not unpack; running without them: {wheels_error}", file=sys.stderr)
    for step in steps(args.self_test, work, logs / f"{path.stem}_tests.xml"):
        if args.only and step.name != "environment" and step.name not in args.only:
            continue
        report["steps"][step.name] = run_step(step, env, logs / f"{path.stem}_{step.name}.log")
        write_report(path, report)
    report["finished"] = True
    write_report(path, report)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'all steps passed' if report['ok'] else 'some steps FAILED'}; wrote {path}"
          + (" and the steps' logs beside it" if args.json else ""))
    for name, step in report["steps"].items():
        print(f"  {name:<12} {'ok' if step['ok'] else 'timed out' if step['timed_out'] else 'FAILED':<10} "
              f"{step['seconds']:>7.1f} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
