"""The FastAPI app: an OpenAI-compatible HTTP API in front of one engine.

``create_app(model, tokenizer, config)`` builds it around a loaded ``TrellisLlama``; the engine
thread starts with the app (its lifespan) and stops with it, failing whatever is unfinished.
Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (and
``/v1/models/{model}``), ``GET /health``, ``GET /metrics``. Errors use OpenAI's error object.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from transformers import PreTrainedTokenizerBase

from trellis.engine import Engine, SamplingParams
from trellis.runner import runner_of
from trellis.serve.bridge import EngineBridge
from trellis.serve.completions import CompletionService
from trellis.serve.config import ServeConfig
from trellis.serve.metrics import ServerMetrics
from trellis.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body, parse

log = logging.getLogger("trellis.serve")

BODY_POLL_S = 0.25  # how often a request whose body is still arriving checks that the server is not closing


def create_app(model: object, tokenizer: PreTrainedTokenizerBase, config: ServeConfig | None = None) -> FastAPI:
    """An app serving ``model`` (a ``TrellisLlama``) with ``tokenizer``; ``app.state`` holds its
    ``engine``, ``bridge`` and ``metrics``."""
    config = config or ServeConfig()
    runner = runner_of(model)
    engine = Engine(runner, config.max_batch_tokens, config.max_running, config.max_waiting)
    metrics = ServerMetrics(engine)
    bridge = EngineBridge(engine, metrics)
    stop_ids = set(SamplingParams.from_generation_config(runner.model.generation_config).stop_token_ids)
    if tokenizer.eos_token_id is not None:
        stop_ids.add(tokenizer.eos_token_id)
    service = CompletionService(bridge, tokenizer, config, sorted(stop_ids), runner.max_positions())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bridge.start()
        try:
            yield
        finally:
            await asyncio.to_thread(bridge.close)  # the last step ends off the event loop
            service.close()

    app = FastAPI(title="Trellis", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.bridge, app.state.metrics, app.state.config = engine, bridge, metrics, config
    # Set by the server shortly before shutdown's grace period ends: a body still arriving is refused.
    app.state.closing = closing = threading.Event()

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=exc.status_code),
                            exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {exc!r}", "server_error", code=500), 500)

    async def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                           kind="authentication_error")

    async def read_body(request: Request) -> bytes:
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > config.max_body_bytes:
                    raise APIError(413, f"the request body exceeds this server's limit of {config.max_body_bytes} "
                                   "bytes")
        except ClientDisconnect:  # gone before its body was whole: not the server's failure
            raise APIError(499, "the client closed the request", kind="client_closed_request") from None
        return bytes(body)

    async def read_json(request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise APIError(413, f"the request body ({declared} bytes) exceeds this server's limit of "
                           f"{config.max_body_bytes} bytes")
        reading = asyncio.ensure_future(read_body(request))
        try:
            while not (await asyncio.wait({reading}, timeout=BODY_POLL_S))[0]:
                if closing.is_set():
                    raise APIError(503, "the server is shutting down", kind="server_unavailable",
                                   headers={"Retry-After": "1"})
        finally:
            reading.cancel()  # (nothing to cancel once it is done)
        body = reading.result()
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # (JSONDecodeError, UnicodeDecodeError; an int of >4300 digits)
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None
        try:
            json.dumps(data, ensure_ascii=False).encode()  # JSON escapes half a UTF-16 pair ("\ud800") too
        except UnicodeEncodeError as exc:
            surrogate = ascii(exc.object[exc.start])[1:-1]
            raise APIError(400, f"the request body holds a lone UTF-16 surrogate ({surrogate}), half of a pair: not "
                           "Unicode text") from None
        return data

    def respond(result: dict | AsyncIterator[str]) -> Response:
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request) -> Response:
        return respond(await service.chat(parse(ChatCompletionRequest, await read_json(request)), request))

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request) -> Response:
        return respond(await service.complete(parse(CompletionRequest, await read_json(request)), request))

    created = int(time.time())

    card = {"id": config.model_name, "object": "model", "created": created, "owned_by": "trellis",
            "max_model_len": service.context_length}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(authorized)])
    async def model(model: str) -> dict:
        if model != config.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {config.model_name!r}",
                           "model", "not_found_error")
        return card

    @app.get("/health")
    async def health() -> Response:
        if not bridge.ready:
            return JSONResponse({"status": "unavailable"}, 503)
        if bridge.engine.runner.failure is not None:  # a grid that lost a stage
            return JSONResponse({"status": "failed", "error": bridge.engine.runner.failure}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
