"""llama.cpp's native `/infill` and `/completion`, as llama.vscode and llama.vim call them (`/health` is shared).

`/infill` takes `input_prefix`, `input_suffix`, `input_extra` (other files: `{filename, text}`) and `prompt`, the
current line up to the cursor, which llama.cpp places after the middle marker: here it simply ends the prefix.
`n_predict: 0` is the clients' warm-up: the prompt is read into the KV cache and "" comes back, so that the next
request only reads what changed. `t_max_predict_ms` ends generation at the first line break after that many ms;
`n_indent` ends it before a later line indented less. Sampler lists, top_k, `cache_prompt` (always on here) and
other tuning fields are accepted and ignored; temperature defaults to 0 (greedy). `response_fields` keeps only the
named fields, with nested ones as flat keys (`"timings/prompt_n"`), as llama.cpp does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from distil_codegpt.serve.fim import split_prompt
from distil_codegpt.serve.http import ApiError, Pipe, Service

# llama.cpp's stop types: a stop string ("word"), the token limit ("limit"), or the end of the text ("eos"); the
# ends of our own (end of the line, the suffix, an indent, the deadline) are the end of the text to a client
STOP_TYPES = {"word": "word", "limit": "limit"}


class ExtraChunk(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    filename: str = ""
    text: str = ""


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    prompt: str | list[str] = ""
    n_predict: int = -1  # -1: up to the server's limit
    stop: list[str] = []
    stream: bool = False
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-1)
    t_max_predict_ms: int = Field(0, ge=0)
    n_indent: int = Field(0, ge=0)
    response_fields: list[str] = []


class InfillRequest(CompletionRequest):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = []


def _timings(result: dict[str, Any]) -> dict[str, Any]:
    prompt_n = result["prompt_tokens"] - result["cached_tokens"]
    prompt_ms, predicted_n, predicted_ms = result["prompt_ms"], result["completion_tokens"], result["predict_ms"]
    return {
        "cache_n": result["cached_tokens"],
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms else 0.0,
    }


def _final(service: Service, req: CompletionRequest, text: str, result: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's last answer object: the text (empty when streamed), why it stopped, the counts and timings."""
    body = {
        "index": 0,
        "content": text,
        "tokens": [],
        "id_slot": 0,
        "stop": True,
        "model": service.model_name,
        "tokens_predicted": result["completion_tokens"],
        "tokens_evaluated": result["prompt_tokens"],
        "generation_settings": {"n_predict": req.n_predict, "temperature": req.temperature, "top_p": req.top_p},
        "prompt": "",
        "has_new_line": "\n" in text,
        "truncated": result["truncated"],
        "stop_type": STOP_TYPES.get(result["stop_type"], "eos"),
        "stopping_word": result["stopping_word"],
        "tokens_cached": result["cached_tokens"],
        "timings": _timings(result),
    }
    return _fields(body, req.response_fields) if req.response_fields else body


def _fields(body: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """Only the named fields; `a/b` names `body["a"]["b"]` and comes back as the flat key "a/b"."""
    out = {}
    for path in paths:
        value: Any = body
        for key in path.split("/"):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            out[path] = value
    return out


def router(service: Service) -> APIRouter:
    api = APIRouter()

    async def run(request: Request, req: CompletionRequest, prefix: str, suffix: str, extra: list) -> Any:
        seed = None if req.seed is None or req.seed < 0 else req.seed  # -1: llama.cpp's "random"
        job = service.job(
            prefix,
            suffix,
            req.n_predict,
            extra=extra,
            stop=req.stop,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=seed,
            predict_ms=req.t_max_predict_ms,
            min_indent=req.n_indent,
        )
        pipe = service.start(job)
        if req.stream:
            return StreamingResponse(_events(request, pipe, service, req), media_type="text/event-stream")
        text, result = await pipe.collect(request)
        return JSONResponse(_final(service, req, text, result))

    @api.post("/completion", response_model=None)
    @api.post("/completions", response_model=None)
    async def completion(request: Request) -> JSONResponse | StreamingResponse:
        req: CompletionRequest = await service.read(request, CompletionRequest)
        prompt = req.prompt if isinstance(req.prompt, str) else "".join(req.prompt)
        parts = split_prompt(prompt)
        return await run(request, req, parts.prefix, parts.suffix, parts.extra)

    @api.post("/infill", response_model=None)
    async def infill(request: Request) -> JSONResponse | StreamingResponse:
        req: InfillRequest = await service.read(request, InfillRequest)
        if isinstance(req.prompt, list):
            raise ApiError(400, "prompt: send the current line as one string", "prompt", "invalid_value")
        extra = [(c.filename, c.text) for c in req.input_extra if c.text]
        return await run(request, req, req.input_prefix + req.prompt, req.input_suffix, extra)

    return api


async def _events(request: Request, pipe: Pipe, service: Service, req: CompletionRequest) -> AsyncIterator[str]:
    """llama.cpp's stream: `data: {"content", "stop": false}` per piece, then the final object with `stop: true`."""
    try:
        n = 0
        while (item := await pipe.get(request))[0] == "piece":
            n += 1
            piece = {"index": 0, "content": item[1], "tokens": [], "stop": False, "id_slot": 0, "tokens_predicted": n}
            yield f"data: {json.dumps(piece)}\n\n"
        yield f"data: {json.dumps(_final(service, req, '', item[1]))}\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(e.body('/infill'))}\n\n"
    finally:
        pipe.cancelled.set()
