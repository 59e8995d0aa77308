"""Decode steps replayed from CUDA graphs (trellis/runner/cuda_graphs.py) give the eager steps'
results, bit for bit; only steps a graph reproduces replay; graphs go with the pool and the verdict
they were made under.

On a CUDA device the graphs are real (fp32 and bf16). Without one, the Triton kernels run in the
interpreter and a graph is a recording that replays by running the captured step again: over the
static buffers, so a step whose inputs were not copied in replays the last step's inputs, and the
results differ from the eager ones.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.models import tiny_config, tiny_pair
from trellis.engine import Engine, SamplingParams
from trellis.models.llama import TrellisLlama
from trellis.runner import cuda_graphs

CUDA = torch.cuda.is_available()


class Recorder:
    """A stand-in for ``capture_cuda_graph`` off CUDA: runs the step once (the warm-up the real
    capture makes), and replays it by running it again."""

    def __init__(self) -> None:
        self.captured = 0
        self.replayed = 0

    def __call__(self, step: Callable[[], None], device: torch.device, memory_pool: object) -> Callable[[], None]:
        step()
        self.captured += 1

        def replay() -> None:
            self.replayed += 1
            step()

        return replay


@pytest.fixture
def recorder(monkeypatch) -> Recorder | None:
    """Off CUDA, graphs on the CPU are the recorder; on CUDA, None (real graphs)."""
    if CUDA:
        return None
    recording = Recorder()
    monkeypatch.setattr(cuda_graphs, "capture_on", lambda device: recording)
    return recording


def model_on(dtype: torch.dtype = torch.float32, **config) -> TrellisLlama:
    _, model = tiny_pair(config=tiny_config(**config), backend="triton")
    model = model.to("cuda" if CUDA else "cpu", dtype)
    # transformers' decoder forward, as on CUDA (on the CPU the lean path would run the eager steps)
    model.runner.use_lean_decoder = False
    return model


def generate(model: TrellisLlama, prompts: list[list[int]], max_new_tokens: list[int], graphs: bool,
             reset: bool = True) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and their log-probabilities of sessions decoded together by the engine, with
    graphs on or off; the cache emptied first (``reset``), so that each run computes the same steps."""
    model.runner.use_cuda_graphs = graphs
    if reset:
        model.prefix_cache.reset()
    engine = Engine(model)
    sessions = [engine.add(p, SamplingParams(max_new_tokens=n, logprobs=0)) for p, n in zip(prompts, max_new_tokens)]
    engine.run()
    return [s.generated for s in sessions], [s.logprobs for s in sessions]


def prompts(count: int, length: int, vocab: int = 256) -> list[list[int]]:
    g = torch.Generator().manual_seed(count * 1000 + length)
    return [torch.randint(3, vocab, (length + i,), generator=g).tolist() for i in range(count)]


DTYPES = [torch.float32, *([torch.bfloat16] if CUDA else [])]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_replayed_decode_steps_give_the_eager_results(recorder, dtype):
    """Three sessions of different lengths, finishing at different steps (3, 2, then 1 sequences a
    step: a graph for each), with graphs on and off: the same tokens and log-probabilities."""
    model = model_on(dtype)
    batch, lengths = prompts(3, 9), [2, 3, 4]
    eager = generate(model, batch, lengths, graphs=False)
    assert model.runner._decode_graphs is None
    replayed = generate(model, batch, lengths, graphs=True)
    assert replayed == eager
    graphs = model.runner._decode_graphs
    assert graphs is not None and graphs.captures == 3  # one shape each: 3, 2 and 1 sequences
    if recorder is not None:
        assert recorder.captured == 3 and recorder.replayed == max(lengths) - 1  # every decode step
    # Other prompts of the same lengths, nothing cached for them: the same graphs replay, nothing is captured.
    other = [[t + 1 for t in p] for p in batch]
    replayed = generate(model, other, lengths, graphs=True, reset=False)
    assert model.runner._decode_graphs is graphs and graphs.captures == 3
    assert replayed == generate(model, other, lengths, graphs=False)


def test_only_decode_steps_replay(recorder):
    """Prefills (several new tokens per sequence), steps asking for hidden states and forwards
    under gradients run eagerly; a sequence wider than the graphs' block table too."""
    model = model_on()
    ids = torch.tensor(prompts(1, 12), device=model.device)
    with torch.no_grad():
        out = model(ids, use_cache=True)  # a prefill
        assert model.runner._decode_graphs is None
        cache = out.past_key_values
        step = ids.new_tensor([[int(out.logits[0, -1].argmax())]])
        model(step, past_key_values=cache, output_hidden_states=True)
        assert model.runner._decode_graphs is None
        model(step, past_key_values=cache)  # a plain decode step: replayed
        graphs = model.runner._decode_graphs
        assert graphs is not None and graphs.captures == 1
        replays = recorder.replayed if recorder else None
        graphs.max_blocks = 1  # (the sequence's 14 tokens take 4 blocks of 4)
        model(step, past_key_values=cache)
        assert graphs.captures == 1 and (recorder is None or recorder.replayed == replays)
    model.requires_grad_(False)
    with torch.enable_grad():  # (gradients enabled, though nothing requires them: eager all the same)
        graphs.max_blocks = 64
        model(step, past_key_values=cache)
    assert graphs.captures == 1 and (recorder is None or recorder.replayed == replays)


def test_graphs_follow_the_decoder_and_the_pool(recorder):
    """A hook set on a layer: every step runs eagerly (the hook would not run on replay), the hook
    called each time. Fewer layers (an early-exit drafter's forward): graphs of that depth beside the
    others, the eager results at each depth. A reset of the cache or new cache settings drop the graphs."""
    model = model_on()
    batch, lengths = prompts(2, 7), [3, 3]
    eager = generate(model, batch, lengths, graphs=False)
    calls = []
    handle = model.model.layers[1].register_forward_hook(lambda *args: calls.append(1))
    assert generate(model, batch, lengths, graphs=True) == eager
    assert model.runner._decode_graphs is None and len(calls) == 3  # a prefill and two decode steps
    handle.remove()

    model.config.num_hidden_layers = 1
    shallow = generate(model, batch, lengths, graphs=False)
    assert generate(model, batch, lengths, graphs=True) == shallow != eager
    graphs = model.runner._decode_graphs
    model.config.num_hidden_layers = 2  # (nothing cached: a forward over fewer layers caches nothing)
    assert generate(model, batch, lengths, graphs=True, reset=False) == eager  # the same graphs, one more shape
    assert model.runner._decode_graphs is graphs and graphs.captures == 2
    model.config.num_hidden_layers = 1  # (an early-exit drafter's rounds alternate the depths)
    assert generate(model, batch, lengths, graphs=True, reset=False)[0] == shallow[0]  # (over cached prompts)
    assert model.runner._decode_graphs is graphs and graphs.captures == 2  # replayed, not captured again
    model.config.num_hidden_layers = 2

    model.prefix_cache.reset()
    assert model.runner._decode_graphs is None
    generate(model, batch, lengths, graphs=True)
    model.configure_cache(block_size=8, num_blocks=64, backend="triton")
    assert model.runner._decode_graphs is None
    assert generate(model, batch, lengths, graphs=True)[0] == eager[0]


def test_host_rope_runs_eagerly(recorder):
    """Dynamic RoPE scaling updates its frequencies from the positions on the host: never replayed."""
    model = model_on(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    assert cuda_graphs.host_rope(model)
    eager = generate(model, prompts(2, 6), [4, 4], graphs=False)
    assert generate(model, prompts(2, 6), [4, 4], graphs=True) == eager
    assert model.runner._decode_graphs is None


def test_a_failed_capture_runs_the_steps_eagerly(monkeypatch):
    """A step that cannot be captured (an op reading the device back, say): a warning naming the
    cause, the step and every later one eager, with the eager results; no capture tried again."""
    tries = []

    def failing(step, device, memory_pool):
        step()  # the warm-up ran (and wrote the step's K/V) before the capture failed
        tries.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "capture_on", lambda device: failing)
    model = model_on()
    batch, lengths = prompts(2, 7), [5, 5]
    eager = generate(model, batch, lengths, graphs=False)
    with pytest.warns(UserWarning, match="without CUDA graphs.*not permitted when stream is capturing"):
        assert generate(model, batch, lengths, graphs=True) == eager
    assert len(tries) == 1 and model.runner._decode_graphs.failure.startswith("RuntimeError")


def test_early_exit_drafting_gives_the_eager_tokens(recorder):
    """``assistant_early_exit`` drafts over the first layer and verifies over all three, round after
    round (``config.num_hidden_layers`` alternating): the eager tokens, and a graph only for a step
    of one token a sequence (the last one here: a random model's unsure drafts stop at one token,
    whose drafting and verifying forwards take two)."""
    model = model_on(num_hidden_layers=3)
    ids = torch.tensor(prompts(1, 10), device=model.device)
    with torch.no_grad():
        model.runner.use_cuda_graphs = False
        eager = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_early_exit=1)
        model.prefix_cache.reset()
        model.runner.use_cuda_graphs = True
        replayed = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_early_exit=1)
    assert torch.equal(replayed, eager)
    graphs = model.runner._decode_graphs
    assert graphs is not None and graphs.captures == 1


def test_graphs_made_under_inference_mode_serve_outside_it(recorder):
    """The first decode steps under ``torch.inference_mode()`` make the graphs and their buffers;
    steps outside it (``generate()``'s own no_grad) replay them, with the same tokens."""
    model = model_on()
    model.runner.use_cuda_graphs = True
    ids = torch.tensor(prompts(1, 10), device=model.device)
    with torch.inference_mode():
        inside = model.generate(ids, max_new_tokens=5, do_sample=False)
    graphs = model.runner._decode_graphs
    assert graphs is not None and graphs.captures == 1
    model.prefix_cache.check_integrity()
    outside = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(outside, inside) and model.runner._decode_graphs is graphs


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphs_replay_on_their_device_whichever_is_current():
    """A model on cuda:1 while cuda:0 is current captures and replays its graphs on cuda:1."""
    _, model = tiny_pair(backend="triton")
    model = model.to("cuda:1")
    model.runner.use_lean_decoder = False
    batch, lengths = prompts(2, 7), [5, 5]
    with torch.cuda.device(0):
        eager = generate(model, batch, lengths, graphs=False)
        assert generate(model, batch, lengths, graphs=True) == eager
    assert model.runner._decode_graphs.captures == 1


def test_the_least_recently_replayed_graph_goes_first(recorder):
    """At most ``max_graphs`` graphs are kept: a shape whose graph was dropped is captured again,
    with the eager results."""
    model = model_on()
    one, two = prompts(1, 7), prompts(2, 7)
    eager_one, eager_two = (generate(model, p, [4] * len(p), graphs=False) for p in (one, two))
    assert generate(model, one, [4], graphs=True) == eager_one
    graphs = model.runner._decode_graphs
    graphs.max_graphs = 1
    assert generate(model, two, [4, 4], graphs=True, reset=False) == eager_two  # one sequence's graph dropped
    assert generate(model, one, [4], graphs=True, reset=False)[0] == eager_one[0]  # captured again
    assert model.runner._decode_graphs is graphs and graphs.captures == 3 and len(graphs._replays) == 1
