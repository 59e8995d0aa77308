"""What every peer worker of ``bench_peers.py`` shares: the measurements, written once over four
primitives each system implements, and the loop that serves them.

Standard library only: a worker runs in its system's own virtual environment (llama.cpp's has no
torch). The driver sends one JSON request per line on stdin and reads one JSON reply per line; the
workers are handed token ids, never text, so every system sees the same prompts.

Requests (``task``):

- ``info``: versions and settings, the reply to which also says the worker is ready.
- ``op``: the seed's op from an empty cache: warm ``prefix`` (one token), then run every prompt
  of ``prompts`` to ``max_new_tokens`` tokens. Seconds of the whole op and of the sessions alone.
- ``ttft``: from an empty cache, seconds to the first token of ``warm`` (a cold prompt), then of
  ``probe`` (which shares a prefix with ``warm``), each a one-token request, wall clock around it.
- ``decode``: one session after an empty cache: ``prompt``, then ``max_new_tokens`` tokens; the
  seconds between consecutive tokens (every token after the first is one decode step).
- ``fidelity`` (``bench_gguf_fidelity.py``, not timed): the log-probability of every token of each
  of ``texts`` given the tokens before it in that text, and each of ``prompts``' ``max_new_tokens``
  greedy tokens.
- ``quit``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback
from collections.abc import Sequence

clock = time.perf_counter


class Worker:
    """One system, loaded. Subclasses implement the four primitives below; the measurements are here."""

    def info(self) -> dict:
        raise NotImplementedError

    def reset(self) -> None:
        """An empty prefix cache: where a fresh pipeline starts (inside the timed region of an op)."""
        raise NotImplementedError

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[int, int]]:
        """Run every prompt to ``max_new_tokens`` greedy tokens (no stop token), the system's usual
        way (batched where it batches). Per prompt: its tokens served from the cache (-1 where the
        system does not tell) and the tokens it generated."""
        raise NotImplementedError

    def token_times(self, prompt: list[int], max_new_tokens: int) -> list[float]:
        """One session: ``clock()`` as each of its tokens comes out."""
        raise NotImplementedError

    def token_logprobs(self, tokens: list[int]) -> list[float]:
        """log p(tokens[i] | tokens[:i]) for i = 1 .. len(tokens) - 1 (fidelity only)."""
        raise NotImplementedError

    def greedy_tokens(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """``max_new_tokens`` greedy tokens after ``prompt``, from an empty cache (fidelity only)."""
        raise NotImplementedError

    # --- the measurements ---

    def op(self, prefix: list[int], prompts: list[list[int]], max_new_tokens: int) -> dict:
        start = clock()
        self.reset()
        if prefix:
            self.generate([prefix], 1)
        warm = clock()
        out = self.generate(prompts, max_new_tokens)
        end = clock()
        return {"seconds": end - start, "session_seconds": end - warm, "generated": sum(n for _, n in out),
                "cached_tokens": [cached for cached, _ in out]}

    def ttft(self, warm: list[int], probe: list[int]) -> dict:
        self.reset()
        start = clock()
        self.generate([warm], 1)
        cold = clock() - start
        start = clock()
        ((cached, _),) = self.generate([probe], 1)
        return {"cold": cold, "probe": clock() - start, "probe_cached_tokens": cached}

    def decode(self, prompt: list[int], max_new_tokens: int) -> dict:
        self.reset()
        return {"token_seconds": intervals(self.token_times(prompt, max_new_tokens))}

    def fidelity(self, texts: list[list[int]], prompts: list[list[int]], max_new_tokens: int) -> dict:
        return {"logprobs": [self.token_logprobs(text) for text in texts],
                "continuations": [self.greedy_tokens(prompt, max_new_tokens) for prompt in prompts]}


def intervals(stamps: Sequence[float]) -> list[float]:
    """Seconds between consecutive stamps."""
    return [b - a for a, b in itertools.pairwise(stamps)]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def serve(worker_factory) -> None:
    """Answer requests on stdin until ``quit`` or end of input. Replies go to the process's original
    stdout; everything else the libraries print (to fd 1, their child processes included) goes to stderr."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")

    try:
        worker = worker_factory()
    except Exception:  # noqa: BLE001 - the driver records why this system did not run
        reply({"error": traceback.format_exc()})
        return
    for line in sys.stdin:
        request = json.loads(line)
        task = request.pop("task")
        if task == "quit":
            break
        try:
            reply(worker.info() if task == "info" else getattr(worker, task)(**request))
        except Exception:  # noqa: BLE001
            reply({"error": traceback.format_exc()})
    close = getattr(worker, "close", None)
    if close is not None:
        close()
