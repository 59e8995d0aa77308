"""Scoring requests tokenized as lm-evaluation-harness forms them, so scores are comparable.

A request is a ``(context, continuation)`` pair of token lists; the continuation is what gets
scored, conditioned on the context. These rules follow lm-eval's ``TemplateLM`` and ``HFLM``.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

TokenRequest = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def request_pairs(requests: Iterable[tuple], second: str) -> list[tuple]:
    """``requests`` as a list of ``(context, second)`` pairs. A string, or one pair passed without
    its list, is a TypeError: iterating it would split strings into characters."""
    if isinstance(requests, str):
        raise TypeError(f"requests must be a list of (context, {second}) pairs, got a single string")
    pairs = list(requests)
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"request {i} must be a (context, {second}) pair, got {pair!r}: "
                            "pass a list of pairs, even for one request")
    return pairs


def text_list(texts: Iterable[str]) -> list[str]:
    """``texts`` as a list of strings; a single string (which would be scored character by
    character) is a TypeError."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, got a single string: pass [text]")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} must be a string, got {type(text).__name__}")
    return texts


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that stands in for an empty context: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text``'s tokens as lm-eval's ``HFLM.tok_encode`` gives them: with the tokenizer's special
    tokens, unless the text already starts with the prefix token's text, so a tokenizer that adds
    BOS does not put a second one in front of a BOS the text spells out."""
    prefix = prefix_token_id(tokenizer)
    if prefix is not None and text.startswith(tokenizer.decode(prefix)):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> TokenRequest:
    """Tokenize a request: the continuation's tokens are those of ``context + continuation`` past
    the context's own, so a word split at the boundary is tokenized as in running text. Both are
    encoded as ``encode`` does it."""
    if not (isinstance(context, str) and isinstance(continuation, str)):
        raise TypeError(f"a request is a (context, continuation) pair of strings, got ({context!r}, {continuation!r})")
    # Trailing spaces belong to the continuation: "Answer: " + "Paris" scores " Paris", and
    # "Answer: " + "" the space, as lm-eval does.
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if not continuation:
        raise ValueError("the continuation is empty: there is nothing to score")
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        # A continuation that already starts with the prefix token conditions on it.
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    context_ids = encode(tokenizer, stripped)
    whole = encode(tokenizer, stripped + continuation)
    if len(whole) <= len(context_ids):
        raise ValueError(f"the continuation {continuation!r} tokenizes to nothing after the context: "
                         f"{stripped + continuation!r} has no more tokens than {stripped!r} ({len(context_ids)}), "
                         "the continuation merged into the context's last token")
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
