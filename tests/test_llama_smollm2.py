"""Parity with plain transformers on the real SmolLM2-135M-Instruct weights (the embedded model)."""

import subprocess
import sys
from pathlib import Path

import torch

from tests.models import smollm2_reference, smollm2_tokenizer, smollm2_trellis

SYSTEM = ("You are a careful assistant who answers questions about geography, history and science. "
          "Keep answers short and precise, and say when you do not know something.")


def chat(question: str) -> torch.Tensor:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return smollm2_tokenizer().apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)["input_ids"]


def test_greedy_tokens_and_logits_match_with_cache_hits():
    ref, model = smollm2_reference(), smollm2_trellis(num_blocks=128)
    questions = ["What is the capital of France?", "Why do leaves change colour?", "Who was Ada Lovelace?"]
    for i, q in enumerate(questions):
        ids = chat(q)
        hits = model.prefix_cache.stats()["hit_tokens"]
        with torch.no_grad():
            got = model(ids, logits_to_keep=1).logits
            want = ref(ids).logits[:, -1:]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        if i > 0:  # the shared system prompt is served from the cache
            assert model.prefix_cache.stats()["hit_tokens"] - hits >= 32
        assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False),
                           ref.generate(ids, max_new_tokens=16, do_sample=False))
    model.prefix_cache.check_integrity()


def test_a_chats_next_turn_is_served_every_token_the_last_turn_computed():
    """Through SmolLM2's chat template, as a chat client builds it: the answer decoded to text and
    tokenized again in turn 2. Turn 1's prompt and answer are served from the cache (their last,
    partly filled block copied from the tail turn 1 left), and turn 2 answers as transformers does."""
    ref, model = smollm2_reference(), smollm2_trellis(num_blocks=128)
    tok = smollm2_tokenizer()
    first = chat("Which river flows through Paris?")
    answer = model.generate(first, max_new_tokens=24, do_sample=False)[0, first.shape[1]:]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which river flows through Paris?"},
                {"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)},
                {"role": "user", "content": "How long is it?"}]
    second = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)["input_ids"]
    computed = torch.cat([first[0], answer[:-1]])  # the last answer token was never fed back
    shared = int((computed[: second.shape[1]] == second[0, : computed.shape[0]]).long().cumprod(0).sum())
    assert shared % 32  # the turns part inside a block
    hits = model.prefix_cache.stats()["hit_tokens"]
    got = model.generate(second, max_new_tokens=8, do_sample=False)
    assert model.prefix_cache.stats()["hit_tokens"] - hits == shared
    assert torch.equal(got, ref.generate(second, max_new_tokens=8, do_sample=False))
    model.prefix_cache.check_integrity()


def test_padded_batch_matches():
    ref, model = smollm2_reference(), smollm2_trellis(num_blocks=128)
    tok = smollm2_tokenizer()
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
             for q in ("Name a prime number.", "Describe the moon in one sentence, please, for a child.")]
    batch = tok(texts, return_tensors="pt", padding=True)
    got = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    want = ref.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(got, want)
    model.prefix_cache.check_integrity()


def test_prompt_lengths_that_once_corrupted_the_heap():
    """35..47-token prompts give the C++ kernel's work items 33..48 query rows (9 heads in groups
    of 3); on AVX-512 a score block then stored 3 keys past the end of its tile. The corruption
    was silent until a later free() aborted the process, so this runs in a child process."""
    code = """
import subprocess
import sys
from pathlib import Path

import torch
from tests.models import smollm2_trellis
model = smollm2_trellis(num_blocks=64)
with torch.no_grad():
    for q_len in (35, 44, 47):
        model.configure_cache(num_blocks=64)
        model(torch.arange(3, 3 + q_len)[None])
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]


def test_prompt_lookup_decoding_matches_plain_greedy():
    """Drafts copied from the prompt are verified in one forward and the rejected ones cropped
    off the paged session; a text to repeat makes most drafts right and some wrong."""
    ref, model = smollm2_reference(), smollm2_trellis(num_blocks=128)
    ids = chat("Repeat exactly: the quick brown fox jumps over the lazy dog, then the slow grey cat sleeps "
               "under the old red car.")
    want = ref.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=32, do_sample=False, prompt_lookup_num_tokens=8), want)
    model.prefix_cache.check_integrity()
