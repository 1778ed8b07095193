"""The HTTP server: one completion core behind the protocols editors speak (one small file each).

- OpenAI `/v1/completions`, `/v1/models` (serve/openai_api.py): Continue, the openai client, most plugins.
- llama.cpp `/completion`, `/infill`, `/health` (serve/llamacpp_api.py): llama.vscode, llama.vim.
- Ollama `/api/generate`, `/api/tags`, `/api/show`, `/api/version` (serve/ollama_api.py): Ollama clients.

Each surface only maps its fields to a `Job` (prefix, suffix, context, limits) and the result back; errors come in
the shape of the protocol the path belongs to. Any model name is served: one server, one model.

Concurrency is a queue, not batching: one worker thread owns the engine and runs one request at a time. On a
CPU a second forward pass in parallel only splits the same cores, and the engines decode one sequence with
its KV cache (kept across requests for the prompts' common prefix), so batching would add latency to every
request for little throughput. Requests wait in a FIFO of at most `queue_size`; past that the server answers 503
with Retry-After at once, so latency cannot grow without bound. The event loop never runs the model: pieces
cross from the worker thread through an asyncio queue per request, so /health and other clients are answered
while a completion is being generated. A client that leaves gives its place back: a waiting job is skipped,
and a running stream stops at its next token (editors cancel a request on every keystroke).

Memory is bounded by the limits: request bodies (sized from `max_prompt_chars`), `max_tokens_limit` pieces
per request, `queue_size` waiting requests and `cache_slots` cached prompts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import queue
import sys
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from distil_codegpt.config import ServeConfig
from distil_codegpt.serve.complete import Completer, Job

POLL_S = 0.05  # how often a waiting request checks that its client is still there


class ApiError(Exception):
    """An answer other than 200, sent in the error shape of the protocol its path belongs to, so each client
    shows the message: OpenAI `{"error": {message, type, param, code}}`, Ollama `{"error": message}`, llama.cpp
    `{"error": {code, message, type}}`."""

    def __init__(self, status: int, message: str, param: str | None, code: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self, path: str = "/v1") -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        if path.startswith("/api/"):
            return {"error": self.message}
        if path.startswith("/v1/") or path == "/v1":
            return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return {"error": {"code": self.status, "message": self.message, "type": kind}}

    def response(self, path: str = "/v1") -> JSONResponse:
        return JSONResponse(self.body(path), status_code=self.status, headers=self.headers)


class Worker:
    """The one thread that runs the model; jobs wait for it in a bounded FIFO."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=limit)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a job without blocking; a full queue is the client's 503, not a wait."""
        with self._lock:  # started on first use, so an app that is never served holds no thread
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)
                self._thread.start()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            msg = f"server busy: {self.limit} requests already wait for the model; retry shortly"
            raise ApiError(503, msg, None, "queue_full", {"Retry-After": "1"}) from None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job that fails past its own handling must not take the server down with it
                traceback.print_exc()

    def stop(self, timeout: float = 10.0) -> None:
        """Let queued jobs finish, then end the thread (daemon: a stuck model cannot hold the process)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout)


class Pipe:
    """One request's run: pieces go from the worker thread to the event loop; `cancelled` goes back."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()  # at most max_tokens pieces + the end
        self.cancelled = threading.Event()

    def put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def feed(self, completer: Completer, job: Job) -> None:
        """Run in the worker: forward each piece, stop early when the client has gone, end with the result."""
        if self.cancelled.is_set():  # its client left while it waited
            return
        result: dict[str, Any] = {}
        engine = completer.engine
        if hasattr(engine, "interrupt"):  # a PyTorch engine stops reading a long prompt once its client has gone
            engine.interrupt = self.cancelled.is_set
        gen = completer.stream(job, result)
        try:
            for piece in gen:
                if self.cancelled.is_set():
                    return
                self.put("piece", piece)
            self.put("done", result)
        except Exception as e:  # the completer promises not to raise; an engine failure still must not hang
            self.put("error", e)
        finally:
            gen.close()
            if hasattr(engine, "interrupt"):
                engine.interrupt = None

    async def get(self, request: Request) -> tuple[str, Any]:
        """The next item; a client that disconnects meanwhile ends the wait, and so its job."""
        item = asyncio.ensure_future(self.items.get())
        try:
            while not (await asyncio.wait({item}, timeout=POLL_S))[0]:
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected", None, "client_closed")
        except BaseException:  # disconnected, or this request's task was cancelled
            item.cancel()
            self.cancelled.set()
            raise
        kind, value = item.result()
        if kind == "error":
            raise ApiError(500, f"generation failed: {type(value).__name__}: {value}", None, "engine_error")
        return kind, value

    async def collect(self, request: Request) -> tuple[str, dict[str, Any]]:
        """The whole completion and its result, for a request that does not stream."""
        pieces = []
        while (item := await self.get(request))[0] == "piece":
            pieces.append(item[1])
        return "".join(pieces), item[1]


@dataclass
class Service:
    """What every protocol surface shares: the completer, its worker, the limits and the model's name."""

    completer: Completer
    cfg: ServeConfig
    worker: Worker
    model_name: str

    @property
    def max_body(self) -> int:
        return 12 * self.cfg.max_prompt_chars + 65536  # a JSON-escaped character takes at most 12 bytes

    def job(self, prefix: str, suffix: str = "", max_tokens: int | None = None, **kw: Any) -> Job:
        """A Job within the server's limits: max_tokens clamped (None or negative: the limit), prompts checked."""
        chars = len(prefix) + len(suffix) + sum(len(t) for _, t in kw.get("extra", ()))
        if chars > self.cfg.max_prompt_chars:
            msg = f"prompt: {chars} characters, over the limit of {self.cfg.max_prompt_chars}; send less of the file"
            raise ApiError(413, msg, "prompt", "prompt_too_long")
        limit = self.cfg.max_tokens_limit
        n = limit if max_tokens is None or max_tokens < 0 else min(max_tokens, limit)
        kw.setdefault("max_lines", self.cfg.max_lines)
        if not kw.get("predict_ms"):
            kw["predict_ms"] = self.cfg.max_predict_ms
        kw["stop"] = [s for s in kw.get("stop") or [] if s]
        return Job(prefix, suffix, max_tokens=n, **{k: v for k, v in kw.items() if v is not None})

    def start(self, job: Job) -> Pipe:
        pipe = Pipe(asyncio.get_running_loop())
        self.worker.submit(lambda: pipe.feed(self.completer, job))
        return pipe

    async def read(self, request: Request, schema: type[BaseModel]) -> Any:
        """The body, refused (413) as soon as it outgrows what an allowed prompt could need, parsed into schema."""
        too_big = ApiError(
            413, f"request body over {self.max_body} bytes; send a shorter prompt", None, "body_too_large"
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise too_big
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body is not valid JSON ({e}); send a JSON object", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"body must be a JSON object, not {type(data).__name__}", None, "invalid_json")
        try:
            return schema.model_validate({k: v for k, v in data.items() if v is not None})  # null: the default
        except ValidationError as e:
            raise invalid(e.errors()) from None


def invalid(errors: Any) -> ApiError:
    """Pydantic's errors as one line naming each bad field (422, as FastAPI would); a union's failed cases by "or"."""
    fields: dict[str, list[str]] = {}
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        fields.setdefault(loc[0] if loc else "body", []).append(err.get("msg", "invalid"))
    message = "; ".join(f"{name}: {' or '.join(dict.fromkeys(msgs))}" for name, msgs in fields.items())
    return ApiError(422, message or "invalid request", next(iter(fields), None), "invalid_value")


def create_app(completer: Completer, cfg: ServeConfig) -> FastAPI:
    """The HTTP app around one completer; `cfg` gives the model name and the limits."""
    from distil_codegpt.serve import llamacpp_api, ollama_api, openai_api

    worker = Worker(cfg.queue_size)
    service = Service(completer, cfg, worker, cfg.model_name or Path(cfg.model).resolve().name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="distil-codegpt", lifespan=lifespan)
    app.state.worker, app.state.service = worker, service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), None, "http_error", exc.headers).response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(exc.errors()).response(request.url.path)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": service.model_name,
            "engine": completer.engine.name,
            "mode": completer.mode,
            "queue": {"waiting": worker.waiting, "limit": worker.limit},
        }

    for surface in (openai_api, llamacpp_api, ollama_api):
        app.include_router(surface.router(service))
    return app


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve anywhere
        return False


def run_server(cfg: ServeConfig) -> None:
    """Load the model once, then serve until Ctrl-C."""
    import uvicorn

    from distil_codegpt.serve.engine import load_engine, runtime_for
    from distil_codegpt.serve.speculative import with_draft

    quantize = cfg.quantize if runtime_for(cfg.model, cfg.engine) == "torch" else "none"  # auto: torch's default
    engine = load_engine(cfg.model, cfg.device, cfg.cache_slots, quantize, cfg.engine)
    engine = with_draft(engine, cfg.draft, cfg.device, cfg.draft_tokens, cfg.cache_slots, cfg.quantize)
    completer = Completer(engine, fim=cfg.fim)
    app = create_app(completer, cfg)
    if not is_loopback(cfg.host):
        print(
            f"serve: warning: listening on {cfg.host}, reachable from other machines with no authentication; "
            "use --host 127.0.0.1 to keep it local",
            file=sys.stderr,
        )
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    base = f"http://{host}:{cfg.port}"
    print(
        f"serve: {cfg.model} ({engine.name} engine, {completer.mode} mode) at {base}/v1/completions (OpenAI), "
        f"{base}/infill and {base}/completion (llama.cpp), {base}/api/generate (Ollama)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
