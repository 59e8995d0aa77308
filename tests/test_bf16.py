"""bf16 on the CPU: TrellisLlama in bf16 against transformers' LlamaForCausalLM in bf16, with the
fp32 model as the oracle; and the dtype the command picks.

bf16 keeps 8 bits of mantissa. SmolLM2's logits (up to ~37) come out rounded to steps of 0.125
to 0.25, and 30 layers of rounding move them by up to ~0.8 from fp32, in transformers as in
Trellis; near-ties (top-2 margins of one or two steps) are common, and either side of one is a
right answer. So Trellis is held to transformers' own bf16 error (flash-attention's rule: at most
twice the error of the low-precision reference, against the fp32 oracle), and a greedy token
counts as right when it is transformers' choice or within the error band of it. docs/dtypes.md
has the measured figures.
"""

import argparse
import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.models import smollm2_dir, smollm2_reference, tiny_pair
from tests.test_llama_smollm2 import chat
from trellis.eval.loading import add_model_arguments as add_eval_model_arguments
from trellis.model_options import add_model_arguments
from trellis.models import loading
from trellis.models.llama import TrellisLlama
from trellis.runner import LINEAR_KERNELS, cpu_linear

IDS = torch.arange(3, 40)[None]
FACTOR = 2  # Trellis' error against fp32 may be at most this many times transformers' bf16 error


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item()


@pytest.mark.parametrize("kind", LINEAR_KERNELS)
def test_tiny_model_in_bf16_matches_transformers_with_cache_hits(kind):
    if kind != "blas" and not cpu_linear.onednn_available():
        pytest.skip("no oneDNN on this machine or build")
    ref32, model = tiny_pair()
    ref = copy.deepcopy(ref32).to(torch.bfloat16)
    model.to(torch.bfloat16).set_linear_kernel(kind)  # set_linear_kernel lays out the converted weights
    with torch.no_grad():
        exact = ref32(IDS).logits
        tolerance = FACTOR * max_error(ref(IDS).logits, exact)  # measured: transformers' 0.17, Trellis' 0.20
        cold = model(IDS).logits
        assert cold.dtype == torch.bfloat16 and max_error(cold, exact) <= tolerance
        hits = model.prefix_cache.stats()["hit_tokens"]
        cached = model(IDS, logits_to_keep=8).logits
        assert model.prefix_cache.stats()["hit_tokens"] - hits == 29  # every token before the first logit kept
        assert max_error(cached, cold[:, -8:]) <= tolerance  # measured: bit-for-bit
    # The tiny model's logits are peaked (init range 0.2): greedy decoding has no near-tie to flip.
    assert torch.equal(model.generate(IDS, max_new_tokens=12, do_sample=False),
                       ref.generate(IDS, max_new_tokens=12, do_sample=False))
    model.prefix_cache.check_integrity()


def test_smollm2_in_bf16_matches_transformers_in_bf16():
    """Trellis generates from three chat prompts sharing a system prompt (the second and third hit
    the cache); transformers, in bf16 and fp32, then reads Trellis' text in one forward each."""
    ref32 = smollm2_reference()
    ref = LlamaForCausalLM.from_pretrained(smollm2_dir(), attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    model = TrellisLlama.from_pretrained(smollm2_dir(), dtype=torch.bfloat16, device="cpu", num_blocks=128)
    assert model.linear_kernel == cpu_linear.default_linear_kernel(torch.bfloat16)  # packed, where oneDNN runs bf16
    agreed = generated = 0
    for question in ("What is the capital of France?", "Who was Ada Lovelace?", "How do bees make honey?"):
        ids = chat(question)
        prompt = ids.shape[1] - 1  # the position whose logits pick the first new token
        with torch.no_grad():
            text = model.generate(ids, max_new_tokens=12, do_sample=False)
            keep = text.shape[1] - prompt
            exact = ref32(text).logits[:, prompt:]
            theirs = ref(text).logits[:, prompt:]
            tolerance = FACTOR * max_error(theirs, exact)  # measured: 0.5 to 0.8 against fp32
            model.prefix_cache.reset()
            cold = model(text, logits_to_keep=keep).logits  # caches the text's full blocks
            assert max_error(cold, exact) <= tolerance
            hits = model.prefix_cache.stats()["hit_tokens"]
            cached = model(text, logits_to_keep=keep).logits
            assert model.prefix_cache.stats()["hit_tokens"] - hits >= 32
            # Not bit-for-bit: other row counts take other GEMM blockings, and a rounding step that
            # flips in one layer carries on (measured: up to 0.75, the size of bf16's own error).
            assert max_error(cached, cold) <= tolerance
        # Each greedy token is transformers' choice at that point of the text, or within 2 * tolerance
        # of it (where both logits may move by the tolerance: a near-tie, either side of it right).
        theirs, ours = theirs[0, :-1].float(), text[0, prompt + 1:]
        shortfall = theirs.max(-1).values - theirs.gather(-1, ours[:, None])[:, 0]
        assert shortfall.max().item() <= 2 * tolerance, shortfall
        agreed += int((theirs.argmax(-1) == ours).sum())
        generated += len(ours)
    print(f"greedy tokens that are transformers' bf16 choice on the same text: {agreed}/{generated}")
    model.prefix_cache.check_integrity()


# --- the dtype the command picks ----------------------------------------------------------------


@pytest.mark.parametrize(("capabilities", "dtype"), [
    ({"avx512_bf16": True, "amx_bf16": True}, torch.bfloat16),
    ({"avx512_bf16": True}, torch.bfloat16),
    ({"bf16": True}, torch.bfloat16),  # ARM's FEAT_BF16
    ({"avx512_f": True, "avx2": True}, torch.float32),  # AVX-512 without bf16 dot products: emulated, slow
    ({}, torch.float32),
])
def test_preferred_dtype_follows_native_bf16(monkeypatch, capabilities, dtype):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    choice = loading.preferred_dtype("cpu")
    assert choice.dtype == dtype and choice.reason


def test_preferred_dtype_elsewhere_is_transformers_auto():
    assert loading.preferred_dtype("cuda").dtype == "auto" and loading.preferred_dtype("mps").dtype == "auto"


def test_dtype_names():
    assert loading.choose_dtype("auto", "cpu") == loading.preferred_dtype("cpu")
    assert loading.choose_dtype("float16", "cpu").dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose 'auto' or one of float32, bfloat16, float16"):
        loading.choose_dtype("fp8", "cpu")


def test_the_command_defaults_to_auto_and_the_eval_scripts_to_fp32():
    command, scripts = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_model_arguments(command)
    add_eval_model_arguments(scripts)
    assert command.parse_args([]).dtype == "auto" and scripts.parse_args([]).dtype == "float32"
    assert command.parse_args(["--dtype", "bfloat16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        command.parse_args(["--dtype", "fp8"])
