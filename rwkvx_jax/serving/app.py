"""The HTTP app: OpenAI-compatible routes over a `Service` (FastAPI, the `serve` extra).

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with `stream: true` as server-sent events ending in `data: [DONE]`), POST /v1/states (save the
state after a prompt under a name), GET /metrics (Prometheus text). Bodies are read and checked
by `protocol`, so malformed JSON and wrong types are OpenAI-style 400s rather than FastAPI's
422s; any other failure of one request is a 500 with an error body, never the server's end.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from rwkvx_jax.serving.protocol import (
    ApiError,
    GenerationParams,
    error_body,
    parse_generation,
    parse_state_request,
)
from rwkvx_jax.serving.service import Outcome, Service

# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.1


async def _json_body(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None


def _sse(payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _choice(chat: bool, text: str, finish_reason: str | None, *, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if delta:
        body = {"role": "assistant", "content": text} if text else {}
        return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish_reason}
    message = {"role": "assistant", "content": text}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}


async def _text_until_done(
    service: Service, params: GenerationParams, outcome: Outcome, request: Request
) -> str:
    """The whole text; a client that goes away cancels the generation."""

    async def collect():
        return "".join([delta async for delta in service.generate(params, outcome)])

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError("the client disconnected")


def create_app(service: Service) -> FastAPI:
    """The app serving `service`."""
    app = FastAPI(title="rwkvx-jax", docs_url=None, redoc_url=None, openapi_url=None)
    model = service.model_name

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        service.metrics.add("rwkvx_request_errors_total")
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def internal_error(_request, err: Exception):
        service.metrics.add("rwkvx_request_errors_total")
        message = f"the request failed: {type(err).__name__}: {err}"
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        card = {"id": model, "object": "model", "created": service.created, "owned_by": "rwkvx"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    async def generation(request: Request, chat: bool):
        params = parse_generation(await _json_body(request), chat=chat, model=model)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        outcome = Outcome()
        if not params.stream:
            text = await _text_until_done(service, params, outcome, request)
            choice = _choice(chat, text, outcome.finish_reason, delta=False)
            return {**head, "choices": [choice], "usage": outcome.usage()}
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        deltas = service.generate(params, outcome)
        # Refusals (queue full, unknown state) must be HTTP errors, not a broken stream: start
        # the generation before answering.
        first = await anext(deltas, None)
        return StreamingResponse(
            _events(head, chat, params, outcome, first, deltas), media_type="text/event-stream"
        )

    async def _events(head, chat, params, outcome, first, deltas) -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield _sse({**head, "choices": [_choice(chat, first, None, delta=True)]})
            async for delta in deltas:
                yield _sse({**head, "choices": [_choice(chat, delta, None, delta=True)]})
        except Exception as err:  # noqa: BLE001 - headers are sent: report in the stream
            yield _sse(error_body(f"{type(err).__name__}: {err}", "server_error"))
            return
        finally:
            await deltas.aclose()
        yield _sse({**head, "choices": [_choice(chat, "", outcome.finish_reason, delta=True)]})
        if params.include_usage:
            yield _sse({**head, "choices": [], "usage": outcome.usage()})
        yield _sse("[DONE]")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation(request, chat=True)

    @app.post("/v1/states")
    async def save_state(request: Request):
        name, prompt, base = parse_state_request(await _json_body(request))
        return await service.save_state(name, prompt, base)

    return app
