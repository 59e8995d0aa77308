"""The lean decoder path (trellis/runner/decoder.py) against transformers and against the fallback
(transformers' own decoder forward, ``runner.use_lean_decoder = False``): same greedy tokens, logits
within fp32 tolerance, cache hits; in fp32 the fallback's logits bit for bit; and the fallback
wherever the lean path could not reproduce transformers (hooks, adapters, another activation,
gradients, hidden states)."""

import contextlib
import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from unittest import mock

import gguf
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tests.conftest import installed
from tests.models import smollm2_reference, smollm2_trellis, tiny_config, tiny_pair
from trellis import ops
from trellis.models.llama import TrellisLlama
from trellis.ops import quant
from trellis.runner import cpu_linear
from trellis.runner.cpu_linear import onednn_dtypes
from trellis.runner.decoder import LINEAR, ONEDNN, LeanDecoder
from trellis.runner.quantized_linear import QuantizedLinear

ATOL = 1e-4


def prompt(seed: int, n: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def lean_steps(model: TrellisLlama) -> Iterator[list[bool]]:
    """Records, for each decoder call, whether the lean path ran it."""
    lean, ran = model.runner.lean, []
    run = lean.run

    def recording(*args, **kwargs):
        hidden = run(*args, **kwargs)
        ran.append(hidden is not None)
        return hidden

    lean.run = recording
    try:
        yield ran
    finally:
        del lean.run


@contextlib.contextmanager
def fallback(model: TrellisLlama) -> Iterator[None]:
    model.runner.use_lean_decoder = False
    try:
        yield
    finally:
        model.runner.use_lean_decoder = True


def test_tiny_matches_transformers_and_the_fallback_with_cache_hits():
    ref, model = tiny_pair()
    system = prompt(0, 21)
    with torch.no_grad(), lean_steps(model) as ran:
        for q in range(3):
            ids = torch.cat([system, prompt(10 + q, 6)], dim=1)
            hits = model.prefix_cache.stats()["hit_tokens"]
            got = model(ids, logits_to_keep=2).logits
            if q > 0:
                assert model.prefix_cache.stats()["hit_tokens"] - hits == 21  # 5 full blocks of 4, the 21st token copied
            torch.testing.assert_close(got, ref(ids).logits[:, -2:], atol=ATOL, rtol=0)
            with fallback(model):  # over K/V the lean path cached: matmuls of other row counts
                torch.testing.assert_close(got, model(ids, logits_to_keep=2).logits, atol=1e-5, rtol=0)
            assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False),
                               ref.generate(ids, max_new_tokens=10, do_sample=False))
    assert ran and all(ran)
    assert model.runner.lean.checks == 1  # the verdict is cached
    model.prefix_cache.check_integrity()


def test_padded_batch_and_inputs_embeds():
    ref, model = tiny_pair()
    ids = torch.cat([prompt(1, 9), prompt(2, 9)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    embeds = ref.model.embed_tokens(ids).detach()
    kept = embeds.clone()
    with torch.no_grad(), lean_steps(model) as ran:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, ref(inputs_embeds=embeds).logits, atol=ATOL,
                                   rtol=0)
    assert all(ran) and torch.equal(embeds, kept)  # the caller's embeddings are not the residual stream


@pytest.mark.parametrize("where", ["layer", "attention", "norm", "linear", "decoder"])
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_a_hook_falls_back_and_runs(where, kind):
    ref, model = tiny_pair()
    module = {"layer": model.model.layers[1], "attention": model.model.layers[0].self_attn,
              "norm": model.model.norm, "linear": model.model.layers[0].mlp.down_proj, "decoder": model.model}[where]
    calls = []
    def hook(*args) -> None:
        calls.append(1)

    ids = prompt(3, 12)
    with torch.no_grad(), lean_steps(model) as ran:
        model(ids)  # lean, and the verdict cached
        handle = module.register_forward_hook(hook) if kind == "forward" else module.register_forward_pre_hook(hook)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
        assert calls
        handle.remove()
        model(ids)
    assert ran == [True, False, True]


def test_a_global_hook_falls_back():
    _, model = tiny_pair()
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad(), lean_steps(model) as ran:
            model(prompt(3, 5))
    finally:
        handle.remove()
    assert ran == [False] and calls


def test_hidden_states_gradients_and_other_activations_fall_back():
    ref, model = tiny_pair()
    ids = prompt(4, 10)
    with lean_steps(model) as ran:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)  # installs transformers' capture hooks for good
            assert len(out.hidden_states) == 3
            model(ids)  # the (idle) capture hooks leave it lean
        model(ids).logits.sum().backward()  # records gradients: transformers' forward
    assert ran == [True, False]  # output_hidden_states never reached the lean path
    ref, model = tiny_pair(config=tiny_config(hidden_act="gelu"))
    with torch.no_grad(), lean_steps(model) as ran:
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
    assert ran == [False]


def test_replaced_modules_are_checked_again():
    ref, model = tiny_pair()
    ids = prompt(5, 8)
    with torch.no_grad(), lean_steps(model) as ran:
        model(ids)
        # A subclass of the norm: not what the lean path reproduces.
        model.model.layers[0].input_layernorm = type("MyNorm", (torch.nn.Module,), {
            "forward": lambda self, x: x})()
        model(ids)
        model.model.layers[0].input_layernorm = copy.deepcopy(ref.model.layers[0].input_layernorm)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
    assert ran == [True, False, True]


@pytest.mark.parametrize("converted", ["every norm", "the final norm"])
@pytest.mark.parametrize("warm", [False, True])
def test_norms_converted_alone_fall_back_as_transformers_runs_them(converted, warm):
    """Norms in another dtype than the residual stream (transformers' RMSNorm promotes): the fused
    ops take one dtype, so the lean path steps aside, also when the conversion comes after a
    forward (it judged on the first norm's dtype alone, then failed in add_rms_norm)."""
    ref, model = tiny_pair()
    ids = prompt(7, 9)
    with torch.no_grad(), lean_steps(model) as ran:
        if warm:
            model(ids)
        for m in (ref, model):
            norms = [mod for name, mod in m.named_modules() if name.endswith("norm")]
            for norm in norms if converted == "every norm" else [m.model.norm]:
                norm.to(torch.bfloat16)
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
        for m in (ref, model):
            m.float()
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
    assert ran == [True] * warm + [False, True]


@pytest.mark.parametrize("wrapper", ["lora", "parametrization"])
def test_a_wrapped_embedding_falls_back(wrapper):
    """An embedding that is not ``nn.Embedding`` as built (PEFT's LoRA on it, a parametrized weight)
    runs transformers' forward; its lack of a plain ``weight`` parameter must not fail the check."""
    ref, model = tiny_pair()
    ids = prompt(9, 9)
    if wrapper == "lora":
        peft = installed("peft")
        lora = peft.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False)
        torch.manual_seed(0)
        ref = peft.get_peft_model(ref, copy.deepcopy(lora))
        torch.manual_seed(0)
        model = peft.get_peft_model(model, copy.deepcopy(lora))
    else:
        class Scale(torch.nn.Module):
            def forward(self, weight: torch.Tensor) -> torch.Tensor:
                return weight * 1.5

        for m in (ref, model):
            torch.nn.utils.parametrize.register_parametrization(m.model.embed_tokens, "weight", Scale())
    with torch.no_grad(), lean_steps(model.get_base_model() if wrapper == "lora" else model) as ran:
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=ATOL, rtol=0)
    assert ran == [False]


def test_an_embedding_converted_alone_is_refused_by_name():
    """The KV cache takes the model's dtype, which is the embedding's (its first parameter's): K/V
    projections of another dtype are refused before anything runs (a kernel's dtype error before)."""
    _, model = tiny_pair()
    model.model.embed_tokens.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"compute K/V in torch.float32, but the model's dtype .* is torch.bfloat16"):
        model(prompt(8, 9))
    model.float()
    assert model(prompt(8, 9)).logits.dtype == torch.float32


def test_peft_adapters_fall_back():
    peft = installed("peft")
    ref, model = tiny_pair()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    tuned_ref = peft.get_peft_model(ref, copy.deepcopy(lora))
    torch.manual_seed(0)
    tuned = peft.get_peft_model(model, copy.deepcopy(lora))
    ids = prompt(6, 9)
    with torch.no_grad(), lean_steps(model) as ran:
        torch.testing.assert_close(tuned(ids).logits, tuned_ref(ids).logits, atol=ATOL, rtol=0)
    assert ran == [False]


def test_bf16_lean_matches_the_fallback():
    _, model = tiny_pair()
    model.to(torch.bfloat16)
    ids = prompt(7, 24)
    with torch.no_grad(), lean_steps(model) as ran:
        lean = model(ids).logits.float()
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        with fallback(model):
            transformers_path = model(ids).logits.float()
            assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
    # bf16 roundings of the RMSNorm differ now and then by one unit: a few units of the logits' scale
    torch.testing.assert_close(lean, transformers_path, atol=0.05 * transformers_path.abs().max().item(), rtol=0)
    assert ran[:2] == [True, True]


def test_smollm2_matches_transformers_and_the_fallback():
    ref, model = smollm2_reference(), smollm2_trellis(num_blocks=64)
    ids = torch.randint(3, 49152, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), lean_steps(model) as ran:
        got = model(ids, logits_to_keep=1).logits
        torch.testing.assert_close(got, ref(ids).logits[:, -1:], atol=2e-4, rtol=0)
        model.prefix_cache.reset()  # the same computation from an empty cache: the same matmuls
        with fallback(model):
            assert torch.equal(got, model(ids, logits_to_keep=1).logits)  # fp32: transformers' forward, bit for bit
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                           ref.generate(ids, max_new_tokens=8, do_sample=False))
    assert all(ran)


def test_smollm2_keep_quantized_lean_matches_the_fallback():
    model = TrellisLlama.from_pretrained(keep_quantized=True, device="cpu", num_blocks=64)
    ids = torch.randint(3, 49152, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), lean_steps(model) as ran:
        got = model(ids, logits_to_keep=1).logits
        tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
        with fallback(model):
            torch.testing.assert_close(got, model(ids, logits_to_keep=1).logits, atol=1e-4, rtol=0)
            assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), tokens)
    assert ran[0]


@contextlib.contextmanager
def group_calls(monkeypatch) -> Iterator[list[tuple[int, int, str]]]:
    """Records each ``quant_linear_group`` call of the lean path as (rows of x, number of weights,
    qtype), and each ``panel_linear_group`` call as (rows, number of weights, ``"panels"``), those
    of the layer loop in C++ (``decoder_layers``, four groups a layer: q/k/v, o, gate/up, down) too."""
    calls, decoder_ops, compiled = [], ops.decoder_ops, LeanDecoder._cpp_loop_arguments

    def recording_ops(backend: str) -> ops.DecoderOps:
        bound = decoder_ops(backend)

        def group(x, weights, qtype, quantize_x=False):
            calls.append((x.shape[0], len(weights), qtype + ("@q8" if quantize_x else "")))
            return bound.quant_linear_group(x, weights, qtype, quantize_x)

        def panel_group(x, panels, out_features):
            calls.append((x.shape[0], len(panels), "panels"))
            return bound.panel_linear_group(x, panels, out_features)

        return dataclasses.replace(bound, quant_linear_group=group, panel_linear_group=panel_group)

    def recording_compiled(self, hidden, *args):
        arguments = compiled(self, hidden, *args)
        if arguments is not None:
            kinds = arguments[14]
            calls.extend((hidden.shape[0], width, kind) for kind, width in zip(kinds, itertools.cycle((3, 1, 2, 1))))
        return arguments

    monkeypatch.setattr(ops, "decoder_ops", recording_ops)
    monkeypatch.setattr(LeanDecoder, "_cpp_loop_arguments", recording_compiled)
    yield calls


@contextlib.contextmanager
def layer_loops(monkeypatch) -> Iterator[list[str]]:
    """Records where each lean forward ran its layer loop: ``"cpp"`` (``decoder_layers``) or ``"python"``."""
    loops, compiled, run = [], LeanDecoder._cpp_loop_arguments, LeanDecoder.run

    def recording_compiled(self, *args):
        arguments = compiled(self, *args)
        loops[-1] = "python" if arguments is None else "cpp"
        return arguments

    def recording_run(self, *args, **kwargs):
        loops.append("python")  # unless the C++ loop's arguments were found
        return run(self, *args, **kwargs)

    monkeypatch.setattr(LeanDecoder, "_cpp_loop_arguments", recording_compiled)
    monkeypatch.setattr(LeanDecoder, "run", recording_run)
    yield loops


def python_loop() -> contextlib.AbstractContextManager:
    """The lean path with its layer loop in Python wherever it would run in C++."""
    return mock.patch.object(LeanDecoder, "_cpp_loop_arguments", lambda *args: None)


def test_quantized_projections_of_one_input_run_as_one_call(monkeypatch):
    model = TrellisLlama.from_pretrained(keep_quantized=True, device="cpu", num_blocks=64)
    ids = torch.randint(3, 49152, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), group_calls(monkeypatch) as calls:
        model.generate(ids, max_new_tokens=2, do_sample=False)  # a prefill, then one decode step
    # per layer and step: q/k/v as one call, o, gate/up as one, down
    layer = [(3, "Q4_1"), (1, "Q4_1"), (2, "Q4_1"), (1, "Q4_1")]
    assert [(n, qtype) for _, n, qtype in calls] == layer * model.config.num_hidden_layers * 2
    assert {rows for rows, _, _ in calls} == {40, 1}


def test_projections_of_mixed_qtypes_run_as_one_call_per_qtype(monkeypatch):
    """A GGUF may store a layer's v_proj in another format than q/k (llama.cpp's mixes do): q/k
    run as one Q4_1 call and v as one Q8_0 call, with the same logits as each layer alone."""
    model = TrellisLlama.from_pretrained(keep_quantized=True, device="cpu", num_blocks=64)
    for layer in model.model.layers:
        v = layer.self_attn.v_proj
        weight = quant.dequantize(v.weight_blocks, v.qtype).numpy()
        blocks = torch.from_numpy(gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0).copy())
        layer.self_attn.v_proj = QuantizedLinear(v.in_features, v.out_features, "Q8_0", blocks)
    ids = torch.randint(3, 49152, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), group_calls(monkeypatch) as calls, lean_steps(model) as ran:
        got = model(ids, logits_to_keep=1).logits
        with fallback(model):
            torch.testing.assert_close(got, model(ids, logits_to_keep=1).logits, atol=1e-4, rtol=0)
    assert ran[0]
    layer = [(2, "Q4_1"), (1, "Q8_0"), (1, "Q4_1"), (2, "Q4_1"), (1, "Q4_1")]
    assert [(n, qtype) for _, n, qtype in calls] == layer * model.config.num_hidden_layers


@pytest.mark.skipif(torch.bfloat16 not in onednn_dtypes(), reason="bf16 layers run F.linear on this CPU")
def test_bf16_decode_rows_stream_as_one_call_prefill_runs_onednn(monkeypatch):
    monkeypatch.setattr(cpu_linear, "bf16_panels", lambda: False)  # oneDNN's packed copy (as without AVX512_BF16)
    _, model = tiny_pair()
    model.to(torch.bfloat16)
    model.set_linear_kernel("packed")
    ids = prompt(8, 24)
    with torch.no_grad(), group_calls(monkeypatch) as calls:
        tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
        # per layer of 2, in the C++ loop: the prefill's 24 rows on oneDNN's matmul, layer by layer;
        # then two decode steps' single rows streamed, q/k/v and gate/up as one call each
        assert calls == [(rows, width, kind) for rows, kind in ((24, ONEDNN), (1, "BF16"), (1, "BF16"))
                         for _ in range(2) for width in (3, 1, 2, 1)]
        with fallback(model):
            assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), tokens)


@pytest.mark.skipif(not cpu_linear.bf16_panels(), reason="no AVX512_BF16 here: oneDNN's packed copy")
def test_bf16_panels_run_decode_and_prefill_rows_as_the_fallback_does(monkeypatch):
    _, model = tiny_pair()
    model.to(torch.bfloat16)
    model.set_linear_kernel("packed")
    ids = torch.cat([prompt(seed, 24) for seed in range(4)])
    with torch.no_grad(), group_calls(monkeypatch) as calls:
        tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
        # nothing streams: the panels serve every row count, q/k/v and gate/up as one call each, o and
        # down alone (per layer of 2 and forward of 3: the prefill's 96 rows, then two decode steps of 4)
        assert calls == [(rows, width, "panels") for rows in (96, 4, 4) for _ in range(2) for width in (3, 1, 2, 1)]
        with fallback(model):
            assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), tokens)


@pytest.mark.skipif(cpu_linear.streamed_rows(torch.float32) is None, reason="fp32 layers do not stream on this CPU")
def test_fp32_decode_rows_of_four_sessions_stream_as_one_call(monkeypatch):
    ref, model = tiny_pair()
    model.set_linear_kernel("blas")
    ids = torch.cat([prompt(seed, 24) for seed in range(4)])
    with torch.no_grad(), group_calls(monkeypatch) as calls:
        tokens = model.generate(ids, max_new_tokens=3, do_sample=False)
        streamed = [(rows, qtype) for rows, _, qtype in calls if qtype != LINEAR]
        assert streamed == [(4, "F32")] * 4 * 2 * 2  # 2 layers, 2 decode steps
        assert {rows for rows, _, qtype in calls if qtype == LINEAR} == {96}  # the prefill's on the BLAS
    assert torch.equal(tokens, ref.generate(ids, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layers_on_the_blas_run_the_loop_in_cpp(monkeypatch, dtype):
    """Bias-free layers whose forward is ``F.linear`` (fp32 on ``"blas"``; fp16 under every kind)
    run in the C++ layer loop, which calls ``at::linear`` for them: a prefill and one session's
    decode steps, with the Python loop's logits bit for bit."""
    model = _tiny_with_norm_weights()
    model.to(dtype)
    model.set_linear_kernel("blas")
    ids = prompt(3, 21)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.prefix_cache.reset()
        out = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits, dim=1), out.sequences

    with torch.no_grad(), layer_loops(monkeypatch) as loops:
        logits, tokens = run()
        assert loops == ["cpp"] * 4
        loops.clear()
        with python_loop():
            python_logits, python_tokens = run()
    assert torch.equal(logits, python_logits)
    assert torch.equal(tokens, python_tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_dtype_runs_lean_unless_turned_off(dtype):
    _, model = tiny_pair()
    model.to(dtype)
    with torch.no_grad(), lean_steps(model) as ran:
        model(prompt(3, 9))
        model.runner.use_lean_decoder = False
        model(prompt(3, 9))  # transformers' forward, without asking the lean path
    assert ran == [True]


def _quantized_smollm2() -> TrellisLlama:
    return TrellisLlama.from_pretrained(keep_quantized=True, device="cpu", num_blocks=64)


def _tiny_with_norm_weights() -> TrellisLlama:
    """The tiny model with RMSNorm weights other than ones, each norm its own."""
    _, model = tiny_pair()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(module.weight)))
                module.weight.add_(torch.rand(1).item())
    return model


def _bf16_panels_tiny() -> TrellisLlama:
    model = _tiny_with_norm_weights()
    model.to(torch.bfloat16)
    model.set_linear_kernel("packed")
    return model


def _fp32_streamed_tiny() -> TrellisLlama:
    model = _tiny_with_norm_weights()
    model.set_linear_kernel("blas")
    return model


def _fp32_onednn_tiny() -> TrellisLlama:
    model = _tiny_with_norm_weights()
    model.set_linear_kernel("onednn")  # the prefill's rows on oneDNN's matmul over the parameter
    return model


def _onednn_packed_tiny(monkeypatch) -> TrellisLlama:
    monkeypatch.setattr(cpu_linear, "bf16_panels", lambda: False)  # oneDNN's packed copy, as without AVX512_BF16
    model = _tiny_with_norm_weights()
    model.to(torch.bfloat16)
    model.set_linear_kernel("packed")
    return model


def _unpatched(load: Callable[[], TrellisLlama]) -> Callable[[pytest.MonkeyPatch], TrellisLlama]:
    return lambda monkeypatch: load()


LOOP_CASES = [
    pytest.param(_unpatched(_quantized_smollm2), 49152, id="Q4_1"),
    pytest.param(_onednn_packed_tiny, 256, id="bf16-onednn-packed", marks=pytest.mark.skipif(
        torch.bfloat16 not in onednn_dtypes(), reason="bf16 runs no oneDNN here")),
    pytest.param(_unpatched(_fp32_onednn_tiny), 256, id="fp32-onednn", marks=pytest.mark.skipif(
        not cpu_linear.onednn_available(), reason="no oneDNN in this torch")),
    pytest.param(_unpatched(_bf16_panels_tiny), 256, id="bf16-panels", marks=pytest.mark.skipif(
        not cpu_linear.bf16_panels(), reason="no AVX512_BF16 here: oneDNN's packed copy")),
    pytest.param(_unpatched(_fp32_streamed_tiny), 256, id="fp32-streamed", marks=pytest.mark.skipif(
        cpu_linear.streamed_rows(torch.float32) is None, reason="fp32 layers do not stream on this CPU")),
]


@pytest.mark.parametrize(("load", "vocab"), LOOP_CASES)
def test_the_layer_loop_in_cpp_gives_the_python_loops_results(monkeypatch, load, vocab):
    """Where every projection is one C++ group call, ``decoder_layers`` runs the layer loop: the same
    ops in the same order, so the same logits bit for bit, over a prefill, cache hits and the decode
    steps of four sessions."""
    model = load(monkeypatch)
    ids = torch.randint(3, vocab, (4, 21), generator=torch.Generator().manual_seed(4))
    ids[:, :12] = ids[0, :12]  # a shared prefix: the second forward hits the cache

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        model.prefix_cache.reset()  # the same computations in both loops
        logits = model(ids[:, :17], logits_to_keep=3).logits
        out = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        return torch.cat([logits, torch.stack(out.logits, dim=1)], dim=1), out.sequences

    with torch.no_grad(), layer_loops(monkeypatch) as loops:
        logits, tokens = run()
        assert "cpp" in loops  # (fp32's prefill rows run MKL or oneDNN: that loop runs in Python)
        loops.clear()
        with python_loop():
            python_logits, python_tokens = run()
        assert set(loops) == {"python"}
    assert torch.equal(logits, python_logits)
    assert torch.equal(tokens, python_tokens)


def _panels_tiny(dtype: torch.dtype):
    def load(monkeypatch) -> TrellisLlama:
        monkeypatch.setattr(cpu_linear, "bf16_panels" if dtype == torch.bfloat16 else "fp32_panels", lambda: True)
        model = _tiny_with_norm_weights()
        model.to(dtype)
        model.set_linear_kernel("packed")
        return model
    return load


def _streamed_tiny(dtype: torch.dtype):
    def load(monkeypatch) -> TrellisLlama:
        model = _tiny_with_norm_weights()
        model.to(dtype)
        model.set_linear_kernel("blas")
        return model
    return load


def _edit_in_place(model: TrellisLlama) -> None:
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.5)  # a version bump: the watcher sees it


def _replace_a_weight(model: TrellisLlama) -> None:
    proj = model.model.layers[0].mlp.up_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().flip(0).contiguous(), requires_grad=False)


def _edit_unseen_then_reset(model: TrellisLlama) -> None:
    weight = model.model.layers[0].self_attn.q_proj.weight
    weight.data.copy_(weight.data.flip(0))  # past the version counter: only a reset tells the model
    model.prefix_cache.reset()


def _another_kernel(model: TrellisLlama) -> None:
    model.set_linear_kernel("blas")  # layouts unchanged: only the kinds tell


_PANELS = [_edit_in_place, _replace_a_weight, _edit_unseen_then_reset, _another_kernel]
_STREAMED = [_edit_in_place, _replace_a_weight, _edit_unseen_then_reset]  # decode rows stream on any kind


@pytest.mark.parametrize(("load", "sessions", "change"), [
    *[pytest.param(_panels_tiny(dtype), 2, change, id=f"{name}-panels-{change.__name__[1:]}",
                   marks=pytest.mark.skipif(not cpu_linear.panels_run(dtype), reason=f"{name} panels do not run here"))
      for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")) for change in _PANELS],
    *[pytest.param(_onednn_packed_tiny, 2, change, id=f"bf16-onednn-packed-{change.__name__[1:]}",
                   marks=pytest.mark.skipif(torch.bfloat16 not in onednn_dtypes(), reason="bf16 runs no oneDNN here"))
      for change in _STREAMED],  # (F.linear's bf16 is oneDNN's too: "blas" gives the same logits)
    *[pytest.param(_streamed_tiny(torch.bfloat16), 2, change, id=f"bf16-streamed-{change.__name__[1:]}",
                   marks=pytest.mark.skipif(not cpu_linear.streams(2, torch.bfloat16), reason="bf16 rows do not stream here"))
      for change in _STREAMED],
    *[pytest.param(_streamed_tiny(torch.float32), 4, change, id=f"fp32-streamed-{change.__name__[1:]}",
                   marks=pytest.mark.skipif(not cpu_linear.streams(4, torch.float32), reason="fp32 rows do not stream here"))
      for change in _STREAMED],
])
def test_the_cpp_loops_listed_layers_follow_the_model(monkeypatch, load, sessions, change):
    """The C++ loop's per-layer arguments are listed once per kind of input (prefill rows, decode
    rows) and kept over forwards, and listed again after whatever they were listed on changes: a
    weight edited in place or replaced, a weight edited unseen and the cache reset, another linear
    kernel. Each time the logits are the Python loop's, which reads the modules afresh at every call."""
    model = load(monkeypatch)
    ids = torch.cat([prompt(seed, 13) for seed in range(sessions)])
    listed, list_layers = [], LeanDecoder._list_loop_layers
    monkeypatch.setattr(LeanDecoder, "_list_loop_layers",
                        lambda self, *args: listed.append(args) or list_layers(self, *args))

    def logits() -> torch.Tensor:
        out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        return torch.stack(out.logits, dim=1)

    with torch.no_grad(), layer_loops(monkeypatch) as loops:
        before = logits()
        assert loops.count("cpp") >= 5 and len(listed) <= 2  # five decode steps; a prefill's rows, a step's
        listed.clear()
        # A prefix cache hit: fewer prefill rows, which may run another kernel (a few fp32 rows stream
        # on an AVX2 CPU, the whole prompt's ran BLAS) and sum in another order: the suite's fp32 tolerance.
        torch.testing.assert_close(logits(), before, atol=1e-4, rtol=0)
        assert not listed
        change(model)
        loops.clear()
        after = logits()
        assert 1 <= len(listed) <= 2  # (fp32 on Intel: two rows run MKL, a loop in Python, after "blas")
        loops.clear()
        with python_loop():
            model.prefix_cache.reset()  # the same computations in both loops
            python_after = logits()
        assert set(loops) == {"python"}
    assert torch.equal(after, python_after)
    if change is _another_kernel and torch.equal(after, before):
        # bf16 panels on AMX tiles sum as oneDNN does at the tiny model's sizes: the same bits
        pytest.skip("the other kernel computes the same bits here: the change cannot show")
    assert not torch.equal(after, before)  # the change matters


def test_bf16_prefill_on_onednn_runs_the_loop_in_cpp(monkeypatch):
    """Decode rows stream as one BF16 call per group; prefill rows of oneDNN's packed copy run one
    matmul per layer, which the C++ loop calls as ``forward`` does: both loops run in C++."""
    monkeypatch.setattr(cpu_linear, "bf16_panels", lambda: False)
    model = _bf16_panels_tiny()
    if torch.bfloat16 not in onednn_dtypes():
        pytest.skip("bf16 layers run F.linear on this CPU")
    with torch.no_grad(), layer_loops(monkeypatch) as loops:
        model.generate(prompt(9, 24), max_new_tokens=3, do_sample=False)
    assert loops == ["cpp", "cpp", "cpp"]


def test_a_projection_outside_every_group_runs_the_loop_in_python(monkeypatch):
    """A layer whose projections are not one group call each (here q_proj has a bias, which no
    group kernel adds) runs its own forward, in the Python loop, with the fallback's logits."""
    model = _fp32_streamed_tiny()
    q_proj = model.model.layers[1].self_attn.q_proj
    q_proj.bias = torch.nn.Parameter(torch.linspace(-0.5, 0.5, q_proj.out_features), requires_grad=False)
    ids = prompt(11, 24)
    with torch.no_grad(), layer_loops(monkeypatch) as loops:
        out = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert loops == ["python", "python", "python"]
    with torch.no_grad(), fallback(model):
        expected = model.generate(ids, max_new_tokens=3, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-5, rtol=0)


def _loop_arguments(monkeypatch) -> list:
    """The ``decoder_layers`` arguments of a decode step of the tiny model in fp32 on the BLAS (its
    row streamed where fp32 rows stream from one, else ``at::linear`` for every projection)."""
    model = _fp32_streamed_tiny()
    captured, compiled = [], LeanDecoder._cpp_loop_arguments
    monkeypatch.setattr(LeanDecoder, "_cpp_loop_arguments",
                        lambda self, *args: captured.append(compiled(self, *args)) or captured[-1])
    with torch.no_grad():
        model.generate(prompt(5, 9), max_new_tokens=2, do_sample=False)
    assert captured[-1] is not None
    return list(captured[-1])


@pytest.mark.parametrize(("index", "value", "message"), [
    (5, [], "no layers"),
    (6, "one", "2 k_caches but 1 v_caches"),
    (1, "one", "need 4 norms and eps"),
    (13, "one", "need 14 weights and out_features"),
    (14, "one", "need 8 kinds"),
    (14, "Q9_9", "unsupported qtype 'Q9_9'(.|\n)*in layer 0"),
    (16, 0, "head_dim must be positive"),
])
def test_decoder_layers_refuses_inconsistent_arguments(monkeypatch, index, value, message):
    arguments = _loop_arguments(monkeypatch)
    if value == "one":
        arguments[index] = arguments[index][:1]
    elif value == "Q9_9":
        arguments[index] = ["Q9_9"] * len(arguments[index])
    else:
        arguments[index] = value
    with pytest.raises(ValueError, match=message):
        torch.ops.trellis_cpp.decoder_layers(*arguments)


def test_decoder_layers_schema_and_fake(monkeypatch):
    arguments = _loop_arguments(monkeypatch)
    arguments[11] = None  # a plan names the tensors it was made for, and opcheck runs the op on copies
    torch.library.opcheck(torch.ops.trellis_cpp.decoder_layers.default, tuple(arguments),
                          test_utils=("test_schema", "test_faketensor"))
