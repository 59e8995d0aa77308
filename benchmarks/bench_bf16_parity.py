"""How far bf16 moves SmolLM2's answers, Trellis beside transformers: both in bf16 (transformers
with sdpa, PyTorch's flash attention on CPU), the fp32 transformers model as the oracle.

Trellis generates greedily from chat prompts that share a system prompt (later ones hit the
prefix cache); over each generated text, read in one forward by every system, it records the
largest and mean logit error of each bf16 system against fp32, Trellis' against transformers',
how often Trellis' greedy token is transformers' bf16 choice on that text (and, where not, how far
below that choice it scores in transformers' logits: a near-tie or not), the mean error of each
system's own decode steps against fp32 over its own text, a prefix-cache hit's
logits against the cold run's, and how many tokens both generate before the first difference
when each runs free. The figures of docs/compatibility.md ("bf16 parity") come from this script.

    .venv/bin/python benchmarks/bench_bf16_parity.py [--new-tokens 16] [--json PATH]
"""

from __future__ import annotations

import json

import torch
from common import environment, parser, refuse_unused
from report import bf16_parity_table  # the table the docs show
from transformers import AutoTokenizer, LlamaForCausalLM

from trellis.models.embedded import embedded_model_dir
from trellis.models.llama import TrellisLlama

SYSTEM = ("You are a careful assistant who answers questions about geography, history and science. "
          "Keep answers short and precise, and say when you do not know something.")
QUESTIONS = ("What is the capital of France?", "Who was Ada Lovelace?", "How do bees make honey?",
             "Why do leaves change colour?", "What is a prime number?")


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item()


def mean_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().mean().item()


def generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy text, and the logits each step chose from ``[new, V]`` (the first from the prompt's
    forward, the rest from decode steps)."""
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.cat(out.logits)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    """Tokens from the start of a and b (1-D, the same length) before the first that differs."""
    differ = (a != b).nonzero()
    return int(differ[0]) if len(differ) else len(a)


def measure(new_tokens: int) -> dict:
    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fp32 = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    theirs = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    ours = TrellisLlama.from_pretrained(model_dir, dtype=torch.bfloat16, device="cpu", num_blocks=128)
    prompts = []
    for question in QUESTIONS:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        start = ids.shape[1] - 1  # the position whose logits pick the first new token
        with torch.no_grad():
            text, our_steps = generate(ours, ids, new_tokens)
            their_text, their_steps = generate(theirs, ids, new_tokens)
            keep = text.shape[1] - start
            exact = fp32(text).logits[0, start:]
            their_exact = fp32(their_text).logits[0, start:their_text.shape[1] - 1]
            reference = theirs(text).logits[0, start:]
            ours.prefix_cache.reset()
            cold = ours(text, logits_to_keep=keep).logits[0]  # caches the text's full blocks
            cached = ours(text, logits_to_keep=keep).logits[0]
        generated = text[0, start + 1:]
        prompts.append({
            "question": question,
            "prompt_tokens": ids.shape[1],
            "trellis_vs_fp32_max": max_error(cold, exact),
            "transformers_vs_fp32_max": max_error(reference, exact),
            "trellis_vs_fp32_mean": mean_error(cold, exact),
            "transformers_vs_fp32_mean": mean_error(reference, exact),
            "trellis_vs_transformers_max": max_error(cold, reference),
            # the decode steps' own logits (each system over its own text) against fp32 on that text
            "trellis_decode_vs_fp32_mean": mean_error(our_steps, exact[:-1]),
            "transformers_decode_vs_fp32_mean": mean_error(their_steps, their_exact),
            "cache_hit_vs_cold_max": max_error(cached, cold),
            "greedy_agreed": int((reference[:-1].argmax(-1) == generated).sum()),
            # how far below transformers' choice Trellis' tokens score in transformers' logits (0: its choice)
            "greedy_shortfall_max": (reference[:-1].max(-1).values
                                     - reference[:-1].gather(-1, generated[:, None])[:, 0]).max().item(),
            "generated": len(generated),
            "free_running_agreed": first_difference(text[0, ids.shape[1]:], their_text[0, ids.shape[1]:]),
        })
    return {"what": "bf16_parity", "new_tokens": new_tokens,
            "info": {**environment(torch.bfloat16, ours.linear_kernel), "model": "SmolLM2-135M-Instruct (real weights)",
                     "trellis_backend": ours.attention_backend()},
            "prompts": prompts}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=16, help="tokens each prompt generates")
    args = p.parse_args()
    refuse_unused(p, args, "quick", "plot", "model", "backend", "repeats", "dtype", "linear_kernel")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.new_tokens)
    print(bf16_parity_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
