"""The benchmarks' systems on a tiny model: each serves the seed's workload, and the counts the
README reports (fresh blocks, blocks held, cache bytes, hit rates) follow the seed's definitions;
every system's timed region holds the same work; the kernel benchmark's SDPA baselines and the
eval benchmark's batched peers compute what the unbatched reference computes; the shared-prompt
decode benchmark's two sets differ in sharing alone.

Timings are not checked here (they belong to the benchmarks); this keeps the benchmark code
working across transformers releases, whose continuous batching is one of the peers.
"""

import importlib
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import installed
from tests.models import smollm2_tokenizer, tiny_config, tiny_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # scripts, not a package
import bench_chat
import bench_kernels
import bench_shared_decode
import common
import report
from bench_eval import DATA, lm_eval_backend, plain_backend, plain_batched_backend
from common import SEED_BLOCK, Workload
from systems import HFGenerate, HFGenerateBatch, HFGenerateBatched, Trellis, systems
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

from trellis.eval.multiple_choice import choice_requests, read_questions
from trellis.runner import cpu_linear

L, D, N = 128, 4, 3


@pytest.fixture(scope="module")
def model():
    # Workload prompts draw token ids below 30000, which the model's vocabulary must hold.
    return tiny_pair(config=tiny_config(vocab_size=30000))[1]


def blocks(tokens: int) -> int:
    return -(-tokens // SEED_BLOCK)


@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_trellis_holds_the_shared_blocks_once(model, phi):
    w = Workload(L=L, D=D, N=N, phi=phi)
    shared = w.shared // SEED_BLOCK
    assert shared == min(round(phi * L / SEED_BLOCK), L // SEED_BLOCK - 1)
    result = Trellis(model).op(w)
    # The last generated token is never fed back, so a session writes L + D - 1 tokens of K/V.
    expected = shared + N * (blocks(L + D - 1) - shared)
    assert result.generated == N * D
    assert result.fresh_blocks == expected
    assert result.live_blocks == expected
    assert result.leaves == N
    probe = Trellis(model).ttft(w)
    assert probe.hit_rate == w.shared / L


def test_trellis_starts_every_op_from_an_empty_cache_over_its_kept_pool(model):
    w = Workload(L=L, D=D, N=N, phi=0.5)
    system = Trellis(model)
    first = system.op(w)
    pool = model.prefix_cache.pool
    second = system.op(w)  # nothing served from the first op's cached prefixes
    assert model.prefix_cache.pool is pool
    assert (second.fresh_blocks, second.leaves) == (first.fresh_blocks, first.leaves)
    assert system.ttft(w).hit_rate == w.shared / L  # only the warm prompt's prefix
    system.op(Workload(L=L + 32, D=D, N=N, phi=0.5))  # another geometry: a pool of its own size
    assert model.prefix_cache.pool.num_blocks == Workload(L=L + 32, D=D, N=N, phi=0.5).pool_blocks(SEED_BLOCK)


def test_transformers_generate_batch_shares_the_warm_prefix(model):
    w = Workload(L=L, D=D, N=N, phi=0.5)
    result = HFGenerateBatch(model).op(w)
    assert result.generated == N * D
    # Its warm-up decodes two tokens (see HFGenerateBatch), so it takes at most one block more.
    no_sharing = blocks(w.shared + 1) + N * blocks(L + D - 1)
    assert result.fresh_blocks < no_sharing
    assert HFGenerateBatch(model).ttft(w).hit_rate == w.shared / L


def test_a_prefix_of_any_length_is_hit_whole_by_trellis_and_in_whole_pages_by_transformers(model):
    """bench_ttft.py --granule 1: the probe leaves the warm prompt inside a block. Trellis serves
    every shared token (the block it leaves inside by copy); transformers' paged cache whole pages."""
    w = Workload(L=L, D=1, N=1, phi=0.5, granule=1)
    assert w.shared == 64 and Workload(L=L, D=1, N=1, phi=0.9, granule=1).shared == 115
    w = Workload(L=L, D=1, N=1, phi=0.9, granule=1)
    assert Trellis(model).ttft(w).hit_rate == 115 / L
    assert HFGenerateBatch(model).ttft(w).hit_rate == 96 / L


def test_the_chat_benchmark_times_each_system_over_its_own_next_turn(model):
    """bench_chat.py: Trellis' second turn reuses all its first turn computed (the prompt and the
    answer but its last token), as transformers continuing its returned cache does; plain
    ``generate()`` reuses nothing."""
    args = SimpleNamespace(quick=True, repeats=2, model="tiny", prompt=None, answer=None, message=None)
    result = bench_chat.run(model, args)
    rows = {row["system"]: row for row in result["rows"]}
    assert set(rows) == set(bench_chat.SYSTEMS) and all(len(row["ttft"]) == 2 for row in rows.values())
    s = result["settings"]
    assert rows["trellis"]["reused"] == rows["hf_generate_cache"]["reused"] == [s["prompt"] + s["answer"] - 1] * 2
    assert rows["hf_generate"]["reused"] == [0, 0]
    assert all(row["turn_tokens"] == [s["prompt"] + s["answer"] + s["message"]] * 2 for row in rows.values())
    assert "hf_generate_cache" in report.chat_table(result)


def test_transformers_generate_keeps_one_full_cache_per_session(model):
    w = Workload(L=L, D=D, N=N, phi=0.5)
    result = HFGenerate(model).op(w)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # K and V, fp32
    assert result.generated == N * D
    assert result.kv_bytes == N * (L + D - 1) * per_token
    assert HFGenerate(model).ttft(w).hit_rate == 0.0


def test_one_batched_generate_call_serves_every_session(model):
    w = Workload(L=L, D=D, N=N, phi=0.5)
    result = HFGenerateBatched(model).op(w)
    single = HFGenerate(model).op(w)
    assert result.generated == single.generated == N * D
    assert result.kv_bytes == single.kv_bytes  # one cache of N rows: the same K/V as N caches of one
    # A one-request TTFT probe would be HFGenerate's call again.
    assert [s.name for s in systems(model, ttft=True)] == ["trellis", "hf_generate_batch", "hf_generate"]


def test_timed_regions_leave_out_the_peers_model_and_teardown(model, monkeypatch):
    """Making the peers' transformers model and stopping transformers' manager (a thread join and
    gc.collect()) happen outside every timed region."""
    events: list[str] = []
    plain_llama, stop = common.plain_llama, ContinuousBatchingManager.stop
    monkeypatch.setattr(common, "clock", lambda: events.append("clock") or time.perf_counter())
    monkeypatch.setattr(common, "plain_llama", lambda *args: events.append("model") or plain_llama(*args))
    monkeypatch.setattr(ContinuousBatchingManager, "stop",
                        lambda self, *args, **kwargs: events.append("stop") or stop(self, *args, **kwargs))
    for system in systems(model):
        events.clear()
        system.op(Workload(L=64, D=2, N=2, phi=0.5))
        first, last = events.index("clock"), len(events) - 1 - events[::-1].index("clock")
        assert not {"model", "stop"} & set(events[first:last]), (system.name, events)
        assert ("model" in events) == (system.name != "trellis"), system.name
        if isinstance(system, HFGenerateBatch):
            assert "stop" in events[last:]  # the patch sees the stop, after the clock


@pytest.mark.parametrize("kernel", ["packed", "onednn", "blas"])
def test_the_peers_run_transformers_own_model_over_the_same_weights(kernel):
    """Not TrellisLlama with another attention: none of Trellis' code (its linear kernels stream a
    decode step's rows under every kind), and its answers bit for bit those of a LlamaForCausalLM
    loaded with the same weights; the tensors shared where Trellis keeps them row-major."""
    ref, model = tiny_pair(config=tiny_config(vocab_size=30000))
    if kernel != "blas" and not cpu_linear.onednn_available():
        pytest.skip("oneDNN does not run here")
    model.set_linear_kernel(kernel)
    prompt = torch.tensor([Workload(L=64, D=2, N=1, phi=0.0).prompt(0)])
    with common.attention(model, "sdpa") as plain, torch.no_grad():
        assert type(plain) is LlamaForCausalLM and plain.config._attn_implementation == "sdpa"
        assert all(type(m) is torch.nn.Linear for m in plain.modules() if isinstance(m, torch.nn.Linear))
        assert torch.equal(plain(prompt).logits, ref(prompt).logits)
        assert torch.equal(plain.generate(prompt, max_new_tokens=4, do_sample=False),
                           ref.generate(prompt, max_new_tokens=4, do_sample=False))
        weight, own = plain.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
        assert (weight.data_ptr() == own.data_ptr()) == own.is_contiguous()
    assert model.linear_kernel == kernel and model.config._attn_implementation == "trellis"


def test_allocations_are_counted_for_every_system(model):
    w = Workload(L=L, D=2, N=2, phi=0.5)
    for system in systems(model):
        tally = system.allocations(w)
        assert tally.count > 0 and tally.bytes > 0, system.name


@pytest.mark.parametrize("config", [bench_kernels.Config("SmolLM2", 2, 96, 1), bench_kernels.Config("SmolLM2", 2, 96, 32),
                                    bench_kernels.Config("TinyLlama", 3, 70, 5)], ids=str)
def test_kernel_baselines_compute_paged_attention(config):
    """Every SDPA baseline of bench_kernels computes the paged reference's attention (in its own layout)."""
    torch.manual_seed(0)
    problem = bench_kernels.make_problem(config, torch.float32, torch.device("cpu"))
    expected = bench_kernels.paged(problem, config, "reference")()  # [T, Hq, D]
    num_q_heads, num_kv_heads, head_dim = bench_kernels.MODELS[config.model]
    b, q, t, groups = config.batch, config.new_tokens, config.batch * config.new_tokens, num_q_heads // num_kv_heads
    as_tokens = {
        "gather+sdpa": lambda o: o.transpose(1, 2).reshape(t, num_q_heads, head_dim),  # [B, Hq, Q, D]
        "sdpa": lambda o: o.reshape(t, num_q_heads, head_dim),  # transformers returns [B, Q, Hq, D]
        "sdpa fold": lambda o: o.view(b, num_kv_heads, groups, q, head_dim).permute(0, 3, 1, 2, 4)
        .reshape(t, num_q_heads, head_dim),  # [B, Hkv, G·Q, D]
    }
    methods = bench_kernels.baselines(torch.device("cpu"), torch.float32)
    assert methods.keys() == as_tokens.keys()
    for name, make in methods.items():
        torch.testing.assert_close(as_tokens[name](make(problem, config)()), expected, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_batched_eval_peers_score_as_the_unbatched_one():
    """bench_eval's batched forward (sorted, right-padded) and lm-eval's HF backend at batch_size > 1
    give the per-request forward's log-likelihoods and greedy flags."""
    ref = tiny_pair(config=tiny_config(vocab_size=49152, max_position_embeddings=1024))[0]
    tokenizer = smollm2_tokenizer()
    requests = choice_requests(read_questions(DATA / "reading_mc.jsonl")[:2])
    requests += choice_requests(read_questions(DATA / "trivia_mc.jsonl")[:2])  # shorter contexts: real padding
    counter = [0]
    expected = plain_backend(ref, tokenizer, counter)(requests)
    unpadded = counter[0]
    counter[0] = 0
    peers = {"plain-batched": plain_batched_backend(ref, tokenizer, counter, batch_size=3)}
    installed("lm_eval")
    peers["lm-eval-hf-batched"] = lm_eval_backend(ref, tokenizer, [0], batch_size=3)
    for name, run in peers.items():
        scores = run(requests)
        assert [greedy for _, greedy in scores] == [greedy for _, greedy in expected], name
        torch.testing.assert_close([ll for ll, _ in scores], [ll for ll, _ in expected], atol=1e-4, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert counter[0] >= unpadded  # padded batches count their padding as computed


def test_shared_decode_sets_differ_in_sharing_alone(model):
    """The two sets of bench_shared_decode: the same lengths and tails; one prefix for all, or each
    its own, none sharing a first block with another; and the engine serves both."""
    shared, own = (bench_shared_decode.prompts(4, 256, same) for same in (True, False))
    prefix = Workload(L=256, D=1, N=4, phi=bench_shared_decode.PHI).shared
    assert prefix == 224 and [len(p) for p in shared + own] == [256] * 8
    assert all(a[prefix:] == b[prefix:] for a, b in zip(shared, own))
    assert len({tuple(p[:prefix]) for p in shared}) == 1
    assert len({tuple(p[:SEED_BLOCK]) for p in own + shared[:1]}) == 5
    engine = bench_shared_decode.Engine(model)
    assert bench_shared_decode.step_ms(engine, shared, 3) > 0 and bench_shared_decode.step_ms(engine, own, 3) > 0


def test_amd_core_generation_from_family_and_model():
    # Cloud guests report "AMD EPYC" alone; the results must tell Zen 4 from Zen 5 apart.
    assert common._amd_core(0x1A, 0x02) == "Zen 5"
    assert common._amd_core(0x19, 0x11) == "Zen 4"  # Genoa
    assert common._amd_core(0x19, 0xA0) == "Zen 4"  # Bergamo
    assert common._amd_core(0x19, 0x01) == "Zen 3"  # Milan
    assert common._amd_core(0x17, 0x31) == "Zen 2"  # Rome
    assert common._amd_core(0x15, 0x02) is None


def test_results_and_docs_do_not_make_the_commit_dirty(tmp_path, monkeypatch):
    """A benchmark that follows another in one sitting (which rewrote its results file) names the
    commit alone; a change to code names it ``+dirty``."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    for path in ("trellis/engine.py", "benchmarks/results/cpu/run.json", "docs/notes.md", "README.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("first\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.delenv("TRELLIS_COMMIT", raising=False)
    for path in ("benchmarks/results/cpu/run.json", "docs/notes.md", "README.md"):
        (tmp_path / path).write_text("rewritten\n")
    head = common.trellis_commit()
    assert head is not None and len(head) == 40
    (tmp_path / "trellis/engine.py").write_text("changed\n")
    assert common.trellis_commit() == head + "+dirty"


@pytest.mark.parametrize("script", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py")))
def test_every_benchmark_takes_its_options(script, monkeypatch, capsys):
    """Each benchmark's parser builds (options it adds itself and the shared ones do not collide)."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_the_seed_suite_gives_each_figure_what_its_benchmark_reads(tmp_path, monkeypatch):
    """bench_prefix runs three benchmarks on the shared options alone: each figure's arguments carry
    the options only its benchmark adds (it crashed at the first: no ``phis``), and with ``--json``
    its files go beside that file rather than over the committed results."""
    bench_prefix = importlib.import_module("bench_prefix")
    monkeypatch.setattr(sys, "argv", ["bench_prefix.py", "--quick", "--json", str(tmp_path / "suite.json")])
    args = common.parser(bench_prefix.__doc__).parse_args()
    for stem, bench in bench_prefix.FIGURES:
        figure = bench_prefix.figure_arguments(args, stem)
        assert figure.json == tmp_path / f"suite_{stem}.json" and figure.plot is None
        assert figure.phis is None and figure.granule == common.SEED_BLOCK
        if hasattr(bench, "settings"):
            assert bench.settings(figure)["phis"] == [0.0, 0.5, 0.9]
    assert bench_prefix.figure_arguments(common.parser("").parse_args([]), "ttft").json is None  # the default files


def test_results_without_a_table_of_their_own_are_listed_with_the_pages_quoting_them():
    """Every results file reaches results.md: a kind the report has no table for (bench_serve's,
    bench_grid's) is listed with the docs pages that render it, not taken for the N=4 targets."""
    assert report.kind_of({"environment": {}, "runs": []}) == "elsewhere"
    assert report.kind_of({"info": {}, "targets": []}) == "targets"
    assert report.quoted_in(report.RESULTS / "serve.json") == "[serving.md](serving.md)"
    assert "- [`serve.json`](../benchmarks/results/serve.json): [serving.md](serving.md)" in report.machine_section(
        report.RESULTS)


@pytest.mark.parametrize(("script", "option"), [("bench_step", ["--dtype", "bfloat16"]), ("bench_quant", ["--model", "tinyllama"]),
                                                ("bench_bf16_parity", ["--quick"]), ("bench_decode", ["--plot", "x.png"])])
def test_shared_options_a_benchmark_does_not_read_are_refused(script, option, monkeypatch, capsys):
    """A run asked for bf16, another model or a figure must not quietly measure or draw something else."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *option])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2 and f"{option[0]}: not used by this benchmark" in capsys.readouterr().err
