"""The OpenAI wire format, as vLLM and llama.cpp serve it: request bodies (validated strictly:
wrong types and unknown fields are refused, never coerced or ignored), the error object, and the
response pieces shared by both endpoints."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_LOGPROBS = 20  # most alternatives per token, as vLLM allows
MAX_STOP_STRINGS = 16
# Settings accepted only at the value that changes nothing (chat adds its tool settings).
NO_OPS: dict[str, object] = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
                             "response_format": {"type": "text"}, "store": False, "tool_choice": "none"}


class APIError(Exception):
    """An error the client caused or must wait out, sent as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.status)


def error_body(message: str, kind: str, param: str | None = None, code: int | str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _no_op_only(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    no_op = NO_OPS[info.field_name]
    if value is not None and value != no_op:
        raise ValueError(f"only {json.dumps(no_op)} (or null) is supported, got {json.dumps(value)}")
    return value


def _null_only(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """What an assistant's reply, sent back in a conversation, carries where it had none of it."""
    if value is not None and not (value == [] and info.field_name in ("tool_calls", "annotations")):  # lists
        raise ValueError(f"only null is supported (no tools, audio, annotations or refusals are served), got "
                         f"{json.dumps(value)}")
    return value


def _null_means_default(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """OpenAI documents these fields as nullable: ``null`` asks for the default."""
    return cls.model_fields[info.field_name].default if value is None else value


def _only_with(flag: str, message: str) -> Callable[[type[BaseModel], Any, ValidationInfo], Any]:
    """A field's check that it is set only where the boolean field ``flag`` (validated before it)
    is true: a field's, not the model's, so that the error names the field."""
    def check(cls: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get(flag):
            raise ValueError(message)
        return value
    return check


def _stop_list(stop: str | list[str] | None) -> list[str]:
    """OpenAI's ``stop``, one string or several, as a list."""
    return [] if stop is None else [stop] if isinstance(stop, str) else list(stop)


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None
    _replayed = field_validator("refusal", "tool_calls", "function_call", "audio", "annotations")(_null_only)

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        """Name what is wrong: pydantic's message for a failed union speaks only of its first member."""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError("must be a string or a list of text parts")  # noqa: TRY004 -- pydantic reports ValueErrors
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"part {i} is of type {kind!r}: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} needs its text as a string")  # noqa: TRY004 -- as above
            if unknown := sorted(set(part) - {"type", "text"}):
                raise ValueError(f"part {i} has unknown or unsupported fields {unknown}")
        return content

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class GenerationRequest(_Strict):
    """What both endpoints take: the model, sampling, stopping and streaming."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)  # (NaN would fail "le=2")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; 0 and -1 disable it
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's int64
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # What OpenAI clients send where it changes nothing; accepted at those values only (NO_OPS).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: Any = None  # (Any: the no-op check names what is wrong with any other value)
    store: bool | None = None
    _nullable = field_validator("n", "stream", mode="before")(_null_means_default)
    _no_ops = field_validator("presence_penalty", "frequency_penalty", "logit_bias", "response_format", "store")(
        _no_op_only)

    _needs_stream = field_validator("stream_options")(_only_with("stream", "only allowed when stream is true"))

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = _stop_list(stop)
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} non-empty strings")
        return stop

    def stop_strings(self) -> list[str]:
        return _stop_list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def top_alternatives(self) -> int | None:
        """How many most likely alternatives each generated token's logprobs list (None: no logprobs)."""
        raise NotImplementedError


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tool_choice: Any = None  # "none" only (NO_OPS): no tools are offered
    parallel_tool_calls: bool | None = None  # without tools, it changes nothing
    _nullable_logprobs = field_validator("logprobs", mode="before")(_null_means_default)
    _no_tools = field_validator("tool_choice")(_no_op_only)

    _needs_logprobs = field_validator("top_logprobs")(_only_with("logprobs", "requires logprobs to be true"))

    @property
    def top_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("max_completion_tokens")
    @classmethod
    def _not_both(cls, max_completion_tokens: int | None, info: ValidationInfo) -> int | None:
        if max_completion_tokens is not None and info.data.get("max_tokens") is not None:
            raise ValueError("give max_completion_tokens or max_tokens, not both")
        return max_completion_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    _nullable_echo = field_validator("echo", mode="before")(_null_means_default)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[str] | list[int] | list[list[int]]) -> Any:
        if isinstance(prompt, list) and (not prompt or any(p in ("", []) for p in prompt)):
            raise ValueError("must not be empty, nor contain an empty prompt")
        return prompt

    @property
    def top_alternatives(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


def parse(model: type[_Strict], data: object) -> Any:
    """``data`` validated as ``model``, or an ``APIError`` (400) naming the first problem."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        # Drop the union-member labels pydantic puts in the location ("str", "list[int]", ...).
        path = [str(part) for part in error["loc"] if isinstance(part, int) or "[" not in part and part not in
                ("str", "int", "float", "bool")]
        param = ".".join(path) or None
        if error["type"] == "extra_forbidden":
            message = f"unknown or unsupported parameter {param!r}"
        elif error["type"] != "value_error" and (param == "prompt" or (param or "").startswith("prompt.")):
            message = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
        else:
            message = error["msg"].removeprefix("Value error, ")
            message = f"{param}: {message}" if param else message
        raise APIError(400, message, param) from None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's ``usage``; ``cached_tokens``: prompt tokens served by the radix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finite(logprob: float) -> float:
    """JSON has no infinities: a token the model rules out gets vLLM's floor instead of -inf."""
    return logprob if math.isfinite(logprob) else -9999.0
