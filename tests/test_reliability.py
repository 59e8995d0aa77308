"""Memory pressure, bad input, threads, and random interleavings: caching never changes an answer."""

import json
import random
import threading

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from tests.models import smollm2_dir, tiny_config, tiny_pair
from tests.test_radix import make_manager
from trellis.cache.block_pool import OutOfBlocksError
from trellis.models.embedded import embedded_gguf_path
from trellis.models.llama import TrellisLlama
from trellis.models.loading import check_one_device

SYSTEMS = [torch.arange(3, 3 + n) for n in (13, 22)]


def session_prompt(i: int) -> torch.Tensor:
    suffix = torch.randint(40, 250, (3 + i % 5,), generator=torch.Generator().manual_seed(i))
    return torch.cat([SYSTEMS[i % 2], suffix])[None]


def test_stream_under_memory_pressure_matches_transformers():
    ref, model = tiny_pair(num_blocks=24)  # 96 tokens: room for about three sessions' worth of prefixes
    for i in range(14):
        ids = session_prompt(i)
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert torch.equal(got, ref.generate(ids, max_new_tokens=6, do_sample=False)), f"session {i}"
        model.prefix_cache.check_integrity()
    stats = model.prefix_cache.stats()
    assert stats["evicted_blocks"] > 0 and stats["hit_tokens"] > 0


def test_prompt_plus_new_tokens_beyond_the_positions_is_refused():
    ref, model = tiny_pair(config=tiny_config(max_position_embeddings=32))
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        model.generate(torch.arange(3, 23)[None], max_new_tokens=20)
    with pytest.raises(ValueError, match="exceeds the model's 32 positions"):
        model(torch.arange(3, 40)[None])
    assert model.prefix_cache.stats()["live_sessions"] == 0
    ids = torch.arange(3, 23)[None]
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                       ref.generate(ids, max_new_tokens=8, do_sample=False))


def test_caller_tensors_of_the_wrong_kind_are_refused():
    _, model = tiny_pair()
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.ones(1, 4))
    with pytest.raises(ValueError, match="does not cover the input"):
        model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
    model.prefix_cache.check_integrity()


def test_missing_gguf_and_non_llama_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        TrellisLlama.from_pretrained(smollm2_dir(), gguf_file="nope.gguf", device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ValueError, match="holds a 'gpt2' model; TrellisLlama serves Llama-architecture models only"):
        TrellisLlama.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="garbage.gguf"):
        TrellisLlama.from_pretrained(tmp_path, gguf_file="garbage.gguf", device="cpu")
    data = embedded_gguf_path().read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) * 9 // 10])  # the header whole, the tensors cut
    with pytest.raises(ValueError, match=r"cannot read the GGUF file .*cut.gguf \(truncated, damaged or not a GGUF"):
        TrellisLlama.from_pretrained(tmp_path, gguf_file="cut.gguf", device="cpu")
    (tmp_path / "notes.gguf").write_text("a text file, not a model\n")
    with pytest.raises(ValueError, match=r"cannot read the GGUF file .*notes.gguf \(truncated, damaged or not a GGUF"):
        TrellisLlama.from_pretrained(tmp_path, gguf_file="notes.gguf", device="cpu")


def test_config_overrides_as_keyword_arguments_apply_as_in_transformers(tmp_path):
    ref, _ = tiny_pair()
    ref.save_pretrained(tmp_path)
    prompt = torch.tensor([[2, 17, 33, 45, 99, 100, 7]])
    plain = LlamaForCausalLM.from_pretrained(tmp_path, rms_norm_eps=0.5, attn_implementation="sdpa")
    model = TrellisLlama.from_pretrained(tmp_path, rms_norm_eps=0.5, device="cpu")
    assert model.config.rms_norm_eps == plain.config.rms_norm_eps == 0.5
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, plain(prompt).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="not_a_field"):  # neither a loading argument nor a config field
        TrellisLlama.from_pretrained(tmp_path, not_a_field=1, device="cpu")


def test_a_sliding_window_config_is_refused(tmp_path):
    """transformers' generate() keeps a window of K/V for it (its forward without a cache does
    not); Trellis attends to every token, so it refuses rather than answer otherwise."""
    config = tiny_config(sliding_window=8)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sliding_window=8: transformers' generate"):
        TrellisLlama.from_pretrained(tmp_path, device="cpu")
    with pytest.raises(ValueError, match="sliding_window=8"):
        TrellisLlama._from_config(config)
    with pytest.raises(ValueError, match="layer_types include sliding_attention"):
        TrellisLlama._from_config(tiny_config(layer_types=["full_attention", "sliding_attention"]))
    assert TrellisLlama.from_pretrained(tmp_path, sliding_window=None, device="cpu").config.sliding_window is None


def test_a_checkpoint_missing_weights_is_refused(tmp_path):
    """transformers would load it with those weights random, and answer nonsense."""
    _, model = tiny_pair()
    model.save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights of the model \(e.g. model.layers.1.mlp.up_proj.weight\)"):
        TrellisLlama.from_pretrained(tmp_path, device="cpu")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated: an OSError naming the place
    with pytest.raises(OSError, match=f"cannot read the weights in {tmp_path}"):
        TrellisLlama.from_pretrained(tmp_path, device="cpu")


def test_attention_kernels_that_cannot_take_the_dtype_are_refused_at_load(tmp_path):
    _, model = tiny_pair()
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="the cpp kernels take float32, float16 and bfloat16, not float64"):
        TrellisLlama.from_pretrained(tmp_path, device="cpu", backend="cpp", dtype=torch.float64)
    assert TrellisLlama.from_pretrained(tmp_path, device="cpu", dtype=torch.float64).attention_backend() == "reference"
    if not torch.cuda.is_available():  # refused before the weights load
        with pytest.raises(ValueError, match="device 'cuda' is not available here"):
            TrellisLlama.from_pretrained(tmp_path, device="cuda")
    with pytest.raises(ValueError, match="device 'meta' holds no weights or K/V to compute with"):
        TrellisLlama.from_pretrained(tmp_path, device="meta")
    for keep_quantized in ("yes", "no", 1, None):  # a string "no" would have been true
        with pytest.raises(TypeError, match=f"keep_quantized must be True or False, got {keep_quantized!r}"):
            TrellisLlama.from_pretrained(tmp_path, device="cpu", keep_quantized=keep_quantized)


def test_a_cuda_device_index_the_machine_lacks_is_refused_before_the_weights_load(monkeypatch):
    from trellis.models import loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert loading.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="device 'cuda:2' is not available here: this machine has 2 CUDA devices"):
        loading.resolve_device("cuda:2")


def test_a_device_map_over_several_devices_is_refused_at_load(tmp_path):
    """The KV pool lives on the model's one device: layers placed elsewhere (another GPU, the CPU
    beside a GPU, or disk) would fail at their first forward, so such a map is refused by name."""
    _, model = tiny_pair()
    model.save_pretrained(tmp_path / "model")
    split = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
             "lm_head": "disk"}
    with pytest.raises(ValueError, match=r"places the model on cpu and disk \(cpu: model.embed_tokens, model.layers, "
                                         r"model.norm, ...; disk: lm_head\)"):
        TrellisLlama.from_pretrained(tmp_path / "model", device_map=split)
    with pytest.raises(ValueError, match="places the model on cpu and disk"):  # "auto" placed it so
        TrellisLlama.from_pretrained(tmp_path / "model", device_map="auto", max_memory={"cpu": 300_000},
                                     offload_folder=tmp_path / "offload")
    one = TrellisLlama.from_pretrained(tmp_path / "model", device_map={"": "cpu"})
    assert one.device == torch.device("cpu")
    check_one_device({"model": 0, "lm_head": "cuda:0"})  # one GPU, as accelerate reads a bare index
    check_one_device({"model": torch.device("cpu"), "lm_head": "cpu"})
    with pytest.raises(ValueError, match="on cuda:0 and cuda:1"):
        check_one_device({"model": 0, "lm_head": "cuda:1"})


def test_threads_get_the_same_answers_as_sequential_calls():
    _, model = tiny_pair()
    prompts = [session_prompt(i) for i in range(8)]
    sequential = [model.generate(p, max_new_tokens=6, do_sample=False) for p in prompts]
    model.prefix_cache.reset()
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = model.generate(prompts[i], max_new_tokens=6, do_sample=False)
        except BaseException as exc:  # noqa: BLE001 -- surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(8):
        assert torch.equal(results[i], sequential[i])
    model.prefix_cache.check_integrity()


def test_threads_arriving_together_share_one_cache():
    _, model = tiny_pair()
    barrier = threading.Barrier(8)
    seen: list = []

    def worker() -> None:
        barrier.wait()
        seen.append(model.prefix_cache)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and all(cache is seen[0] for cache in seen)


def test_soak_ten_thousand_random_cache_operations():
    rng = random.Random(0)
    m = make_manager(num_blocks=64)
    live = []
    for step in range(10_000):
        op = rng.random()
        try:
            if op < 0.35 or not live:
                prefix = [rng.randrange(3)] * rng.randrange(0, 20)
                seq = m.admit(prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 10))])
                m.mark_computed(seq)
                live.append(seq)
            elif op < 0.65:
                seq = rng.choice(live)
                m.append(seq, [rng.randrange(50) for _ in range(rng.randrange(1, 6))])
                m.mark_computed(seq)
            elif op < 0.9:
                m.release(live.pop(rng.randrange(len(live))), commit=rng.random() < 0.8)
            elif op < 0.97:
                m.radix.evict(rng.randrange(1, 6))
            else:
                m.reset()
        except OutOfBlocksError:
            m.release(live.pop(0))
        if step % 1000 == 0:
            m.check_integrity()
    for seq in live:
        m.release(seq)
    m.check_integrity()
    stats = m.stats()
    assert m.pool.num_free + stats["cached_blocks"] + stats["tail_blocks"] == m.pool.num_blocks  # nothing leaked


def step(model, ids, **kwargs):
    """Logits and cache handle of one forward, holding no other reference to its output."""
    out = model(ids, **kwargs)
    return out.logits, out.past_key_values


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["admit", "extend", "finish", "abort"]), st.integers(0, 7)),
                min_size=4, max_size=16))
def test_random_interleavings_match_a_cache_free_run(ops):
    """Sessions admitted, extended token by token, finished or abandoned in random order; every
    logit row equals plain transformers over the session's whole token sequence."""
    ref, model = tiny_pair(num_blocks=40)
    live: list[tuple[torch.Tensor, object]] = []  # (tokens so far, past_key_values)
    with torch.no_grad():
        for op, arg in ops:
            if op == "admit" or not live:
                ids = session_prompt(arg)
                try:
                    logits, cache = step(model, ids, logits_to_keep=1)
                except OutOfBlocksError:
                    continue
                torch.testing.assert_close(logits[:, -1], ref(ids).logits[:, -1], atol=1e-4, rtol=0)
                live.append((ids, cache))
            elif op == "extend":
                k = arg % len(live)
                ids, cache = live[k]
                nxt = torch.tensor([[40 + arg]])
                try:
                    logits = step(model, nxt, past_key_values=cache)[0]
                except OutOfBlocksError:
                    continue
                ids = torch.cat([ids, nxt], dim=1)
                torch.testing.assert_close(logits[:, -1], ref(ids).logits[:, -1], atol=1e-4, rtol=0)
                live[k] = (ids, cache)
            elif op == "finish":
                live.pop(arg % len(live))[1].release()
            else:  # abandoned: the handle is dropped and released when garbage collected
                live.pop(arg % len(live))
            cache = None  # keep no local reference: an abandoned handle must become unreachable
            model.prefix_cache.check_integrity()
    for _, cache in live:
        cache.release()
    model.prefix_cache.check_integrity()
    assert model.prefix_cache.stats()["live_sessions"] == 0
