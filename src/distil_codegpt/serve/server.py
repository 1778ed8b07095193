"""OpenAI-style completions over HTTP (`POST /v1/completions`) from one local model, for editor plugins.

Concurrency is a queue, not batching: one worker thread owns the engine and runs one request at a time. On a
CPU a second forward pass in parallel only splits the same cores, and the engines decode one sequence with
its KV cache, so batching would add latency to every request for little throughput. Requests wait in a FIFO
of at most `queue_size`; past that the server answers 503 with Retry-After at once, so latency cannot grow
without bound. The event loop never runs the model: pieces cross from the worker thread through an asyncio
queue per request, so /health and other clients are answered while a completion is being generated. A client
that leaves gives its place back: a waiting job is skipped, and a running stream stops at its next piece
(the completer's generator is closed, which stops the engine).

Memory is bounded by the limits: request bodies (sized from `max_prompt_chars`), `max_tokens_limit` pieces
per request and `queue_size` waiting requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from distil_codegpt.config import ServeConfig
from distil_codegpt.serve.complete import Completer

# OpenAI fields that would change what comes back: accepted only at these neutral values (or null).
NEUTRAL: dict[str, tuple[Any, ...]] = {"echo": (False,), "suffix": ("",), "logprobs": (), "best_of": (1,)}
NEUTRAL |= {"logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,)}
StopString = Annotated[str, Field(min_length=1)]


class ApiError(Exception):
    """An answer other than 200, sent in OpenAI's error shape so clients built for OpenAI show the message."""

    def __init__(self, status: int, message: str, param: str | None, code: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completion request this server honours; other fields are ignored.

    Strict types, so `"max_tokens": "16"` is an error rather than a guess. temperature defaults to 0 (greedy),
    not OpenAI's 1: a completion in an editor should be the model's most likely line, and reproducible.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    n: int = 1
    stream: bool = False
    seed: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI clients send `null` for fields they leave unset."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


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
    """One streamed request: pieces go from the worker thread to the event loop; `cancelled` goes back."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()  # at most max_tokens pieces + the end
        self.cancelled = threading.Event()

    def put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def feed(self, completer: Completer, args: dict[str, Any]) -> None:
        """Run in the worker: forward each piece, stop early when the client has gone, end with the usage."""
        if self.cancelled.is_set():  # its client left while it waited
            return
        result: dict[str, Any] = {}
        gen = completer.stream(**args, result=result)
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

    async def get(self, request: Request) -> tuple[str, Any]:
        """The next item; a client that disconnects meanwhile ends the wait, and so its job."""
        item = asyncio.ensure_future(self.items.get())
        try:
            while not (await asyncio.wait({item}, timeout=0.25))[0]:
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


def create_app(completer: Completer, cfg: ServeConfig) -> FastAPI:
    """The HTTP app around one completer; `cfg` gives the model name and the limits."""
    model_name = cfg.model_name or Path(cfg.model).resolve().name
    worker = Worker(cfg.queue_size)
    max_body = 12 * cfg.max_prompt_chars + 65536  # a JSON-escaped character takes at most 12 bytes

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="distil-codegpt", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), None, "http_error", exc.headers).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(exc.errors()).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_name,
            "engine": completer.engine.name,
            "mode": completer.mode,
            "queue": {"waiting": worker.waiting, "limit": worker.limit},
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "distil-codegpt"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        req = _parse(await _read_body(request, max_body))
        prompt = _check(req, cfg, model_name)
        args = {"prompt": prompt, "max_tokens": req.max_tokens, "temperature": req.temperature}
        args |= {"top_p": req.top_p, "stop": [req.stop] if isinstance(req.stop, str) else req.stop, "seed": req.seed}
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time())}
        head["model"] = model_name
        pipe = Pipe(asyncio.get_running_loop())
        worker.submit(lambda: pipe.feed(completer, args))
        if req.stream:
            return StreamingResponse(_events(request, pipe, head), media_type="text/event-stream")
        pieces = []
        while (item := await pipe.get(request))[0] == "piece":
            pieces.append(item[1])
        choice = {"text": "".join(pieces), "index": 0, "logprobs": None, "finish_reason": item[1]["finish_reason"]}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(item[1])})

    return app


def _invalid(errors: Any) -> ApiError:
    """Pydantic's errors as one line naming each bad field (422, as FastAPI would); a union's failed cases by "or"."""
    fields: dict[str, list[str]] = {}
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        fields.setdefault(loc[0] if loc else "body", []).append(err.get("msg", "invalid"))
    message = "; ".join(f"{name}: {' or '.join(dict.fromkeys(msgs))}" for name, msgs in fields.items())
    return ApiError(422, message or "invalid request", next(iter(fields), None), "invalid_value")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it outgrows what an allowed prompt could need."""
    too_big = ApiError(413, f"request body over {limit} bytes; send a shorter prompt", None, "body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> CompletionRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON ({e}); send a JSON object", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"body must be a JSON object, not {type(data).__name__}", None, "invalid_json")
    for name, neutral in NEUTRAL.items():
        value = data.get(name)
        if value is not None and not any(
            value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in neutral
        ):
            raise ApiError(400, f"{name}={value!r} is not supported by this server; omit it", name, "unsupported")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        raise _invalid(e.errors()) from None


def _check(req: CompletionRequest, cfg: ServeConfig, model_name: str) -> str:
    """The checks that need the server's settings; returns the prompt as one string."""
    if req.model not in ("", model_name):
        raise ApiError(
            404, f"model {req.model!r} does not exist; this server has {model_name!r}", "model", "model_not_found"
        )
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise ApiError(400, f"prompt: a list of {len(req.prompt)} prompts; send one string", "prompt", "unsupported")
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    if len(prompt) > cfg.max_prompt_chars:
        msg = f"prompt: {len(prompt)} characters, over the limit of {cfg.max_prompt_chars}; send the end of the file"
        raise ApiError(413, msg, "prompt", "prompt_too_long")
    if req.n != 1:
        raise ApiError(400, f"n={req.n} is not supported; this server returns one completion (n=1)", "n", "unsupported")
    if req.max_tokens > cfg.max_tokens_limit:
        msg = f"max_tokens={req.max_tokens} is over this server's limit of {cfg.max_tokens_limit}; ask for fewer"
        raise ApiError(400, msg, "max_tokens", "max_tokens_too_large")
    return prompt


def _usage(result: dict[str, Any]) -> dict[str, int]:
    """Token counts as the model saw them (a normalised prompt, cut to fit the context)."""
    prompt, completion = result.get("prompt_tokens", 0), result.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _events(request: Request, pipe: Pipe, head: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: one chunk per piece, a final chunk with finish_reason, [DONE]."""

    def chunk(text: str, finish: str | None) -> str:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    try:
        while (item := await pipe.get(request))[0] == "piece":
            yield chunk(item[1], None)
        yield chunk("", item[1]["finish_reason"])
        yield "data: [DONE]\n\n"
    except ApiError as e:  # the status line has gone out already: the error travels as an event
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:  # normal end, or the client went away and the response task was cancelled
        pipe.cancelled.set()


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost may resolve anywhere
        return False


def run_server(cfg: ServeConfig) -> None:
    """Load the model once, then serve until Ctrl-C."""
    import uvicorn

    from distil_codegpt.serve.engine import load_engine

    completer = Completer(load_engine(cfg.model, cfg.device))
    app = create_app(completer, cfg)
    if not is_loopback(cfg.host):
        print(
            f"serve: warning: listening on {cfg.host}, reachable from other machines with no authentication; "
            "use --host 127.0.0.1 to keep it local",
            file=sys.stderr,
        )
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serve: {cfg.model} ({completer.mode} mode) at http://{host}:{cfg.port}/v1/completions", file=sys.stderr)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
