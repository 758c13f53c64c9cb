"""The HTTP side: OpenAI-compatible endpoints, server-sent events, the key check, limits, the page."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from .errors import APIError
from .logprobs import chat_logprobs, completion_logprobs
from .protocol import ChatRequest, CompletionRequest, SamplingFields, parse_json, validate
from .scheduler import Job, QueueFull
from .server import Server

OPEN_PATHS = ("/health", "/", "/favicon.ico")  # the page is static; every call it makes needs the key
STATIC = Path(__file__).parent / "static"  # the web page: index.html, app.js, style.css
COUNTED = ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics", "/")


class ClientGone(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, above this server's limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is above this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def next_event(job: Job, request: Request) -> tuple[str, Any, int]:
    """The job's next event (Job.events); a client that went away cancels the job (its slot frees at the next
    token)."""
    assert job.events is not None
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise ClientGone from None


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(server: Server, scheduler_thread: bool = True) -> FastAPI:
    """The FastAPI app of a loaded server. With `scheduler_thread`, the scheduler runs in a thread while the
    app does; without, the caller runs `server.scheduler.run()` (`llama-adapter serve`: in the main thread)."""
    cfg = server.cfg

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if scheduler_thread:
            server.scheduler.start()
        try:
            yield
        finally:
            if scheduler_thread:
                server.scheduler.stop()

    app = FastAPI(title="llama-adapter", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.middleware("http")
    async def key_and_counts(request: Request, call_next: Any) -> Response:
        path = request.url.path
        response: Response
        if cfg.api_key and path not in OPEN_PATHS and not path.startswith("/static/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                response = JSONResponse(APIError(401, "a valid API key is required: Authorization: Bearer KEY",
                                                 code="invalid_api_key").body(), status_code=401)
                server.metrics.requests.labels(path if path in COUNTED else "other", "401").inc()
                return response
        response = await call_next(request)
        server.metrics.requests.labels(path if path in COUNTED else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def fault(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": server.models()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            raise APIError(404, "the web page is not installed")
        return FileResponse(index)

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")

    async def run(request: Request, req: SamplingFields, job: Job, chat: bool) -> Response:
        job.loop, job.events, job.stream = asyncio.get_running_loop(), asyncio.Queue(), req.stream
        try:
            server.scheduler.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy: {cfg.max_queue} requests are already waiting",
                           code="queue_full") from None
        try:
            first = await next_event(job, request)
        except ClientGone:
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def envelope(kind: str, choices: list[dict], **rest: Any) -> dict:
            return {"id": ident, "object": kind, "created": created, "model": req.model, "choices": choices, **rest}

        sent = [0, 0]  # log-probability entries already sent, and the completion's text offset they reached

        def logprobs(upto: int) -> dict | None:
            """The log-probabilities of the tokens generated since the last call (`upto`: the event's count)."""
            if job.top_logprobs is None:
                return None
            entries, sent[0] = job.logprobs[sent[0]:upto], upto
            with server.tok_lock:  # the scheduler thread decodes with the same tokenizer
                if chat:
                    return chat_logprobs(server.tok, entries)
                out = completion_logprobs(server.tok, entries, sent[1], job.top_logprobs)
            sent[1] += sum(len(t) for t in out["tokens"])
            return out

        def usage() -> dict:
            return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                    "total_tokens": job.prompt_tokens + job.completion_tokens}

        if not req.stream:
            texts, event = [], first
            try:
                while event[0] == "text":
                    texts.append(event[1])
                    event = await next_event(job, request)
            except ClientGone:
                return Response(status_code=499)
            if event[0] == "error":
                raise event[1]
            text, finish = "".join(texts), event[1]
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if chat else {"index": 0, "text": text, "finish_reason": finish})
            choice["logprobs"] = logprobs(event[2])
            return JSONResponse(envelope("chat.completion" if chat else "text_completion", [choice], usage=usage()))

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(content: str | None, upto: int, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta: dict = {"role": "assistant"} if role else {}
                if content is not None:
                    delta["content"] = content
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": content or "", "finish_reason": finish}
            choice["logprobs"] = logprobs(upto)
            return envelope(kind, [choice])

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield sse(chunk("", 0, role=True))
                event = first
                checked = time.monotonic()
                while event[0] == "text":
                    yield sse(chunk(event[1], event[2]))
                    if time.monotonic() - checked > 0.1:  # a send to a closed socket need not fail: ask
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            return  # finally: the job is cancelled and its slot freed
                    event = await next_event(job, request)
                if event[0] == "error":
                    yield sse(event[1].body())
                else:
                    yield sse(chunk(None if chat else "", event[2], finish=event[1]))
                    if req.stream_options is not None and req.stream_options.include_usage:
                        yield sse(envelope(kind, [], usage=usage()))
                yield "data: [DONE]\n\n"
            except ClientGone:
                return
            finally:
                job.cancelled.set()  # a client that went away stops its generation (a no-op once finished)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = validate(ChatRequest, parse_json(await read_body(request, cfg.max_body_bytes)))
        job = await run_in_threadpool(server.chat_job, req)  # image decoding and experts off the event loop
        return await run(request, req, job, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = validate(CompletionRequest, parse_json(await read_body(request, cfg.max_body_bytes)))
        job = await run_in_threadpool(server.completion_job, req)
        return await run(request, req, job, chat=False)

    return app
