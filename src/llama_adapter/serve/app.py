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


async def next_event(queue: asyncio.Queue, jobs: list[Job], request: Request) -> tuple[str, Any, int, int]:
    """The next event of a request's jobs (Job.events); a client that went away cancels them (their slots free at
    the next token)."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                cancel(jobs)
                raise ClientGone from None


def cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled.set()


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

    async def run(request: Request, req: SamplingFields, jobs: list[Job], chat: bool) -> Response:
        """Answer with the jobs' generations as choices 0, 1, ... (several: OpenAI's `n`, a list of prompts)."""
        queue: asyncio.Queue = asyncio.Queue()  # every job's events, each with its choice's index
        for i, job in enumerate(jobs):
            job.loop, job.events, job.stream, job.index = asyncio.get_running_loop(), queue, req.stream, i
        try:
            for job in jobs:
                server.scheduler.submit(job)
        except QueueFull:
            cancel(jobs)
            raise APIError(429, f"the server is busy: {cfg.max_queue} requests are already waiting",
                           code="queue_full") from None
        try:
            first = await next_event(queue, jobs, request)
        except ClientGone:
            return Response(status_code=499)
        if first[0] == "error":
            cancel(jobs)
            raise first[1]
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def envelope(kind: str, choices: list[dict], **rest: Any) -> dict:
            return {"id": ident, "object": kind, "created": created, "model": req.model, "choices": choices, **rest}

        sent = [[0, 0] for _ in jobs]  # per choice: log-probability entries sent, the text offset they reached

        def logprobs(i: int, upto: int) -> dict | None:
            """Choice i's log-probabilities of the tokens since the last call (`upto`: the event's count)."""
            job = jobs[i]
            if job.top_logprobs is None:
                return None
            entries, sent[i][0] = job.logprobs[sent[i][0]:upto], upto
            with server.tok_lock:  # the scheduler thread decodes with the same tokenizer
                if chat:
                    return chat_logprobs(server.tok, entries)
                out = completion_logprobs(server.tok, entries, sent[i][1], job.top_logprobs)
            sent[i][1] += sum(len(t) for t in out["tokens"])
            return out

        def usage() -> dict:
            prompt = sum(j.prompt_tokens for j in jobs[::req.n])  # the n choices of a prompt share it
            completion = sum(j.completion_tokens for j in jobs)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        if not req.stream:
            texts: list[list[str]] = [[] for _ in jobs]
            ends: dict[int, tuple[str, int]] = {}  # choice -> (finish reason, its log-probability count)
            event = first
            try:
                while True:
                    kind, value, count, i = event
                    if kind == "error":
                        cancel(jobs)
                        raise value
                    if kind == "text":
                        texts[i].append(value)
                    else:
                        ends[i] = (value, count)
                        if len(ends) == len(jobs):
                            break
                    event = await next_event(queue, jobs, request)
            except ClientGone:
                return Response(status_code=499)
            choices = []
            for i, (finish, count) in sorted(ends.items()):
                text = "".join(texts[i])
                choice = ({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                          if chat else {"index": i, "text": text, "finish_reason": finish})
                choice["logprobs"] = logprobs(i, count)
                choices.append(choice)
            return JSONResponse(envelope("chat.completion" if chat else "text_completion", choices, usage=usage()))

        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, content: str | None, upto: int, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta: dict = {"role": "assistant"} if role else {}
                if content is not None:
                    delta["content"] = content
                choice = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": i, "text": content or "", "finish_reason": finish}
            choice["logprobs"] = logprobs(i, upto)
            return envelope(kind, [choice])

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    for i in range(len(jobs)):
                        yield sse(chunk(i, "", 0, role=True))
                event, running = first, len(jobs)
                checked = time.monotonic()
                while True:
                    kind_, value, count, i = event
                    if kind_ == "error":
                        yield sse(value.body())
                        break
                    if kind_ == "text":
                        yield sse(chunk(i, value, count))
                    else:
                        yield sse(chunk(i, None if chat else "", count, finish=value))
                        running -= 1
                        if not running:
                            if req.stream_options is not None and req.stream_options.include_usage:
                                yield sse(envelope(kind, [], usage=usage()))
                            break
                    if time.monotonic() - checked > 0.1:  # a send to a closed socket need not fail: ask
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            return  # finally: the jobs are cancelled and their slots freed
                    event = await next_event(queue, jobs, request)
                yield "data: [DONE]\n\n"
            except ClientGone:
                return
            finally:
                cancel(jobs)  # a client that went away stops its generations (a no-op once finished)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = validate(ChatRequest, parse_json(await read_body(request, cfg.max_body_bytes)))
        jobs = await run_in_threadpool(server.chat_jobs, req)  # image decoding and experts off the event loop
        return await run(request, req, jobs, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = validate(CompletionRequest, parse_json(await read_body(request, cfg.max_body_bytes)))
        jobs = await run_in_threadpool(server.completion_jobs, req)
        return await run(request, req, jobs, chat=False)

    return app
