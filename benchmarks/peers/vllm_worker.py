"""bench_peers' vLLM worker (.peers/vllm): vLLM's CPU build on the converted safetensors directory,
offline, prefix caching on, greedy, token-id prompts (``TokensPrompt``; no tokenizer: vLLM then
detokenizes nothing, as the other systems here).

Its settings come from the driver: threads through ``VLLM_CPU_OMP_THREADS_BIND``, the KV space
through ``VLLM_CPU_KVCACHE_SPACE`` (set before vLLM is imported).

    .peers/vllm/bin/python benchmarks/peers/vllm_worker.py --model DIR --dtype float32|bfloat16 [--block-size 32]
"""

from __future__ import annotations

import argparse
import os

import protocol

MAX_MODEL_LEN = 2048


class VLLMWorker(protocol.Worker):
    def __init__(self, model: str, dtype: str, block_size: int | None) -> None:
        import torch
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.versions = {"vllm": vllm.__version__, "torch": torch.__version__}
        self.sampling, self.tokens_prompt, self.delta = SamplingParams, TokensPrompt, RequestOutputKind.DELTA
        self.model, self.dtype = model, dtype
        self.llm = LLM(model=model, dtype=dtype, enable_prefix_caching=True, block_size=block_size,
                       max_model_len=MAX_MODEL_LEN, skip_tokenizer_init=True, seed=0)
        self.block_size = self.llm.llm_engine.vllm_config.cache_config.block_size
        self.requests = 0

    def info(self) -> dict:
        import transformers

        env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "OMP_", "LD_PRELOAD"))}
        return {**self.versions, "transformers": transformers.__version__, "model": self.model, "dtype": self.dtype,
                "block_size": self.block_size, "prefix_caching": True, "environment": env}

    def _params(self, max_new_tokens: int, **kwargs):
        return self.sampling(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, detokenize=False, **kwargs)

    def reset(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache")

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[int, int]]:
        outputs = self.llm.generate([self.tokens_prompt(prompt_token_ids=p) for p in prompts],
                                    self._params(max_new_tokens), use_tqdm=False)
        return [(o.num_cached_tokens if o.num_cached_tokens is not None else -1, len(o.outputs[0].token_ids))
                for o in outputs]

    def token_times(self, prompt: list[int], max_new_tokens: int) -> list[float]:
        """The engine stepped by hand (what ``LLM.generate`` does), a stamp per token as its delta arrives."""
        engine = self.llm.llm_engine
        self.requests += 1
        engine.add_request(f"decode-{self.requests}", self.tokens_prompt(prompt_token_ids=prompt),
                           self._params(max_new_tokens, output_kind=self.delta))
        stamps: list[float] = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                now = protocol.clock()
                new = len(output.outputs[0].token_ids) if output.outputs else 0
                if new and stamps:  # several tokens in one delta: spread evenly since the last one
                    last = stamps[-1]
                    stamps += [last + (now - last) * (i + 1) / new for i in range(new)]
                else:
                    stamps += [now] * new
        return stamps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
    p.add_argument("--block-size", type=int, help="KV block size (default: vLLM's for CPU)")
    args = p.parse_args()
    protocol.serve(lambda: VLLMWorker(args.model, args.dtype, args.block_size))


if __name__ == "__main__":  # vLLM starts its engine in a child process
    main()
