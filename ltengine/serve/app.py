"""HTTP handlers: one per endpoint. They validate and translate; the engine loop does the work.

    POST /v1/completions, POST /v1/chat/completions   (JSON, or SSE with "stream": true)
    GET  /v1/models, GET /health, GET /metrics

Every client error is a 4xx with an OpenAI error body ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import LazyConfig
from . import protocol as P
from .loop import EngineLoop, Overloaded, ShuttingDown
from .metrics import ServerMetrics

log = logging.getLogger("ltengine.serve")
MAX_BODY_BYTES = 4 << 20  # 4 MiB: a 128k-token prompt as token ids is ~1 MiB of JSON


def create_app(loop: EngineLoop, metrics: ServerMetrics, model_names: list[str], lazy: LazyConfig | None,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               retry_after_s: int = 1) -> FastAPI:
    """The ASGI app over a (not yet started) engine loop; the app's lifespan starts and stops it."""
    created = int(time.time())
    base_lazy = lazy if lazy is not None else LazyConfig(fraction=0.0)

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        try:
            yield
        finally:  # uvicorn has drained (or cancelled) the in-flight requests by now
            loop.shutdown()

    app = FastAPI(title="ltengine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(P.APIError)
    async def _api_error(request, exc: P.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            message, param = f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".strip(), None
        elif err.get("type") == "missing":
            message = f"'{param}' is a required field" if param else "the request body is missing"
        else:
            message = f"{param or 'body'}: {err.get('msg', 'invalid value')}"
            if "input" in err and not isinstance(err["input"], (dict, list)):
                message += f" (got {err['input']!r:.60})"
        return JSONResponse(P.error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(P.error_body(message, kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    # ------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        if not loop.alive:
            return JSONResponse(P.error_body("the engine loop is not running", "server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return P.model_list(model_names[:1], created)

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        return await _serve(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        return await _serve(request, body, chat=True)

    # ------------------------------------------------------------------ the shared path
    async def _serve(request: Request, body, chat: bool):
        if body.model not in model_names:
            raise P.APIError(404, f"the model {body.model!r} does not exist; this server serves {model_names[0]!r}",
                             "not_found_error", "model", "model_not_found")
        try:
            body.check_supported()
            lazy = body.lazy_config(base_lazy)
            max_tokens = body.max_new_tokens if chat else body.max_tokens
            params = body.sampling(max_tokens or 1)
            prompt = None if chat else body.single_prompt()
            messages = [m.as_template() for m in body.messages] if chat else None
        except P.UnsupportedField as e:
            raise P.APIError(400, str(e), param=e.param) from None
        except ValueError as e:  # SamplingParams' own checks
            raise P.APIError(400, str(e)) from None
        try:
            handle = await loop.submit(prompt, messages, params=params, max_tokens=max_tokens, lazy=lazy)
        except Overloaded as e:
            metrics.rejected.labels("overloaded").inc()
            raise P.APIError(503, f"the server is overloaded ({e}); retry later", "server_overloaded",
                             code="server_overloaded", headers={"Retry-After": str(retry_after_s)}) from None
        except ShuttingDown as e:
            raise P.APIError(503, str(e), "server_unavailable", headers={"Retry-After": str(retry_after_s)}) from None
        except ValueError as e:  # the engine's validation: context length, budget, token ids, lazy config
            metrics.rejected.labels("invalid").inc()
            raise P.APIError(400, str(e), param="messages" if chat else "prompt") from None
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        name = body.model
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _SSE(handle, _sse(handle, rid, name, chat, include_usage))
        return await _complete(request, handle, rid, name, chat)

    async def _complete(request: Request, handle, rid: str, name: str, chat: bool):
        """Collect the whole answer; a client that disconnects meanwhile aborts the request."""
        async def collect():
            async for ev in handle:
                if ev.finished:
                    return ev.output

        result = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
            handle.close()
        if not result.done() or result.cancelled():
            return Response(status_code=499)  # nobody is listening
        out = result.result()
        if out.finish_reason == "error":
            raise P.APIError(500, f"the request failed in the engine: {out.error}", "server_error")
        return P.completion_response(rid, name, out, chat)

    async def _sse(handle, rid: str, name: str, chat: bool, include_usage: bool):
        def data(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        if chat:
            yield data(P.chunk(rid, name, created, chat, "", role=True, include_usage=include_usage))
        async for ev in handle:
            if ev.finished and ev.output.finish_reason == "error":
                yield data(P.error_body(f"the request failed in the engine: {ev.output.error}", "server_error"))
                break
            if ev.text:
                yield data(P.chunk(rid, name, created, chat, ev.text, include_usage=include_usage))
            if ev.finished:
                final = P.chunk(rid, name, created, chat, None if chat else "",
                                finish_reason=P.FINISH[ev.output.finish_reason], include_usage=include_usage)
                final["ltengine"] = P.extension(ev.output)
                yield data(final)
                if include_usage:
                    yield data(P.usage_chunk(rid, name, created, chat, ev.output))
        yield "data: [DONE]\n\n"

    return app


class _SSE(StreamingResponse):
    """A Server-Sent Events response that aborts its request however the response ends."""

    def __init__(self, handle, body):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handle = handle

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.close()


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is already read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Guard:
    """ASGI middleware: the bearer token on /v1/* (401) and the body size limit (413), checked before
    any parsing; the body read here is replayed to the app."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get("authorization", "")
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                what = "invalid API key" if token else "missing API key: send 'Authorization: Bearer <key>'"
                return await _reply(send, 401, P.error_body(what, "invalid_request_error", None, "invalid_api_key"),
                                    {"WWW-Authenticate": "Bearer"})
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_large = P.error_body(f"the request body is over the limit of {self.max_body_bytes} bytes",
                                 "invalid_request_error", None, "request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _reply(send, 413, too_large)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _reply(send, 413, too_large)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _reply(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": raw})
