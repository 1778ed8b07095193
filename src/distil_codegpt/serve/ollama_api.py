"""Ollama's `/api/generate`, `/api/tags`, `/api/show` and `/api/version`, as Ollama clients call them.

`/api/generate` streams NDJSON by default (`{"model", "created_at", "response", "done": false}` per piece, then
`done: true` with the reason and the counts); `suffix` is the code after the cursor, and a FIM template in
`prompt` is taken apart as on the other surfaces. An empty prompt only answers that the model is loaded, as
Ollama does. `/api/show`'s template mentions `.Suffix`, which tells Continue to send prompt and suffix as they
are (native FIM) rather than a template of its own guessing.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from distil_codegpt.serve.fim import split_prompt
from distil_codegpt.serve.http import ApiError, Pipe, Service

API_VERSION = "0.12.0"  # the Ollama API this surface follows (clients check for a minimum)
TEMPLATE = "{{/* fill in the middle: .Prompt is the code before the cursor, .Suffix the code after it */}}{{ .Prompt }}"


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    num_predict: int = -1
    stop: list[str] = []
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    prompt: str = ""
    suffix: str = ""
    stream: bool = True
    options: Options = Options()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _model(service: Service) -> dict[str, Any]:
    """The one model, as /api/tags lists it."""
    engine = service.completer.engine
    family = getattr(getattr(getattr(engine, "model", None), "config", None), "model_type", "") or engine.name
    size = int(engine.disk_mb() * 1e6) if hasattr(engine, "disk_mb") else 0
    details = {"format": engine.name, "family": family, "families": [family], "parameter_size": ""}
    details |= {"quantization_level": "int8" if "int8" in engine.name else "", "parent_model": ""}
    name = service.model_name
    return {"name": name, "model": name, "modified_at": _now(), "size": size, "digest": "", "details": details}


def router(service: Service) -> APIRouter:
    api = APIRouter()

    @api.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": API_VERSION}

    @api.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [_model(service)]}

    @api.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        model = _model(service)
        info = {"general.architecture": model["details"]["family"]}
        return {"modelfile": "", "parameters": "", "template": TEMPLATE, "details": model["details"]} | {
            "model_info": info,
            "capabilities": ["completion", "insert"],
        }

    @api.post("/api/generate", response_model=None)
    async def generate(request: Request) -> JSONResponse | StreamingResponse:
        req: GenerateRequest = await service.read(request, GenerateRequest)
        head = {"model": req.model or service.model_name, "created_at": _now()}
        if not req.prompt and not req.suffix:  # Ollama's "load the model" request
            return JSONResponse({**head, "response": "", "done": True, "done_reason": "load"})
        parts = split_prompt(req.prompt)
        o = req.options
        job = service.job(
            parts.prefix,
            parts.suffix or req.suffix,
            o.num_predict,
            extra=parts.extra,
            stop=o.stop,
            temperature=o.temperature,
            top_p=o.top_p,
            seed=o.seed,
        )
        start = time.perf_counter_ns()
        pipe = service.start(job)
        if req.stream:
            return StreamingResponse(_lines(request, pipe, head, start), media_type="application/x-ndjson")
        text, result = await pipe.collect(request)
        return JSONResponse({**head, "response": text, **_done(result, start)})

    return api


def _done(result: dict[str, Any], start: int) -> dict[str, Any]:
    """The closing fields: why it ended and the counts, durations in nanoseconds."""
    return {
        "done": True,
        "done_reason": "length" if result["finish_reason"] == "length" else "stop",
        "context": [],
        "total_duration": time.perf_counter_ns() - start,
        "load_duration": 0,
        "prompt_eval_count": result["prompt_tokens"] - result["cached_tokens"],
        "prompt_eval_duration": int(result["prompt_ms"] * 1e6),
        "eval_count": result["completion_tokens"],
        "eval_duration": int(result["predict_ms"] * 1e6),
    }


async def _lines(request: Request, pipe: Pipe, head: dict[str, Any], start: int) -> AsyncIterator[str]:
    try:
        while (item := await pipe.get(request))[0] == "piece":
            yield json.dumps({**head, "response": item[1], "done": False}) + "\n"
        yield json.dumps({**head, "response": "", **_done(item[1], start)}) + "\n"
    except ApiError as e:
        yield json.dumps(e.body("/api/")) + "\n"
    finally:
        pipe.cancelled.set()
