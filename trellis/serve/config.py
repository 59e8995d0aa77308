"""The server's settings: who may call it, and the limits that keep one client from taking it over."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Limits and engine settings of one server.

    ``max_batch_tokens`` is the engine's per-step token budget: a longer prompt is prefilled in
    chunks, so on a CPU a small budget keeps the running streams' inter-token latency low.
    Admission reserves blocks for ``max_tokens`` of every request up front, so chat requests that
    give no ``max_tokens`` get ``default_max_tokens`` rather than the whole context (never more
    than ``max_tokens``, nor than the KV pool can hold).
    """

    model_name: str = "trellis"
    api_key: str | None = None  # clients send it as ``Authorization: Bearer <key>``
    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int = 1 << 20  # further bounded by the model's context
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # chat requests without max_tokens (completions default to OpenAI's 16)
    max_n: int = 8
    max_batch_tokens: int = 512
    max_running: int = 64
    max_waiting: int = 256  # queued requests beyond the running ones; more get 503 with Retry-After

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "default_max_tokens", "max_n",
                     "max_batch_tokens", "max_running", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (None: no key)")
