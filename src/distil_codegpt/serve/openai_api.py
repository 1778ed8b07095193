"""OpenAI's `/v1/completions` and `/v1/models`, as Continue (provider `openai`), the openai Python client and most
editor plugins call them.

A FIM template inside `prompt` (Continue builds one from the model's name) is taken apart by serve/fim.py; a
`suffix` field is the code after the cursor. temperature defaults to 0 (greedy), not OpenAI's 1: a completion
in an editor should be the model's most likely line, and reproducible. `max_tokens` above the server's limit is
clamped; any number of stop strings is honoured; fields that would change what comes back (echo, logprobs,
n, best_of, biases and penalties) are accepted at their neutral values only.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from distil_codegpt.serve.fim import split_prompt
from distil_codegpt.serve.http import ApiError, Pipe, Service

# fields that would change what comes back: accepted only at these neutral values (or null)
NEUTRAL: dict[str, tuple[Any, ...]] = {"echo": (False,), "logprobs": (0,), "best_of": (1,), "n": (1,)}
NEUTRAL |= {"logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,)}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The part of OpenAI's completion request this server honours; other fields are ignored. Strict types, so
    `"max_tokens": "16"` is an error rather than a guess."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    prompt: str | list[str]
    suffix: str = ""
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = None
    n: int = 1
    best_of: int = 1
    logit_bias: dict[str, float] = {}
    presence_penalty: float = 0
    frequency_penalty: float = 0


def _neutral(req: CompletionRequest) -> None:
    for name, ok in NEUTRAL.items():
        value = getattr(req, name)
        if value is not None and value not in ok:
            raise ApiError(400, f"{name}={value!r} is not supported by this server; omit it", name, "unsupported")


def _usage(result: dict[str, Any]) -> dict[str, Any]:
    """Token counts as the model saw them (a normalised prompt, cut to fit the context), with the prompt tokens
    read from the KV cache where OpenAI reports cached tokens."""
    prompt, completion = result.get("prompt_tokens", 0), result.get("completion_tokens", 0)
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return usage | {"prompt_tokens_details": {"cached_tokens": result.get("cached_tokens", 0)}}


def router(service: Service) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": service.model_name, "object": "model", "created": 0, "owned_by": "distil-codegpt"}
        return {"object": "list", "data": [model]}

    @api.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        req: CompletionRequest = await service.read(request, CompletionRequest)
        _neutral(req)
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            msg = f"prompt: a list of {len(req.prompt)} prompts; send one string"
            raise ApiError(400, msg, "prompt", "unsupported")
        parts = split_prompt(req.prompt if isinstance(req.prompt, str) else req.prompt[0])
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        job = service.job(
            parts.prefix,
            parts.suffix or req.suffix,
            req.max_tokens,
            extra=parts.extra,
            stop=stop,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
        )
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time())}
        head["model"] = req.model or service.model_name
        pipe = service.start(job)
        if req.stream:
            events = _events(request, pipe, head, req.stream_options.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        text, result = await pipe.collect(request)
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": result["finish_reason"]}
        cached = {"X-Cached-Tokens": str(result.get("cached_tokens", 0))}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(result)}, headers=cached)

    return api


async def _events(request: Request, pipe: Pipe, head: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: one chunk per piece, a chunk with finish_reason, with
    `include_usage` a last chunk with no choices and the usage (`usage: null` on the others), then [DONE]. No
    comment lines: some clients read `: ping` as the end of the stream."""
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str, finish: str | None) -> str:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [choice], **extra})}\n\n"

    try:
        while (item := await pipe.get(request))[0] == "piece":
            yield chunk(item[1], None)
        yield chunk("", item[1]["finish_reason"])
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(item[1])})}\n\n"
        yield "data: [DONE]\n\n"
    except ApiError as e:  # the status line has gone out already: the error travels as an event
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:  # normal end, or the client went away and the response task was cancelled
        pipe.cancelled.set()
