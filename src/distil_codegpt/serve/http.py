"""What every protocol surface shares: the model's worker thread and its queue, one request's pipe from that thread
to the event loop, the service limits, and errors in each protocol's shape (server.py wires the surfaces to these).
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

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
