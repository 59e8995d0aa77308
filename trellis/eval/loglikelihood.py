"""The string-level scoring API: ``loglikelihood`` and ``loglikelihood_rolling`` (perplexity)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

from trellis.eval.requests import encode, encode_pair, prefix_token_id, request_pairs, rolling_windows, text_list
from trellis.eval.scoring import max_length_for, score_continuations
from trellis.models.llama import TrellisLlama


def loglikelihood(
    model: TrellisLlama,
    tokenizer: PreTrainedTokenizerBase,
    requests: Iterable[tuple[str, str]],
    max_length: int | None = None,
    max_batch_tokens: int = 2048,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """``(log P(continuation | context), is_greedy)`` for each ``(context, continuation)`` string
    pair, tokenized as lm-evaluation-harness does (see ``requests.encode_pair``). Requests with
    the same context share one prefill; see ``score_continuations`` for the other arguments."""
    tokenized = []
    for i, (context, continuation) in enumerate(request_pairs(requests, "continuation")):
        try:
            tokenized.append(encode_pair(tokenizer, context, continuation))
        except ValueError as exc:
            raise ValueError(f"request {i}: {exc}") from None
    return score_continuations(model, tokenized, max_length, max_batch_tokens, progress)


def loglikelihood_rolling(
    model: TrellisLlama,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    max_length: int | None = None,
    max_batch_tokens: int = 2048,
    progress: bool = False,
) -> list[float]:
    """The log-likelihood of each whole text (every token scored once, in windows of at most
    ``max_length`` tokens, as lm-eval's ``loglikelihood_rolling``); an empty text scores 0. Texts
    are tokenized as ``requests.encode`` does it."""
    token_lists = [encode(tokenizer, text) for text in text_list(texts)]
    return rolling_loglikelihood(model, token_lists, prefix_token_id(tokenizer), max_length, max_batch_tokens,
                                 progress)


def rolling_loglikelihood(
    model: TrellisLlama,
    token_lists: Sequence[list[int]],
    prefix_token: int,
    max_length: int | None = None,
    max_batch_tokens: int = 2048,
    progress: bool = False,
) -> list[float]:
    """``loglikelihood_rolling`` over token ids; ``prefix_token`` conditions each first token."""
    max_length = max_length_for(model, max_length)
    windows, owners = [], []
    for i, tokens in enumerate(token_lists):
        for window in rolling_windows(tokens, prefix_token, max_length):
            windows.append(window)
            owners.append(i)
    totals = [0.0] * len(token_lists)
    for i, (logprob, _) in zip(owners, score_continuations(model, windows, max_length, max_batch_tokens, progress)):
        totals[i] += logprob
    return totals
