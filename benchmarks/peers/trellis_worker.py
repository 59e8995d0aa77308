"""bench_peers' Trellis worker (the main .venv): the embedded SmolLM2 in fp32 or bf16 from the
converted safetensors, or with the GGUF's linear weights kept quantized; Trellis' engine with its
default kernels. Each op starts from an empty prefix cache over the same pool
(``systems.engine_over_empty_cache``), as vLLM's ``reset_prefix_cache`` keeps its KV memory.

    .venv/bin/python benchmarks/peers/trellis_worker.py --variant fp32|bf16|gguf|gguf_q8 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common, systems

import protocol
import torch
from common import environment, load_model
from systems import engine_over_empty_cache

from trellis.engine.engine import Engine
from trellis.engine.sampling import SamplingParams
from trellis.models.embedded import EMBEDDED_GGUF, embedded_model_dir
from trellis.models.llama import TrellisLlama

BLOCK_SIZE = 32
POOL_BLOCKS = 256  # 8192 tokens: every session of the largest request at once


class TrellisWorker(protocol.Worker):
    def __init__(self, variant: str, threads: int) -> None:
        self.variant = variant
        if variant.startswith("gguf"):  # gguf_q8: inputs rounded to 8 bits, as llama.cpp rounds them
            torch.set_num_threads(threads)
            self.model = TrellisLlama.from_pretrained(keep_quantized=True, q8_activations=variant == "gguf_q8",
                                                      device="cpu")
            self.model.generation_config.eos_token_id = None
        else:
            dtype = {"fp32": "float32", "bf16": "bfloat16"}[variant]
            self.model = load_model(argparse.Namespace(model="smollm2", threads=threads, backend=None, dtype=dtype,
                                                       linear_kernel=None))
        self.engine: Engine | None = None

    def info(self) -> dict:
        return {**environment(self.model.dtype, self.model.linear_kernel),
                "model": f"{EMBEDDED_GGUF} kept quantized" + (", 8-bit activations" if self.variant == "gguf_q8" else "")
                if self.variant.startswith("gguf")
                else f"{embedded_model_dir()} (safetensors)",
                "attention_backend": self.model.attention_backend(), "block_size": BLOCK_SIZE}

    def reset(self) -> None:
        self.engine = engine_over_empty_cache(self.model, BLOCK_SIZE, POOL_BLOCKS)

    def _run(self, prompts: list[list[int]], max_new_tokens: int):
        return self.engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[int, int]]:
        return [(s.num_cached_tokens, len(s.generated)) for s in self._run(prompts, max_new_tokens)]

    def token_times(self, prompt: list[int], max_new_tokens: int) -> list[float]:
        (session,) = self._run([prompt], max_new_tokens)
        return list(session.token_times)

    def token_logprobs(self, tokens: list[int]) -> list[float]:
        self.reset()
        with torch.no_grad():
            logits = self.model(torch.tensor([tokens]), use_cache=False).logits[0, :-1].double()
        return logits.log_softmax(-1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()

    def greedy_tokens(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        self.reset()
        (session,) = self._run([prompt], max_new_tokens)
        return list(session.generated)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=("fp32", "bf16", "gguf", "gguf_q8"), required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    protocol.serve(lambda: TrellisWorker(args.variant, args.threads))


if __name__ == "__main__":
    main()
