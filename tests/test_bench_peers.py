"""bench_peers' pure parts: the workers' shared measurements (over a fake system), the requests every
system gets, the rotation (common.rotated) and the summary. The peers themselves run only in the benchmark."""

import math
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # scripts, not a package
sys.path.insert(0, str(BENCHMARKS / "peers"))
import bench_gguf_fidelity
import bench_peers
import protocol
import report
from common import Workload, rotated


class FakeSystem(protocol.Worker):
    """Caches every prompt it saw; each generated token takes one tick of a fake clock."""

    def __init__(self, ticks: list[float]) -> None:
        self.ticks, self.seen, self.resets = ticks, [], 0

    def reset(self) -> None:
        self.seen, self.resets = [], self.resets + 1

    def generate(self, prompts, max_new_tokens):
        out = []
        for p in prompts:
            out.append((max((protocol.common_prefix(s, p) for s in self.seen), default=0), max_new_tokens))
            self.seen.append(p)
        self.ticks[0] += max_new_tokens
        return out

    def token_times(self, prompt, max_new_tokens):
        return [float(i * i) for i in range(max_new_tokens)]

    def token_logprobs(self, tokens):
        return [-float(t) for t in tokens[1:]]

    def greedy_tokens(self, prompt, max_new_tokens):
        return [prompt[-1]] * max_new_tokens


def test_worker_measurements(monkeypatch):
    ticks = [0.0]
    monkeypatch.setattr(protocol, "clock", lambda: ticks[0])
    system = FakeSystem(ticks)
    op = system.op([1, 2], [[1, 2, 3], [1, 2, 4]], 5)
    assert op == {"seconds": 6.0, "session_seconds": 5.0, "generated": 10, "cached_tokens": [2, 2]}
    assert system.ttft([7, 8, 9], [7, 8, 1]) == {"cold": 1.0, "probe": 1.0, "probe_cached_tokens": 2}
    assert system.decode([1], 4) == {"token_seconds": [1.0, 3.0, 5.0]}
    assert system.resets == 3  # every measurement starts from an empty cache


def test_every_system_gets_the_workloads_token_ids():
    op16, op64, ttft, decode = bench_peers.tasks(L=128, N=3, phi=0.9, decode_budgets=(16, 64), decode_tokens=8)
    w = Workload(L=128, D=16, N=3, phi=0.9)
    assert op16["prefix"] == w.prefix() and op16["prompts"] == [w.prompt(i) for i in range(3)]
    assert op64["max_new_tokens"] == 64 and op64["prompts"] == op16["prompts"]
    assert protocol.common_prefix(ttft["warm"], ttft["probe"]) >= w.shared and len(ttft["probe"]) == 128
    assert decode["max_new_tokens"] == 9 and len(decode["prompt"]) == 128


def test_rotation_and_summary():
    assert [rotated(["a", "b", "c"], r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    runs = [{"system": "trellis_fp32", "task": "op", "max_new_tokens": 16, "seconds": s, "session_seconds": s / 2,
             "generated": 64} for s in (1.0, 2.0, 4.0)]
    runs += [{"system": "vllm_fp32", "task": "op", "max_new_tokens": 16, "seconds": 3.0, "session_seconds": 2.0,
              "generated": 64}]
    runs += [{"system": "trellis_fp32", "task": "decode", "token_seconds": [0.01, 0.02, 0.05]},
             {"system": "trellis_fp32", "task": "decode", "token_seconds": [0.03, 0.04]}]
    runs += [{"system": s, "task": "ttft", "cold": 1.0, "probe": p, "probe_cached_tokens": 448}
             for s, p in (("trellis_fp32", 0.2), ("vllm_fp32", 0.3))]
    summary = bench_peers.summarize(runs)
    assert summary["trellis_fp32"]["op_D16"] == {"seconds": 2.0, "session_seconds": 1.0, "tokens_per_s": 32.0}
    assert abs(summary["trellis_fp32"]["decode_ms_per_token"] - 30.0) < 1e-9  # the median of every step
    systems = {"trellis_fp32": {"label": "Trellis fp32", "weights": "float32"},
               "vllm_fp32": {"label": "vLLM CPU fp32", "weights": "float32"}}
    result = {"summary": summary, "systems": systems, "unavailable": {"llamacpp": "not set up"},
              "workload": {"L": 512, "N": 4, "realized_phi": 0.875, "decode_budgets": [16]}}
    summary["vllm_fp32"]["decode_ms_per_token"] = 10.0
    ratios = dict(report.peers_ratios(result))
    assert ratios["N=4 φ=0.9 D16 s/op, vllm_fp32 / trellis_fp32 (target ≥ 1.5)"] == 1.5
    assert "Not run: llamacpp: not set up" in report.peers_tables(result)



def test_runs_table_orders_runs_by_date_and_states_each_target_ratio():
    def run(date: str | None, trellis_seconds: float) -> dict:
        summary = {"trellis_bf16": {"op_D16": {"seconds": trellis_seconds}, "ttft_cold": 0.2, "ttft_probe": 0.03},
                   "vllm_bf16": {"op_D16": {"seconds": 0.6}}}
        info = {"trellis_commit": "abcdef1234"} | ({"date": date} if date else {})
        return {"summary": summary, "systems": {}, "workload": {}, "info": info}

    results = {"peers_b.json": run("2026-12-02T00:00:00+00:00", 0.4), "peers_c.json": run("2026-12-01T00:00:00+00:00", 0.5),
               "peers_a.json": run(None, 0.3), "ttft.json": {"points": [{"phi": 0.0}]}}
    rows = report.peers_runs_table(results, report.RESULTS).splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == ["peers_a.json", "peers_c.json", "peers_b.json"]  # undated first
    cells = [c.strip() for c in rows[2].split("|")]
    assert cells[2:5] == ["abcdef1", "1.50×", "—"] and cells[9] == "0.150"  # vLLM's 0.6 s over 0.4; no D=64; TTFT

def test_fidelity_scores_every_text_and_continues_every_prompt():
    reply = FakeSystem([0.0]).fidelity(texts=[[1, 2, 3], [4, 5]], prompts=[[7, 8], [9]], max_new_tokens=2)
    assert reply == {"logprobs": [[-2.0, -3.0], [-5.0]], "continuations": [[8, 8], [9, 9]]}


def test_fidelity_summary():
    assert bench_gguf_fidelity.windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]  # a 1-token window scores nothing
    replies = {"trellis_gguf": {"logprobs": [[-1.0, -1.0]], "continuations": [[1, 2, 3], [4, 5, 6]]},
               "llamacpp": {"logprobs": [[-2.0]], "continuations": [[1, 9, 3], [4, 5, 6]]}}
    summary = bench_gguf_fidelity.summarize(replies, new_tokens=3)
    assert summary["perplexity"]["trellis_gguf"] == math.exp(1.0) and summary["perplexity"]["llamacpp"] == math.exp(2.0)
    assert summary["agreement"] == {"trellis_gguf / llamacpp": {"leading_tokens": [1, 3], "identical": 1}}
