"""benchmarks/floors.py: the model's arithmetic and bytes, the floors built from them, and the
targets table the peers' results get. The ceilings' measurement runs here too, on tiny sizes."""

import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from trellis.runner import cpu_linear

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # scripts, not a package
import floors
from floors import Shape

# Two layers, hidden 8, 4 query heads of 2 over 2 KV heads, MLP 16, vocabulary 10.
SHAPE = Shape(layers=2, hidden=8, q_heads=4, kv_heads=2, head_dim=2, intermediate=16, vocab=10)
# A machine that computes 1 GFLOP/s and reads 1 GB/s in both dtypes.
UNIT = {f"{what}_{dtype}": 1.0 for what in ("gemm_gflops", "read_gb_per_s") for dtype in floors.DTYPES}


def test_shape_counts_a_llama_config_weights():
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=10)
    assert Shape.of(config) == SHAPE
    # per layer: q and o 8x8, k and v 8x4, gate, up and down 8x16
    assert SHAPE.layer_weights == 2 * (2 * 64 + 2 * 32 + 3 * 128)
    assert SHAPE.head_weights == 80
    assert SHAPE.weight_bytes("bfloat16") == 2 * (SHAPE.layer_weights + 80)
    assert SHAPE.kv_bytes_per_key(4) == 2 * 2 * 2 * 2 * 4  # K and V, layers, KV heads, head_dim, fp32


def test_forward_flops_count_linear_attention_and_lm_head():
    # 3 tokens after 5 cached keys see 6, 7, 8 keys; attention: 4 * head_dim per query head and key, per layer
    flops = SHAPE.forward_flops(3, 5, 1)
    assert flops == 2 * 3 * SHAPE.layer_weights + 4 * 2 * 4 * 2 * (6 + 7 + 8) + 2 * 80
    assert SHAPE.forward_flops(1, 0, 0) == 2 * SHAPE.layer_weights + 4 * 2 * 4 * 2


def test_a_forward_is_bound_by_the_slower_of_arithmetic_and_reads():
    assert floors.forward_floor(4e9, 1e9, gflops=2.0, gb_per_s=1.0) == 2.0
    assert floors.forward_floor(1e9, 3e9, gflops=2.0, gb_per_s=1.0) == 3.0


def test_floors_sum_the_ops_forwards():
    big = Shape(layers=30, hidden=576, q_heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152)
    ceilings = {"gemm_gflops_float32": 400.0, "read_gb_per_s_float32": 30.0,
                "gemm_gflops_bfloat16": 2800.0, "read_gb_per_s_bfloat16": 30.0}
    out = floors.floors(big, "float32", ceilings, L=512, N=4, shared=448, decode_budgets=[16, 64])
    weights, kv = big.weight_bytes("float32"), big.kv_bytes_per_key(4)

    def forward(flops, keys):
        return floors.forward_floor(flops, weights + kv * keys, 400.0, 30.0)

    warm, suffixes = forward(big.forward_flops(448, 0, 1), 0), forward(4 * big.forward_flops(64, 448, 1), 448)
    step = forward(4 * big.forward_flops(1, 512, 1), 448 + 4 * 64)  # the first decode step
    assert out["ttft_cold"] == forward(big.forward_flops(512, 0, 1), 0)
    assert out["ttft_probe"] == forward(big.forward_flops(64, 448, 1), 448)
    assert out["decode_step"] == forward(big.forward_flops(1, 512, 1), 512)
    assert warm + suffixes + 15 * step < out["op_D16"] < warm + suffixes + 15 * step * 1.01  # steps' contexts grow
    assert out["op_D64"] > out["op_D16"]
    # prefill is arithmetic-bound in fp32, decode read-bound: the prefills cost what 704 tokens' FLOPs do
    assert suffixes + warm == pytest.approx((big.forward_flops(448, 0, 1) + 4 * big.forward_flops(64, 448, 1)) / 400e9)
    assert step == pytest.approx((weights + kv * 704) / 30e9)
    bf16 = floors.floors(big, "bfloat16", ceilings, L=512, N=4, shared=448, decode_budgets=[16])
    assert bf16["op_D16"] < out["op_D16"] / 2


def result(summary: dict) -> dict:
    """A peers result with the floors of SHAPE on the unit machine."""
    by_weights = {w: floors.floors(SHAPE, w, UNIT, L=8, N=2, shared=4, decode_budgets=[4]) for w in floors.DTYPES}
    systems = {"trellis_fp32": "float32", "trellis_bf16": "bfloat16", "vllm_fp32": "float32"}
    return {"summary": summary, "workload": {"decode_budgets": [4]},
            "systems": {name: {"weights": w} for name, w in systems.items()},
            "floors": {"ceilings": UNIT, "by_weights": by_weights}}


def test_target_rows_give_floor_target_and_trellis_with_their_share_of_floor_speed():
    r = result({"trellis_fp32": {"op_D4": {"seconds": 2e-5}, "ttft_cold": 1e-4, "ttft_probe": 5e-5,
                                 "decode_ms_per_token": 0.01},
                "vllm_fp32": {"op_D4": {"seconds": 6e-5}}})
    rows = {row[0]: row[1:] for row in floors.target_rows(r)}
    assert set(rows) == {"N=4 op, D=4, fp32", "TTFT, cached-prefix probe, fp32", "one session's decode step, fp32"}
    fp32 = r["floors"]["by_weights"]["float32"]
    op = rows["N=4 op, D=4, fp32"]
    assert op[0] == f"{fp32['op_D4']:.3g}"
    assert op[1] == floors.seconds_and_share(4e-5, fp32["op_D4"])  # vLLM's 6e-5 / 1.5
    assert op[2] == floors.seconds_and_share(2e-5, fp32["op_D4"])
    probe = rows["TTFT, cached-prefix probe, fp32"]
    assert probe[1] == floors.seconds_and_share(0.15 * 1e-4, fp32["ttft_probe"])
    assert rows["one session's decode step, fp32"][1:] == ["—", floors.seconds_and_share(1e-5, fp32["decode_step"])]


def test_share_of_floor_speed():
    assert floors.seconds_and_share(2.0, 1.0) == "2 (50 %)"
    assert floors.seconds_and_share(0.5, 1.0) == "0.5 (200 %)"  # a target below its floor: out of reach
    assert floors.seconds_and_share(None, 1.0) == "—"


def test_measure_ceilings_reports_rates_per_dtype(monkeypatch):
    monkeypatch.setattr(floors, "GEMM_SIZE", 64)
    threads = torch.get_num_threads()
    out = floors.measure_ceilings(1, {"float32": 1 << 20, "bfloat16": 1 << 19}, calls=2)
    assert set(out) == set(UNIT) and all(v > 0 for v in out.values())
    assert torch.get_num_threads() == threads  # restored


def test_each_ceiling_takes_its_highest_measurement():
    assert floors.higher_ceilings({"a": 1.0, "b": 5.0}, {"a": 2.0, "b": 3.0}) == {"a": 2.0, "b": 5.0}


def test_gemm_ceiling_takes_trellis_panels_where_they_are_faster(monkeypatch):
    # MKL's fp32 GEMM on AMD cores runs below Trellis' panels; the ceiling is the faster of the two.
    monkeypatch.setattr(floors, "GEMM_SIZE", 64)
    monkeypatch.setattr(cpu_linear, "panels_serve", lambda kind, dtype: True)
    matmul = torch.matmul

    def slow_matmul(a, b):
        time.sleep(0.05)
        return matmul(a, b)

    monkeypatch.setattr(torch, "matmul", slow_matmul)
    out = floors.measure_ceilings(1, {"float32": 1 << 20, "bfloat16": 1 << 19}, calls=2)
    assert out["gemm_gflops_float32"] > 2 * 64**3 / 0.05 / 1e9 * 10
    assert out["gemm_gflops_bfloat16"] > 2 * 64**3 / 0.05 / 1e9 * 10
