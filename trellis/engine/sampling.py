"""Choosing each session's next token: greedy, or sampling with temperature, top-k and top-p, or
from the scores of the session's own logits processor.

The semantics follow transformers' logits warpers (temperature, then top-k, then top-p, always
keeping the most likely token), so a request behaves as it would under ``generate()``. Sessions
without a processor (the common case) are filtered together in one batched pass; a session with
one runs it on its own row, as ``generate()`` runs its ``LogitsProcessorList``. Each session
samples from its own ``torch.Generator``: its tokens depend on its seed only, not on which other
sessions happen to share its batch. On MPS the tokens are drawn on the CPU (``draw_device``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from trellis.utils import is_int, is_positive_int, store_as_ints

# A session's logits processor, with transformers' contract: (input_ids [1, L] int64, scores [1, V]
# float32) -> scores [1, V]; it may modify ``scores`` in place.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Scores of one row from its logits: [1, V] float32 -> [1, V] (the session binds its own token ids).
RowScores = Callable[[torch.Tensor], torch.Tensor]


def draw_device(device: torch.device) -> torch.device:
    """Where the tokens of a model on ``device`` are drawn: there, except for MPS, whose
    ``torch.multinomial`` (torch <= 2.13) returns a token of probability zero about once in 220 draws
    over a large vocabulary with underflowed tails (pytorch/pytorch#192577), i.e. a token top-k or
    top-p removed. There the draws run on the CPU, from CPU generators."""
    return torch.device("cpu") if device.type == "mps" else device


# The logits are divided by the temperature in float32: below this it rounds to zero or loses precision.
MIN_TEMPERATURE = torch.finfo(torch.float32).tiny


# The warpers' settings of SamplingParams that leave the logits as they are (its defaults).
NO_WARPERS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}


@dataclass(frozen=True)
class SamplingParams:
    """How one session generates. ``top_k=0`` and ``top_p=1.0`` disable those filters."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting any of these
    seed: int | None = None  # None: drawn from torch's global RNG (so ``torch.manual_seed`` fixes it)
    # Log-probabilities under the model's own distribution (before the filters above), each with this
    # many most likely alternatives: of every generated token, and of every prompt token after the
    # first. Prompt log-probabilities need every prompt position's logits, so such a session reuses
    # no cached prefix (its blocks are still cached for later sessions).
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not is_positive_int(self.max_new_tokens):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a number, got {value!r}")
        if not isinstance(self.do_sample, bool):  # a string "False" would be true
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not self.temperature >= 0:  # (greedy decoding ignores it, but not a NaN or a sign error)
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.do_sample and not self.temperature >= MIN_TEMPERATURE:
            raise ValueError(f"temperature must be at least {MIN_TEMPERATURE:.3g} (float32's smallest normal number) "
                             f"when sampling, got {self.temperature!r}; do_sample=False decodes greedily")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 <= self.top_p <= 1:  # (0 keeps the most likely token only, as transformers' warper does)
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, (tuple, list)) or not all(
                is_int(t) and t >= 0 for t in stops):
            raise ValueError(f"stop_token_ids must be a tuple of token ids (ints >= 0), got {stops!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 0):
                raise ValueError(f"{name} must be None or a number of alternatives >= 0, got {value!r}")
        store_as_ints(self, ("max_new_tokens", "top_k", "seed", "logprobs", "prompt_logprobs"))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))  # (a list too; kept hashable)

    @classmethod
    def from_generation_config(cls, config: GenerationConfig, seed: int | None = None) -> SamplingParams:
        """The settings of a transformers ``GenerationConfig`` that decide the tokens, as ``generate()``
        reads them: the warpers' settings only when sampling (greedy search ignores them, whatever
        they are), and a ``top_p`` of 1 or more as no cut. Its ``eos_token_id`` (an int or a list;
        negative ids mean none) become the stop tokens."""
        eos = config.eos_token_id
        eos = [] if eos is None else [eos] if is_int(eos) else list(eos)
        warpers = {}
        if config.do_sample:
            warpers = {"temperature": config.temperature if config.temperature is not None else 1.0,
                       "top_k": config.top_k or 0,
                       "top_p": 1.0 if config.top_p is None or config.top_p >= 1 else config.top_p}
        return cls(
            max_new_tokens=config.max_new_tokens if config.max_new_tokens is not None else 20,
            do_sample=bool(config.do_sample),
            stop_token_ids=tuple(int(t) for t in eos if t >= 0),
            seed=seed,
            **warpers,
        )

    def make_generator(self, device: torch.device) -> torch.Generator | None:
        """The private RNG of a session on a model on ``device``, on ``draw_device(device)`` (None
        for greedy decoding, which needs none)."""
        if not self.do_sample:
            return None
        seed = self.seed if self.seed is not None else int(torch.randint(2**62, ()))
        # Modulo 2**64, as torch takes a negative seed; so any integer works (a fork's ``seed + i`` too).
        return torch.Generator(device=draw_device(device)).manual_seed(seed % 2**64)


def filter_logits(
    logits: torch.Tensor,  # [B, V]
    temperature: Sequence[float],
    top_k: Sequence[int],  # 0 = no limit
    top_p: Sequence[float],  # 1.0 = no limit
) -> torch.Tensor:
    """Temperature-scaled logits with the tokens outside each row's top-k / top-p set to -inf: each
    row as transformers' warpers leave it. A row takes generate()'s very calls on that row alone:
    a sort or cumsum over several rows may order ties or round otherwise on some devices, and a
    Python number divides otherwise than a tensor on CUDA, so the same tokens survive each cut."""
    scores = logits.float()
    rows = []
    for i, (t, k, p) in enumerate(zip(temperature, top_k, top_p)):
        row = scores[i : i + 1]  # [1, V]
        if t != 1.0:
            scaled = row / t
            # A temperature so small that the top logit overflows leaves transformers' arithmetic
            # without a distribution (inf - inf): such a row is scaled after subtracting its maximum
            # instead (the softmax is the same): its top token scales to 0, the rest towards -inf.
            row = (row - row.amax()) / t if t < 1 and bool(scaled.amax().isinf()) else scaled
        if k > 0:  # below the k-th largest value: tokens tied with it stay (more than k)
            row = row.masked_fill(row < row.topk(min(k, row.shape[-1]))[0][..., -1, None], float("-inf"))
        if p < 1:  # in ascending order a token goes while the mass up to it is at most 1 - top_p; the top stays
            ascending, order = row.sort(dim=-1)
            removed = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
            removed[..., -1:] = False
            row = row.masked_fill(removed.scatter(1, order, removed), float("-inf"))
        rows.append(row)
    return torch.cat(rows)


def sample(
    logits: torch.Tensor,  # [B, V], the last position of each session
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    row_scores: Sequence[RowScores | None] = (),  # per row, or empty: no row has a processor
) -> tuple[list[int], list[float], dict[int, str]]:
    """The next token of each row, its log-probability under the distribution it was chosen from,
    and the rows that could not choose one: row -> why (a logits processor raised, or the
    distribution to sample is undefined). A failed row costs the others nothing: every
    distribution is formed and checked before any row draws, and each row draws from its own
    generator, so the tokens of the rest are those they would have drawn without it.

    A row with ``row_scores`` takes the argmax of its scores, or (``do_sample``) samples from their
    softmax: its processor includes the warpers, so ``temperature``/``top_k``/``top_p`` of its params
    are not applied again. The other rows use ``params`` alone.
    """
    # argmax's own answer (the first maximum; a NaN wins), from the max reduction, which ATen
    # vectorises: 2-4x faster than argmax over a 49152-token vocabulary (60 against 230 us in bf16).
    tokens = logits.max(dim=-1).indices  # [B]
    logprobs = logits.float().log_softmax(dim=-1)  # [B, V]
    errors: dict[int, str] = {}
    draws: dict[int, torch.Tensor] = {}  # row -> the probabilities it samples from [V]
    processed = {i for i, scores in enumerate(row_scores) if scores is not None}
    for i in processed:
        try:
            # A copy: processors may write in place, and ``logits`` may already be float32.
            scores = row_scores[i](logits[i : i + 1].to(torch.float32, copy=True))  # [1, V]
        except Exception as exc:  # noqa: BLE001 -- the caller's code: it fails its own row only
            errors[i] = f"the logits processor failed: {exc!r}"
            continue
        if not isinstance(scores, torch.Tensor) or scores.shape != (1, logits.shape[-1]):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            errors[i] = f"the logits processor returned {shape}, not scores [1, {logits.shape[-1]}]"
            continue
        scores = scores[0].float()  # [V]
        if params[i].do_sample:
            draws[i] = scores.softmax(dim=-1)  # [V]
            logprobs[i] = draws[i].log()
        else:
            tokens[i] = scores.argmax()
            logprobs[i] = scores.log_softmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.do_sample and i not in processed]
    if sampled:
        device = logits.device
        rows = torch.tensor(sampled, device=device)  # [S]
        filtered = filter_logits(logits[rows], [params[i].temperature for i in sampled],
                                 [params[i].top_k for i in sampled], [params[i].top_p for i in sampled])  # [S, V]
        probs = filtered.softmax(dim=-1)  # [S, V]
        logprobs[rows] = probs.log()
        draws.update(zip(sampled, probs.unbind()))
    undefined = [i for i, probs in draws.items() if not torch.isfinite(probs).all()]
    for i in undefined:  # NaN, from NaN logits or an overflow (logits / temperature, or a processor's scores)
        draws.pop(i)
        errors[i] = ("the model's logits hold NaN: there is no distribution to sample from"
                     if logits[i].isnan().any() else
                     "the logits processor's scores give no distribution to sample from (all -inf, or NaN)"
                     if i in processed else
                     "the model's logits have no finite maximum (all -inf, or +inf): there is no "
                     "distribution to sample from")
    on = draw_device(logits.device)  # the device of the generators (make_generator)
    for i, probs in draws.items():
        tokens[i] = torch.multinomial(probs.to(on), 1, generator=generators[i])[0]
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]  # [B]
    return tokens.tolist(), chosen.tolist(), errors
