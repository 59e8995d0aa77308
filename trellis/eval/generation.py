"""``generate_until``: completions cut at stop strings, as lm-evaluation-harness asks for them.

Generation goes through ``TrellisLlama.generate``, so prompts that share a prefix (a few-shot
preamble) take it from the radix cache instead of prefilling it again.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from trellis.eval.requests import encode, request_pairs
from trellis.eval.scoring import max_length_for
from trellis.models.llama import TrellisLlama
from trellis.utils import is_positive_int

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default
# The names lm-eval takes for the number of new tokens, the first given winning (its normalize_gen_kwargs).
MAX_GEN_TOKS_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def generate_until(
    model: TrellisLlama,
    tokenizer: PreTrainedTokenizerBase,
    requests: Iterable[tuple[str, dict]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[str]:
    """A completion for each ``(context, gen_kwargs)`` request, cut before its first stop string.

    ``gen_kwargs`` as lm-eval writes them: ``until`` (a stop string or a list of them),
    ``max_gen_toks`` (default 256; or, as lm-eval takes them, the first given of
    ``max_new_tokens``, ``max_tokens``, ``max_completion_tokens``), and any ``generate()`` argument. Decoding is greedy unless
    ``do_sample`` is true or a positive ``temperature`` is given. A context longer than
    ``max_length - max_gen_toks`` tokens loses tokens on the left. Contexts are tokenized as
    ``requests.encode`` does it.
    """
    if not is_positive_int(batch_size):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    requests = request_pairs(requests, "gen_kwargs")
    max_length = max_length_for(model, max_length)
    completions = [""] * len(requests)
    by_kwargs: dict[str, list[int]] = {}
    for i, (_, gen_kwargs) in enumerate(requests):
        if not isinstance(gen_kwargs, dict):
            raise TypeError(f"request {i}'s gen_kwargs must be a dict (lm-eval's: until, max_gen_toks, ...), "
                            f"got {gen_kwargs!r}")
        by_kwargs.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
    with tqdm(total=len(requests), desc="generating", disable=not progress) as bar:
        for indices in by_kwargs.values():
            kwargs = dict(requests[indices[0]][1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if not all(isinstance(stop, str) for stop in until):
                raise TypeError(f"until must be a string or a list of strings, got {until!r}")
            limits = {name: kwargs.pop(name, None) for name in MAX_GEN_TOKS_ALIASES}
            name, max_new = next(((n, v) for n, v in limits.items() if v is not None),
                                 ("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if isinstance(max_new, float) and max_new.is_integer():  # (lm-eval's YAML may give 32.0)
                max_new = int(max_new)
            if not is_positive_int(max_new):
                raise ValueError(f"{name} must be a positive integer, got {max_new!r}")
            if max_new >= max_length:
                raise ValueError(f"{name} {max_new} leaves no room for a context in max_length {max_length}")
            temperature = kwargs.get("temperature", 0.0)
            if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
                raise TypeError(f"temperature must be a number, got {temperature!r}")
            kwargs.setdefault("do_sample", temperature > 0)
            if not kwargs["do_sample"]:
                kwargs.pop("temperature", None)
            # Longest first: rows of similar length pad less.
            indices.sort(key=lambda i: -len(requests[i][0]))
            for start in range(0, len(indices), batch_size):
                batch = indices[start:start + batch_size]
                rows = [encode(tokenizer, requests[i][0])[-(max_length - max_new):] for i in batch]
                for i, row in zip(batch, rows):
                    if not row:
                        raise ValueError(f"request {i}: the context is empty: there is nothing to generate from")
                output, width = _generate(model, tokenizer, rows, max_new, until, kwargs)
                for i, row in zip(batch, output[:, width:]):
                    completions[i] = _cut(tokenizer.decode(row, skip_special_tokens=True), until)
                bar.update(len(batch))
    return completions


def _generate(model: TrellisLlama, tokenizer: PreTrainedTokenizerBase, rows: list[list[int]], max_new: int,
              until: list[str], kwargs: dict) -> tuple[torch.Tensor, int]:
    """Left-pad ``rows`` and generate; returns the output ids and the padded prompt width."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], device=model.device)  # [B, S]
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=model.device)  # [B, S]
    stops = StoppingCriteriaList([StopInGeneratedText(tokenizer, until, width)] if until else [])
    output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad,
                            stopping_criteria=stops, **kwargs)
    return output, width


class StopInGeneratedText(StoppingCriteria):
    """Rows whose generated text (from ``width`` on) holds a stop string, as lm-eval looks for them.
    (transformers' ``stop_strings`` match the context's end too: a context ending in "\n" would
    stop at the first "\n" generated where ``until`` holds "\n\n".)"""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, until: list[str], width: int) -> None:
        self.tokenizer, self.until, self.width = tokenizer, [stop for stop in until if stop], width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width:])
        return torch.tensor([any(stop in text for stop in self.until) for text in texts], device=input_ids.device)


def _cut(text: str, until: list[str]) -> str:
    """The text before the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
