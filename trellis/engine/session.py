"""One generation request as the engine runs it, and the result it hands back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

from trellis.cache.manager import PagedSequence
from trellis.engine.sampling import LogitsProcessor, SamplingParams


@dataclass
class TrellisGenerationOutput(GenerationOutput):
    """transformers' ``GenerationOutput`` (so code written for its ``generate_batch`` reads it
    unchanged) plus what prefix caching changes: times in seconds, counts in tokens."""

    ttft: float = -1.0  # from submission to the first generated token (queueing + prefill)
    num_cached_tokens: int = 0  # prompt tokens served from the radix cache instead of being prefilled
    decode_time: float = 0.0  # from the first generated token to the last


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model's distribution (before temperature, top-k and
    top-p) and the ``top`` most likely tokens there, as ``(token id, log-probability)``."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(eq=False)
class Session:
    """A prompt, how to continue it, and its progress: waiting, then running (prefill, decode), then finished.

    ``seq`` is the session's paged KV sequence while it runs: admission takes the cached prefix of
    ``prompt`` and reserves blocks for every token the session may still compute. A long prompt
    enters ``seq`` chunk by chunk (chunked prefill): the session is ``PREFILLING`` until all of it is
    computed. ``logits_processor`` (optional) is this session's own: it sees the session's tokens only.
    ``forks`` are the other choices of an ``n > 1`` request: they start as forks of this session
    once its prompt is computed, sharing its blocks.
    """

    request_id: str
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    logits_processor: LogitsProcessor | None = None
    seq: PagedSequence | None = None
    status: RequestStatus = RequestStatus.PENDING
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # perf_counter() when each token was chosen
    created_time: float = field(default_factory=time.perf_counter)
    admitted_time: float = -1.0
    finished_time: float = -1.0
    num_cached_tokens: int = 0
    error: str | None = None
    finish_reason: str | None = None  # "stop" (a stop token), "length", "cancelled" or "error"
    cancel_requested: bool = False  # set by Engine.cancel from any thread; honoured at the next step
    forks: list[Session] = field(default_factory=list)
    overtaken: int = 0  # sessions admitted ahead of this one while it waited (fair admission)
    token_logprobs: list[TokenLogprobs] = field(default_factory=list)  # per generated token, if params.logprobs
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1.., if params.prompt_logprobs

    @property
    def done(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.FAILED)

    @property
    def kv_tokens(self) -> int:
        """Tokens whose K/V the session may compute: the prompt and all but its last generated token."""
        return len(self.prompt) + self.params.max_new_tokens - 1

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.created_time if self.token_times else -1.0

    @property
    def decode_time(self) -> float:
        return self.token_times[-1] - self.token_times[0] if self.token_times else 0.0

    def process_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits_processor`` on this session's logits [1, V], given the prompt and every token generated
        so far, as ``generate()`` calls it on an unpadded row."""
        input_ids = torch.tensor([self.prompt + self.generated], device=logits.device)  # [1, L]
        return self.logits_processor(input_ids, logits)

    def add_token(self, token: int, logprob: float, now: float) -> bool:
        """Record a generated token; True when the session is done (stop token or token budget)."""
        self.generated.append(token)
        self.logprobs.append(logprob)
        self.token_times.append(now)
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.generated) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def to_output(self, record_timestamps: bool = False, return_logprobs: bool = False) -> TrellisGenerationOutput:
        return TrellisGenerationOutput(
            request_id=self.request_id,
            prompt_ids=list(self.prompt),
            generated_tokens=list(self.generated),
            logprobs=list(self.logprobs) if return_logprobs else [],
            error=self.error,
            status=self.status,
            created_time=self.created_time,
            lifespan=(self.admitted_time, self.finished_time),
            timestamps=list(self.token_times) if record_timestamps else None,
            ttft=self.ttft,
            num_cached_tokens=self.num_cached_tokens,
            decode_time=self.decode_time,
        )
