"""bench_peers' llama.cpp worker (.peers/llamacpp): llama-cpp-python on the embedded GGUF as its
file ships (Q4_1 layers), greedy, token-id prompts.

It has one context, so sessions run one after another; each reuses the longest prefix it shares
with what the context holds (llama-cpp-python's own prompt reuse), as a chat user's next turn does.

    .peers/llamacpp/bin/python benchmarks/peers/llamacpp_worker.py --gguf PATH --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import protocol
from llama_cpp import Llama, __version__, llama_print_system_info

N_CTX = 2048


class LlamaCppWorker(protocol.Worker):
    def __init__(self, gguf: str, threads: int) -> None:
        self.gguf, self.threads = gguf, threads
        self.llm = Llama(model_path=gguf, n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.context: list[int] = []  # the tokens whose K/V the context holds, to count the reused prefix
        self.scorer: Llama | None = None  # fidelity's all-logits context, made on first use

    def info(self) -> dict:
        system_info = llama_print_system_info()
        build = Path(sys.prefix) / "CMAKE_ARGS"  # written by scripts/setup_peers.sh
        return {"llama_cpp_python": __version__, "model": self.gguf, "n_ctx": N_CTX, "n_threads": self.threads,
                "n_batch": self.llm.n_batch, "cmake_args": build.read_text().strip() if build.is_file() else None,
                "system_info": system_info.decode() if isinstance(system_info, bytes) else str(system_info)}

    def reset(self) -> None:
        self.llm.reset()  # the next prompt is evaluated from its first token
        self.context = []

    def _session(self, prompt: list[int], max_new_tokens: int, stamps: list[float] | None = None) -> tuple[int, int]:
        # generate() reuses the longest prefix of prompt[:-1] the context holds (the last prompt token
        # is always evaluated, for its logits)
        cached = protocol.common_prefix(self.context, prompt[:-1])
        generated: list[int] = []
        for token in self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0):  # temp 0: greedy; runs past EOS
            if stamps is not None:
                stamps.append(protocol.clock())
            generated.append(token)
            if len(generated) == max_new_tokens:
                break
        self.context = prompt + generated[:-1]  # the last token is sampled, never evaluated
        return cached, len(generated)

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[int, int]]:
        return [self._session(prompt, max_new_tokens) for prompt in prompts]

    def token_times(self, prompt: list[int], max_new_tokens: int) -> list[float]:
        stamps: list[float] = []
        self._session(prompt, max_new_tokens, stamps)
        return stamps

    def token_logprobs(self, tokens: list[int]) -> list[float]:
        # A second context that keeps every position's logits (the timed one keeps the last only).
        if self.scorer is None:
            self.scorer = Llama(model_path=self.gguf, n_ctx=N_CTX, n_threads=self.threads,
                                n_threads_batch=self.threads, logits_all=True, verbose=False)
        self.scorer.reset()
        self.scorer.eval(tokens)
        logits = np.asarray(self.scorer.scores[: len(tokens) - 1], dtype=np.float64)  # position i predicts i + 1
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        return (logits[np.arange(len(tokens) - 1), tokens[1:]] - log_z).tolist()

    def greedy_tokens(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        self.reset()
        tokens: list[int] = []
        for token in self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            tokens.append(token)
            if len(tokens) == max_new_tokens:
                break
        self.context = prompt + tokens[:-1]
        return tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    protocol.serve(lambda: LlamaCppWorker(args.gguf, args.threads))


if __name__ == "__main__":
    main()
