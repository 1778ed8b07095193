"""The HTTP server: one completion core behind the protocols editors speak (one small file each).

- OpenAI `/v1/completions`, `/v1/models` (serve/openai_api.py): Continue, the openai client, most plugins.
- llama.cpp `/completion`, `/infill`, `/health` (serve/llamacpp_api.py): llama.vscode, llama.vim.
- Ollama `/api/generate`, `/api/tags`, `/api/show`, `/api/version` (serve/ollama_api.py): Ollama clients.

Each surface only maps its fields to a `Job` (prefix, suffix, context, limits) and the result back; errors come in
the shape of the protocol the path belongs to. Any model name is served: one server, one model. What the surfaces
share (the worker thread, a request's pipe, the limits, the errors) is in serve/http.py; this file wires them.

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
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from distil_codegpt.config import ServeConfig
from distil_codegpt.engines.load import load_engine, runtime_for
from distil_codegpt.engines.speculative import with_draft
from distil_codegpt.serve import llamacpp_api, ollama_api, openai_api
from distil_codegpt.serve.complete import Completer
from distil_codegpt.serve.http import ApiError, Service, Worker, invalid


def create_app(completer: Completer, cfg: ServeConfig) -> FastAPI:
    """The HTTP app around one completer; `cfg` gives the model name and the limits."""
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
