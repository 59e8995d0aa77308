"""Scoring requests tokenized as lm-evaluation-harness forms them, so scores are comparable.

A request is a ``(context, continuation)`` pair of token lists; the continuation is what gets
scored, conditioned on the context. These rules follow lm-eval's ``TemplateLM`` and ``HFLM``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

TokenRequest = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that stands in for an empty context: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> TokenRequest:
    """Tokenize a request: the continuation's tokens are those of ``context + continuation`` past
    the context's own, so a word split at the boundary is tokenized as in running text."""
    if not (isinstance(context, str) and isinstance(continuation, str)):
        raise TypeError(f"a request is a (context, continuation) pair of strings, got ({context!r}, {continuation!r})")
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        # A continuation that already starts with the prefix token conditions on it.
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    # Trailing spaces belong to the continuation: "Answer: " + "Paris" scores " Paris".
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    return context_ids, whole[len(context_ids):]


def rolling_windows(tokens: list[int], prefix_token: int, max_length: int) -> list[TokenRequest]:
    """Disjoint windows that score every token of ``tokens`` exactly once (lm-eval's rolling
    log-likelihood with a context of one token): the first window conditions on ``prefix_token``
    and scores up to ``max_length`` tokens; each later window scores the next ``max_length``
    tokens (fewer at the end), conditioned on as many preceding tokens as fit in ``max_length``."""
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    windows: list[TokenRequest] = []
    start = 0
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        # Context plus scored tokens span max_length + 1 tokens: the model sees all but the last.
        context = [prefix_token] if start == 0 else tokens[end - max_length - 1:start]
        windows.append((context, tokens[start:end]))
        start = end
    return windows
