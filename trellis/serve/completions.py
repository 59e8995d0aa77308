"""``/v1/chat/completions`` and ``/v1/completions``: a request's prompts go to the engine, its
choices come back as one JSON response or as server-sent events.

A request is a ``_Job``: its prompts (one for chat; one or more for completions), each run with
``n`` choices (the engine forks them from the computed prompt), all delivering ``ChoiceEvent``s to
one queue. Each choice turns its tokens into text with a ``TextStream``, which also finds stop
strings: the choice then ends (``finish_reason: "stop"``) and its session is cancelled. If the
client goes away, or the handler is cancelled, every unfinished session is cancelled.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from starlette.requests import Request
from transformers import PreTrainedTokenizerBase

from trellis.cache.block_pool import OutOfBlocksError
from trellis.engine import QueueFullError, SamplingParams, TokenLogprobs
from trellis.engine.sampling import MIN_TEMPERATURE
from trellis.serve.bridge import ChoiceEvent, EngineBridge, RequestHandle
from trellis.serve.config import ServeConfig
from trellis.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest, finite, usage
from trellis.serve.text import TextStream, TokenBytes

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
T = TypeVar("T")


@dataclass(eq=False)
class _Choice:
    index: int
    prompt: int  # index of its prompt in the request
    handle: RequestHandle
    session: int  # index into handle.sessions
    text: TextStream
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] | None = None
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False  # its session was cancelled before it finished (the client went away)


@dataclass(eq=False)
class _Job:
    id: str
    created: int
    prompts: list[list[int]]
    queue: asyncio.Queue[ChoiceEvent | None]
    choices: list[_Choice] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self, n: int) -> dict[str, Any]:
        leaders = self.choices[::n]  # one per prompt: the prompt is computed once for its n choices
        return usage(sum(len(p) for p in self.prompts), sum(c.text.num_tokens for c in self.choices),
                     sum(c.cached_tokens for c in leaders))


class CompletionService:
    """Runs chat and text completions through ``bridge``."""

    def __init__(self, bridge: EngineBridge, tokenizer: PreTrainedTokenizerBase, config: ServeConfig,
                 stop_token_ids: Sequence[int], context_length: int) -> None:
        self.bridge, self.tokenizer, self.config = bridge, tokenizer, config
        self.token_bytes = TokenBytes(tokenizer)
        self.metrics = bridge.metrics
        self.stop_token_ids = tuple(stop_token_ids)
        self.context_length = context_length
        # Prompts are tokenized (and echoed prompts decoded, and whole answers' log-probabilities
        # listed) on one worker thread, off the event loop: a 4 MiB prompt takes seconds, an echoed
        # one's log-probabilities a token each, and other clients' streams and /health go on meanwhile.
        # One thread: a fast tokenizer may refuse calls from two at once ("Already borrowed").
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trellis-tokenize")

    def close(self) -> None:
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def _tokenizer_work(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, work)

    # --- the two endpoints ----------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request) -> dict[str, Any] | AsyncIterator[str]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = await self._tokenizer_work(lambda: list(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=True)["input_ids"]))
        except Exception as exc:  # noqa: BLE001 -- no template, or one that refuses these messages
            raise APIError(400, f"the chat template cannot render these messages: {exc}", "messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = req.top_alternatives
        job = self._start("chatcmpl", [prompt], req, max_tokens, self.config.default_max_tokens, top, None)
        if req.stream:
            return self._stream(job, req, request, chat=True, echo=[])
        await self._collect(job, request)
        logprobs = await self._tokenizer_work(lambda: [self._chat_logprobs(c.logprobs) for c in job.choices]) \
            if top is not None else [None] * len(job.choices)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text.text},
                    "logprobs": None if lp is None else {"content": lp}, "finish_reason": c.finish_reason}
                   for c, lp in zip(job.choices, logprobs, strict=True)]
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": self.config.model_name,
                "choices": choices, "usage": job.usage(req.n)}

    async def complete(self, req: CompletionRequest, request: Request) -> dict[str, Any] | AsyncIterator[str]:
        try:
            prompts = await self._tokenizer_work(lambda: [self.tokenizer(p)["input_ids"] if isinstance(p, str)
                                                          else list(p) for p in req.prompts()])
        except Exception as exc:  # noqa: BLE001 -- text the tokenizer refuses (a lone UTF-16 surrogate)
            raise APIError(400, f"the prompt cannot be tokenized: {exc}", "prompt") from None
        echo = await self._tokenizer_work(lambda: [p if isinstance(p, str) else self.tokenizer.decode(p)
                                                   for p in req.prompts()]) if req.echo else []
        prompt_top = req.logprobs if req.echo else None
        job = self._start("cmpl", prompts, req, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS, req.top_alternatives,
                          prompt_top)
        if req.stream:
            return self._stream(job, req, request, chat=False, echo=echo)
        await self._collect(job, request)
        logprobs = await self._tokenizer_work(lambda: [self._text_logprobs(
            (self._prompt_entries(job, c) if req.echo else []) + list(c.logprobs)) for c in job.choices]) \
            if req.logprobs is not None else [None] * len(job.choices)
        choices = [{"index": c.index, "text": (echo[c.prompt] if echo else "") + c.text.text, "logprobs": lp,
                    "finish_reason": c.finish_reason} for c, lp in zip(job.choices, logprobs, strict=True)]
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": self.config.model_name,
                "choices": choices, "usage": job.usage(req.n)}

    # --- starting a job -------------------------------------------------------------------

    def _start(self, prefix: str, prompts: list[list[int]], req: GenerationRequest, max_tokens: int | None,
               default_max_tokens: int, top: int | None, prompt_top: int | None) -> _Job:
        config = self.config
        failure = self.bridge.engine.runner.failure
        if failure is not None:  # a grid that lost a stage: the server stops shortly
            raise APIError(503, f"the model can serve nothing more: {failure}", kind="server_unavailable")
        if req.model is not None and req.model != config.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {config.model_name!r}",
                           "model", "not_found_error")
        if len(prompts) > config.max_waiting:
            raise APIError(400, f"prompt: at most {config.max_waiting} prompts per request", "prompt")
        max_n = min(config.max_n, config.max_running)  # one prompt's choices run at once
        if req.n > max_n:
            raise APIError(400, f"n: at most {max_n} choices per prompt", "n")
        prompt_name = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"  # where the prompt came from
        # The name the client used for the limit (chat takes either).
        limit_name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
        if max_tokens is not None and max_tokens > config.max_tokens:
            raise APIError(400, f"{limit_name} {max_tokens} exceeds this server's limit of {config.max_tokens}",
                           limit_name)
        if req.temperature and req.temperature < MIN_TEMPERATURE:  # SamplingParams' own message speaks Python
            raise APIError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:.3g}, got "
                           f"{req.temperature!r}", "temperature")
        default_max_tokens = min(default_max_tokens, config.max_tokens)  # the server's own limit binds its default
        stops = req.stop_strings()
        temperature = 1.0 if req.temperature is None else req.temperature
        requests = []
        for prompt in prompts:  # every prompt is checked before any is queued
            if not prompt:
                raise APIError(400, "cannot generate from an empty prompt", prompt_name)
            if len(prompt) > config.max_prompt_tokens:
                raise APIError(400, f"the prompt has {len(prompt)} tokens, more than this server's limit of "
                               f"{config.max_prompt_tokens}", prompt_name)
            if len(prompt) >= self.context_length:
                raise APIError(400, f"the prompt has {len(prompt)} tokens, which leaves no room for an answer in the "
                               f"model's context of {self.context_length} tokens", prompt_name)
            try:
                self.bridge.engine.runner.check_token_ids([prompt])
            except ValueError as exc:
                raise APIError(400, str(exc), prompt_name) from None
            if max_tokens is not None and len(prompt) + max_tokens - 1 > self.context_length:
                raise APIError(400, f"{limit_name} {max_tokens} after a prompt of {len(prompt)} tokens exceeds the "
                               f"model's context of {self.context_length} tokens", limit_name)
            params = SamplingParams(
                max_new_tokens=self._max_new_tokens(prompt, req.n, max_tokens, limit_name, default_max_tokens,
                                                    prompt_name),
                do_sample=temperature > 0, temperature=temperature or 1.0,
                top_k=max(req.top_k or 0, 0), top_p=1.0 if req.top_p is None else req.top_p,
                stop_token_ids=self.stop_token_ids, seed=req.seed, logprobs=top, prompt_logprobs=prompt_top)
            requests.append((prompt, params))
        queue: asyncio.Queue[ChoiceEvent | None] = asyncio.Queue()
        job = _Job(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), prompts, queue)
        try:
            handles = self.bridge.submit(requests, req.n, queue)  # all or none
        except Exception as exc:  # noqa: BLE001 -- each refusal becomes its HTTP error
            raise _api_error(exc) from None
        for p, (prompt, handle) in enumerate(zip(prompts, handles)):
            job.choices += [_Choice(p * req.n + i, p, handle, i, TextStream(self.tokenizer, stops, prompt))
                            for i in range(req.n)]
        return job

    def _max_new_tokens(self, prompt: list[int], n: int, max_tokens: int | None, limit_name: str,
                        default_max_tokens: int, prompt_name: str) -> int:
        """The client's limit, or without one the default cut to what the context and the KV pool can
        hold; a 400 naming what is at fault (the prompt, ``n`` or the limit the client named) if the
        pool could never hold the request, whose whole answer admission reserves up front."""
        engine = self.bridge.engine
        cache = engine.runner.prefix_cache
        pool = (f"this server's KV cache ({cache.pool.num_blocks} blocks of {cache.block_size} tokens; the "
                "server's --num-blocks / --kv-cache-memory)")
        if engine.most_new_tokens(len(prompt)) < 1:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, more than {pool} can hold", prompt_name)
        room = engine.most_new_tokens(len(prompt), n)
        if room < 1:  # each choice takes its own copy of the prompt's partial last block
            raise APIError(400, f"n: {n} choices after a prompt of {len(prompt)} tokens need more than {pool} can "
                           "hold", "n")
        if max_tokens is None:
            return min(default_max_tokens, self.context_length - len(prompt), room)
        if max_tokens > room:
            choices = f" in {n} choices" if n > 1 else ""
            raise APIError(400, f"{limit_name} {max_tokens} after a prompt of {len(prompt)} tokens{choices} needs "
                           f"more than {pool} can hold: at most {room} here", limit_name)
        return max_tokens

    # --- results --------------------------------------------------------------------------

    def _apply(self, job: _Job, event: ChoiceEvent) -> tuple[_Choice, str, list[TokenLogprobs]]:
        """Take one event; the choice, the text it releases and the log-probabilities of its tokens."""
        choice = job.choices[event.choice]
        choice.cached_tokens = event.cached_tokens
        if event.prompt_logprobs is not None:
            choice.prompt_logprobs = event.prompt_logprobs
        if choice.finish_reason is not None:
            return choice, "", []  # tokens the engine made before it saw our cancel
        before = choice.text.num_tokens
        text = choice.text.add(event.tokens)
        logprobs = event.logprobs[: choice.text.num_tokens - before]
        choice.logprobs += logprobs
        if choice.text.stopped:
            choice.finish_reason = "stop"
            self.bridge.cancel(choice.handle, choice.session)
        elif event.finish_reason in ("stop", "length"):
            text += choice.text.finish()
            choice.finish_reason = event.finish_reason
        elif event.finish_reason is not None:  # failed, or cancelled by someone else (the server stopping)
            choice.finish_reason = "error"
            choice.error = event.error or f"the request ended early ({event.finish_reason})"
        if choice.finish_reason is not None and self.metrics and not choice.cancelled:  # (_cancel counted it)
            self.metrics.choice_finished(choice.finish_reason)
        return choice, text, logprobs

    async def _collect(self, job: _Job, request: Request) -> None:
        watcher = asyncio.create_task(self._watch_disconnect(job, request))
        try:
            while not job.finished:
                event = await job.queue.get()
                if event is None:  # nobody will read the answer; nginx's code for it
                    raise APIError(499, "the client closed the request", kind="client_closed_request")
                if self._apply(job, event)[0].error:
                    break  # the answer is an error now: the other choices stop (below) rather than run on
        finally:
            watcher.cancel()
            self._cancel(job)
        errors = [c.error for c in job.choices if c.error]
        if errors:
            raise APIError(500, f"the request failed: {errors[0]}", kind="server_error")

    async def _stream(self, job: _Job, req: GenerationRequest, request: Request, chat: bool,
                      echo: list[str]) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        top = req.top_alternatives

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
            body = {"id": job.id, "object": kind, "created": job.created, "model": self.config.model_name,
                    "choices": choices}
            if req.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        watcher = asyncio.create_task(self._watch_disconnect(job, request))
        opened: set[int] = set()  # choices whose first chunk went out
        offsets: dict[int, int] = {}  # per choice, the text_offset its next token starts at
        try:
            if chat:
                yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for c in job.choices])
            while not job.finished:
                event = await job.queue.get()
                if event is None:
                    return  # the client went away
                done = job.choices[event.choice].finish_reason is not None  # its last chunk went out
                c, text, logprobs = self._apply(job, event)
                if done:
                    continue
                entries: list[TokenLogprobs | int] = list(logprobs)
                if echo and c.index not in opened:  # the echoed prompt opens the choice's text
                    text = echo[c.prompt] + text
                    entries = self._prompt_entries(job, c) + entries
                opened.add(c.index)
                if c.error:  # the answer is an error now: the other choices stop, and the stream ends
                    self._cancel(job)
                    yield f"data: {json.dumps(APIError(500, c.error, kind='server_error').body())}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if not text and not (entries and top is not None) and c.finish_reason is None:
                    continue
                lp = None
                if top is not None and entries:
                    if chat:
                        lp = {"content": self._chat_logprobs(logprobs)}
                    else:
                        listing = partial(self._text_logprobs, entries, offsets.get(c.index, 0))
                        # The echoed prompt's entries too: a decode per token, off the loop.
                        lp = await self._tokenizer_work(listing) if len(entries) > len(logprobs) else listing()
                        offsets[c.index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                body = {"delta": {"content": text} if text else {}} if chat else {"text": text}
                yield chunk([{"index": c.index, **body, "logprobs": lp, "finish_reason": c.finish_reason}])
            if req.include_usage:
                yield chunk([], job.usage(req.n))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self._cancel(job)

    async def _watch_disconnect(self, job: _Job, request: Request) -> None:
        """Cancel the job's sessions as soon as the client disconnects."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._cancel(job)
        job.queue.put_nowait(None)

    def _cancel(self, job: _Job) -> None:
        """Cancel the job's unfinished choices, counted as cancelled in the metrics."""
        for c in job.choices:
            if c.finish_reason is None and not c.cancelled:
                c.cancelled = True
                self.bridge.cancel(c.handle, c.session)
                if self.metrics:
                    self.metrics.choice_finished("cancelled")

    # --- log-probabilities in OpenAI's two formats ----------------------------------------

    def _prompt_entries(self, job: _Job, c: _Choice) -> list[TokenLogprobs | int]:
        """The echoed prompt's entries: its first token (an id: it has no log-probability), then the scored ones."""
        return [job.prompts[c.prompt][0], *(c.prompt_logprobs or [])]

    def _chat_logprobs(self, entries: list[TokenLogprobs]) -> list[dict[str, Any]]:
        out = []
        for e in entries:
            top = [{"token": self.token_bytes.text(token), "logprob": finite(lp), "bytes": list(self.token_bytes(token))}
                   for token, lp in e.top]
            out.append({"token": self.token_bytes.text(e.token), "logprob": finite(e.logprob),
                        "bytes": list(self.token_bytes(e.token)), "top_logprobs": top})
        return out

    def _text_logprobs(self, entries: Sequence[TokenLogprobs | int], offset: int = 0) -> dict[str, Any]:
        """The completions format; an entry that is a bare token id has no log-probability.
        ``offset``: the first entry's ``text_offset`` (a stream's chunks continue the text)."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for e in entries:
            text = self.token_bytes.text(e if isinstance(e, int) else e.token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if isinstance(e, int):
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(finite(e.logprob))
            # As vLLM: the chosen token is listed too, even when it is not among the most likely.
            top = {self.token_bytes.text(t): finite(lp) for t, lp in e.top}
            top.setdefault(text, finite(e.logprob))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}


def _api_error(exc: Exception) -> Exception:
    """What a refused submission means for the client."""
    if isinstance(exc, QueueFullError):
        return APIError(503, f"the server is at capacity: {exc}", kind="server_overloaded",
                        headers={"Retry-After": "1"})
    if isinstance(exc, OutOfBlocksError):  # (the pool was resized since _max_new_tokens looked)
        return APIError(400, "the request needs more than this server's KV cache can ever hold")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if isinstance(exc, RuntimeError) and not isinstance(exc, APIError):
        return APIError(503, f"the server cannot take requests now: {exc}", kind="server_unavailable",
                        headers={"Retry-After": "1"})
    return exc
