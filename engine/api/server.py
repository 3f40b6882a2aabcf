"""The OpenAI-compatible HTTP server over an Engine: FastAPI routes, SSE streaming, disconnect → abort, /metrics.

    app = create_app(engine, tokenizer, model_name="phi-3-mini")
    run_server(app, "127.0.0.1", 8000)         # uvicorn; SIGTERM drains (below)

Routes: POST /v1/chat/completions and /v1/completions (streamed or not; engine/api/protocol.py parses,
engine/api/response.py shapes),
GET /v1/models (the base model, then each adapter with `parent` = the base), GET /health, GET /metrics, and
vLLM's run-time adapter routes: POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST
/v1/unload_lora_adapter {"lora_name"} (API key guarded; 400 naming the field for a bad body, directory or base
mismatch, or when the engine has no adapter slots; 404 unknown; 409 while a request uses it: the engine refuses
rather than pull an adapter from under a running request).

**Never dies of a request.** Bodies are parsed by hand (malformed JSON, a non-object, wrong types and out-of-range
values are 400s naming the field); engine errors map to HTTP: QueueFull → 429 with Retry-After, PromptTooLong and
InvalidRequest → 400 naming the field, UnknownAdapter → 404, EngineStopped → 503, a failed engine step → 500 with its
cause (in-band when streaming); unknown routes and anything unexpected still answer in OpenAI's error shape (a 500
is logged with its traceback, the server goes on).

**Disconnects abort.** A client that goes away must not keep a batch row and its KV memory until max_tokens: each
request races its output against a watcher on the ASGI `receive` channel, which yields `http.disconnect` when the
peer closes; the watcher calls `handle.abort()` and the engine frees the row within a step. Streamed or not, the
same watcher works (vLLM's `with_cancellation` pattern; `request.is_disconnected()` polls only between chunks and
never fires while a non-streamed request is running). A streamed response whose generator is cancelled (Starlette
does that on disconnect too) aborts in its `finally`.

**SIGTERM drains.** uvicorn closes the listening socket (no new connections: nothing is admitted), lets every open
request finish, then runs the app's shutdown, which calls `engine.shutdown(drain=True)`.

**Metrics.** Gauges and counters come from `engine.stats()` at scrape time; the three latency histograms are the
server's: TTFT and end-to-end from each Result (`ttft_s`, `latency_s`, measured by the engine from submit), the
inter-token latency from Delta arrival times (a Delta carrying k tokens counts k gaps of 1/k its interval).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from phiforge.engine.formats.peft import AdapterError
from phiforge.engine.serve.request import AdapterBusy, EngineError, EngineStopped, QueueFull, Result, UnknownAdapter

from .prometheus import Histogram, labelled, sample
from .protocol import DEFAULT_MAX_N, APIError, Parsed, parse_chat, parse_completion
from .response import Chunks, response
from .tools import ToolError, check_tool_parameters

log = logging.getLogger("phiforge.server")
MAX_BODY_BYTES = 8 << 20
RETRY_AFTER_S = 1
# engine.stats() key -> (metric name, kind, help)
STATS = {
    "running": ("phiforge:num_requests_running", "gauge", "requests in the running batch"),
    "waiting": ("phiforge:num_requests_waiting", "gauge", "requests queued for a batch row (not yet admitted)"),
    "kv_used_tokens": ("phiforge:kv_cache_used_tokens", "gauge", "KV cache tokens held by requests"),
    "kv_total_tokens": ("phiforge:kv_cache_total_tokens", "gauge", "KV cache budget in tokens"),
    "prompt_tokens_total": ("phiforge:prompt_tokens_total", "counter", "prompt tokens of admitted requests"),
    "cached_tokens_total": ("phiforge:cached_prompt_tokens_total", "counter",
                            "prompt tokens whose K/V came from the prefix cache (not prefilled)"),
    "generation_tokens_total": ("phiforge:generation_tokens_total", "counter", "tokens generated"),
    "aborted_total": ("phiforge:requests_aborted_total", "counter", "requests aborted (client gone, shutdown)"),
    "rejected_total": ("phiforge:requests_rejected_total", "counter", "requests refused because the queue was full"),
    "failed_total": ("phiforge:requests_failed_total", "counter",
                     "requests ended by a failed engine step (finish_reason error; the server log has the cause)"),
}


class _Served:
    """What the routes share: the engine, its tokenizer, the names, the histograms."""

    def __init__(self, engine: Any, tokenizer: Any, model_name: str, api_key: str | None, max_n: int,
                 ignore_unknown: bool) -> None:
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.max_n, self.ignore_unknown = max_n, ignore_unknown
        self.draining = False
        self.created = int(time.time())
        self.ttft = Histogram("phiforge:time_to_first_token_seconds", "submit to first token")
        self.itl = Histogram("phiforge:inter_token_latency_seconds", "time between consecutive output tokens")
        self.e2e = Histogram("phiforge:e2e_request_latency_seconds", "submit to the request's end")
        self.finished: dict[str, int] = {}

    # ---- admission -------------------------------------------------------------------------------------------------
    def check_key(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def models(self) -> list[str]:
        return [self.model_name] + list(self.engine.adapters())

    # ---- adapters at run time --------------------------------------------------------------------------------------
    async def load_adapter(self, body: Any) -> dict:
        name, path = _strings(body, "lora_name", "lora_path")
        if not self.engine.max_adapters:
            raise APIError(400, "this server has no adapter slots: start it with --max-adapters N",
                           code="no_adapter_slots")
        if name in self.models():
            raise APIError(400, f"lora_name {name!r} is served already (unload it first)", param="lora_name")
        if len(self.engine.adapters()) >= self.engine.max_adapters:
            raise APIError(400, f"all {self.engine.max_adapters} adapter slots are in use (--max-adapters): unload "
                                f"one first", param="lora_name", code="no_free_adapter_slot")
        try:
            await asyncio.to_thread(self.engine.load_adapter, name, path)
        except (AdapterError, EngineError, OSError) as e:  # the directory, its files, or the base it was trained on
            raise APIError(400, f"lora_path {path}: {e}", param="lora_path") from None
        log.info("adapter %r loaded from %s", name, path)
        return {"id": name, "object": "model", "parent": self.model_name, "loaded": True}

    async def unload_adapter(self, body: Any) -> dict:
        (name,) = _strings(body, "lora_name")
        try:
            await asyncio.to_thread(self.engine.unload_adapter, name)
        except UnknownAdapter as e:
            raise APIError(404, str(e), param="lora_name", code="model_not_found") from None
        except AdapterBusy as e:
            raise APIError(409, str(e), param="lora_name", code="adapter_busy") from None
        log.info("adapter %r unloaded", name)
        return {"id": name, "object": "model", "deleted": True}

    def submit(self, p: Parsed) -> list[Any]:
        """Every prompt's n handles (engine.submit_choices; prompt i's are handles[i * n:(i + 1) * n]), or the
        APIError the engine's refusal maps to; a prompt refused aborts the ones before it."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        handles: list[Any] = []
        try:
            for r in p.requests:
                handles += self.engine.submit_choices(r, p.n)
            return handles
        except EngineError as e:
            for h in handles:
                h.abort()
            raise self._api_error(p, e) from None

    def _api_error(self, p: Parsed, e: EngineError) -> APIError:
        if isinstance(e, QueueFull):
            return APIError(429, f"the server is at capacity: {e}", code="queue_full",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(e, UnknownAdapter):
            return APIError(404, str(e), param="model", code="model_not_found")
        if isinstance(e, EngineStopped):
            return APIError(503, str(e), code="shutting_down")
        if e.field == "tools" and p.tools is not None:  # which tool's parameters the grammar could not take
            try:
                check_tool_parameters(p.tools, self.engine.check_constraint)
            except ToolError as bad_tool:
                return APIError(400, str(bad_tool), param=bad_tool.param)
        return APIError(400, str(e), param=e.field)  # PromptTooLong, InvalidRequest: a 400 naming the field

    # ---- running ---------------------------------------------------------------------------------------------------
    def _tick(self, last: float | None, d: Any) -> float:
        now = time.perf_counter()
        k = max(1, len(d.token_ids))
        if last is not None:
            for _ in range(k):
                self.itl.observe((now - last) / k)
        return now

    def _done(self, r: Result) -> None:
        if r.usage.completion_tokens > 0:
            self.ttft.observe(r.ttft_s)
        self.e2e.observe(r.latency_s)
        self.finished[r.finish_reason] = self.finished.get(r.finish_reason, 0) + 1

    @staticmethod
    async def _result(handle: Any) -> Result:
        # the iterator has ended, so the Result is (about to be) set; never block the event loop on it
        return handle.result(timeout=0) if handle.done else await asyncio.to_thread(handle.result, 60.0)

    async def stream(self, request: HTTPRequest, p: Parsed, handles: list[Any]) -> AsyncIterator[str]:
        """The SSE stream: the choices' chunks as they come (interleaved for n > 1), each choice's finish chunk when
        it ends, then usage and [DONE]. Any choice's client-side end aborts them all."""
        chunks = Chunks(p, self.tokenizer)
        watcher = asyncio.create_task(_abort_on_disconnect(request, handles))
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, handle: Any) -> None:
            try:
                last = None
                async for d in handle:
                    last = self._tick(last, d)
                    await queue.put((i, d, None))
                await queue.put((i, None, await self._result(handle)))
            except Exception as e:  # reported in-band below
                await queue.put((i, None, e))

        pumps = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            first = chunks.first()
            if first:
                yield first
            results: list[Result | None] = [None] * len(handles)
            while any(r is None for r in results):
                i, d, r = await queue.get()
                if isinstance(r, Exception):
                    raise r
                if d is not None:
                    piece = chunks.delta(d, i)
                    if piece:
                        yield piece
                    continue
                results[i] = r
                self._done(r)
                if r.finish_reason == "error":
                    yield Chunks.error(APIError(500, f"the engine step failed: {r.error}"))
                    yield chunks.done()
                    return
                yield chunks.finish(r, i)
            yield chunks.usage(results)
            yield chunks.done()
        except Exception:  # mid-stream the status line is gone: report in-band, as OpenAI does
            log.exception("request %s failed while streaming", handles[0].id)
            yield Chunks.error(APIError(500, "internal error while generating; see the server log"))
            yield Chunks.done()
        finally:
            watcher.cancel()
            for t in pumps:
                t.cancel()
            for h in handles:
                if not h.done:
                    h.abort()

    async def collect(self, request: HTTPRequest, handles: list[Any]) -> list[Result] | None:
        """The Results in choice order, or None when the client went away first (the requests are then aborted)."""
        async def consume(handle: Any) -> Result:
            last = None
            async for d in handle:
                last = self._tick(last, d)
            return await self._result(handle)

        task = asyncio.ensure_future(asyncio.gather(*(consume(h) for h in handles)))
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                for h in handles:
                    h.abort()
            rs = await task
            for r in rs:
                self._done(r)
            failed = [r for r in rs if r.finish_reason == "error"]
            if failed:
                raise APIError(500, f"the engine step failed: {failed[0].error}")
            return None if watcher.done() and any(r.finish_reason == "abort" for r in rs) else rs
        finally:
            watcher.cancel()
            for h in handles:
                if not h.done:
                    h.abort()

    # ---- metrics ---------------------------------------------------------------------------------------------------
    def metrics(self) -> str:
        stats = self.engine.stats()
        lines: list[str] = []
        for key, (name, kind, help_text) in STATS.items():
            lines += sample(name, kind, help_text, float(stats.get(key, 0)))
        total = float(stats.get("kv_total_tokens", 0))
        lines += sample("phiforge:kv_cache_usage_ratio", "gauge", "KV cache tokens held / budget",
                        float(stats.get("kv_used_tokens", 0)) / total if total else 0.0)
        lines += labelled("phiforge:requests_finished_total", "counter", "requests ended, by finish reason",
                          "finish_reason", self.finished)
        for h in (self.ttft, self.itl, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"


async def _wait_disconnect(request: HTTPRequest) -> None:
    """Returns when the client has gone (the body is already read, so `receive` only reports the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _abort_on_disconnect(request: HTTPRequest, handles: list[Any]) -> None:
    await _wait_disconnect(request)
    for h in handles:
        if not h.done:
            h.abort()


def _strings(body: Any, *fields: str) -> list[str]:
    """The body's named fields, each a non-empty string, or a 400 naming the first that is not."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for f in fields:
        if not isinstance(body.get(f), str) or not body[f].strip():
            raise APIError(400, f"{f} must be a non-empty string, got {body.get(f)!r}", param=f)
    return [body[f] for f in fields]


async def _json_body(request: HTTPRequest) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def create_app(engine: Any, tokenizer: Any, *, model_name: str, api_key: str | None = None,
               max_n: int = DEFAULT_MAX_N, ignore_unknown_fields: bool = False) -> FastAPI:
    """The app over a started Engine; its shutdown (SIGTERM under uvicorn) drains and stops the engine. max_n: the
    most choices one request may ask for (`n`); ignore_unknown_fields: log a request field that is in neither
    endpoint's table (engine/api/fields.py) and go on, instead of the 400."""
    served = _Served(engine, tokenizer, model_name, api_key, max_n, ignore_unknown_fields)
    vocab = getattr(getattr(getattr(engine, "model", None), "config", None), "vocab_size", None)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        served.draining = True
        await asyncio.to_thread(engine.shutdown, True)

    app = FastAPI(title="phiforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served

    @app.exception_handler(APIError)
    async def api_error(_req: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        err = APIError(e.status_code, str(e.detail), code=str(e.status_code))
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_req: HTTPRequest, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(APIError(500, "internal error; see the server log").body(), status_code=500)

    async def complete(request: HTTPRequest, kind: str) -> Response:
        served.check_key(request)
        body = await _json_body(request)
        if kind == "chat":
            p = parse_chat(body, tokenizer, engine.max_context, served.models, served.max_n, vocab,
                           served.ignore_unknown)
        else:
            p = parse_completion(body, tokenizer, engine.max_context, served.models, vocab, served.max_n,
                                 served.ignore_unknown)
        # off the event loop: a constrained request's first compile of its grammar must not stall other streams
        handles = await asyncio.to_thread(served.submit, p)
        if p.stream:
            return StreamingResponse(served.stream(request, p, handles), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        rs = await served.collect(request, handles)
        if rs is None:  # nobody is listening; 499 is nginx's "client closed request"
            return Response(status_code=499)
        return JSONResponse(response(p, rs, tokenizer))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        return await complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest) -> Response:
        return await complete(request, "completion")

    @app.get("/v1/models")
    async def models(request: HTTPRequest) -> JSONResponse:
        served.check_key(request)
        names = served.models()
        data = [{"id": n, "object": "model", "created": served.created, "owned_by": "phiforge",
                 "parent": None if i == 0 else names[0], "max_model_len": engine.max_context}
                for i, n in enumerate(names)]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: HTTPRequest) -> JSONResponse:
        served.check_key(request)
        return JSONResponse(await served.load_adapter(await _json_body(request)))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: HTTPRequest) -> JSONResponse:
        served.check_key(request)
        return JSONResponse(await served.unload_adapter(await _json_body(request)))

    @app.get("/health")
    async def health() -> JSONResponse:
        if served.draining:
            return JSONResponse(APIError(503, "shutting down").body(), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(served.metrics(), media_type="text/plain; version=0.0.4")

    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM: uvicorn stops listening, waits for open requests, then the app's shutdown
    drains the engine; returns normally after a drain (a second SIGINT forces the exit)."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                           timeout_graceful_shutdown=None))
    main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises the captured SIGTERM once it has shut down, under the handler found at start: a no-op one
    # makes a completed drain an ordinary return (exit status 0) instead of a death by signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server.run()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
