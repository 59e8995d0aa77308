"""Parity with plain transformers on the real SmolLM2-135M-Instruct weights (the embedded model)."""

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
