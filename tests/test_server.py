"""The HTTP server: OpenAI-shaped answers equal to the completer's, SSE streaming, every bad input a 4xx in
OpenAI's error shape (and the server still serving), the bounded queue, disconnects, a real uvicorn run, and a
llama teacher with its own (SmolLM2-like) tokenizer in raw mode."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from test_complete import RAW_PROMPTS, SPECIALS, greedy_ids, line_of, raw_llama_dir
from transformers import GPT2LMHeadModel

from distil_codegpt.config import ServeConfig, build_config
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.engines.base import Engine
from distil_codegpt.engines.load import load_engine
from distil_codegpt.model.presets import preset_config
from distil_codegpt.serve.complete import Completer, Job
from distil_codegpt.serve.server import create_app

PROMPTS = ["import os\n\n\ndef join(a, b):\n    return os.path.", "for i in range(", "x = 1\n"]


class CountingEngine(Engine):
    """The real engine, counting the ids the model reads and writes: what `usage` must report."""

    def __init__(self, inner: Engine) -> None:
        self.inner, self.name, self.path = inner, inner.name, inner.path
        self.tokenizer, self.context = inner.tokenizer, inner.context
        self.read = self.written = 0

    def stream(self, ids: list[int], max_new_tokens: int, stop_ids: set[int], **kw: Any) -> Iterator[int]:
        self.read, self.written = len(ids), 0
        for i in self.inner.stream(ids, max_new_tokens, stop_ids, **kw):
            self.written += 1
            yield i


class GatedCompleter:
    """A stand-in completer whose generation waits for `gate` (or streams forever): queue and disconnect tests."""

    mode = "raw"

    def __init__(self, endless: bool = False) -> None:
        self.engine = type("FakeEngine", (), {"name": "fake"})()
        self.endless, self.gate, self.started, self.closed = endless, threading.Event(), threading.Event(), []

    def stream(self, job: Job, result: dict[str, Any]) -> Iterator[str]:
        self.started.set()
        prompt = job.prefix
        result.update(finish_reason="stop", prompt_tokens=1, completion_tokens=1)
        try:
            while self.endless:
                yield "x"
                time.sleep(0.01)
            self.gate.wait(10)
            yield prompt
        finally:
            self.closed.append(prompt)


@pytest.fixture(scope="module")
def model_dir(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model: it rambles up to max_tokens in odd code, which is what the server must carry."""
    out = tmp_path_factory.mktemp("serve") / "tiny-model"
    torch.manual_seed(0)
    GPT2LMHeadModel(preset_config("tiny", len(load_tokenizer(tiny_data["tok"])))).save_pretrained(out)
    for f in tiny_data["tok"].iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> CountingEngine:
    return CountingEngine(load_engine(model_dir))


def serve_cfg(model: Path | str, **kw: Any) -> ServeConfig:
    return build_config(ServeConfig, {"model": str(model), "model_name": "tiny", "max_prompt_chars": 1000, **kw})


@pytest.fixture
def client(engine: CountingEngine, model_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Completer(engine), serve_cfg(model_dir, max_tokens_limit=64))) as c:
        yield c


def sse(body: str) -> list[Any]:
    """The events of an SSE body, JSON-decoded except the final [DONE]."""
    events = [b[len("data: ") :] for b in body.split("\n\n") if b]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


@pytest.mark.parametrize("max_tokens", [3, 40])
def test_completion_equals_completer(client: TestClient, engine: CountingEngine, max_tokens: int) -> None:
    completer, texts = Completer(engine), []
    for prompt in PROMPTS:
        expected = completer.complete(prompt, max_tokens=max_tokens)
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "tiny"
        assert body["choices"] == [
            {"text": expected.text, "index": 0, "logprobs": None, "finish_reason": expected.finish_reason}
        ]
        usage = {"prompt_tokens": engine.read, "completion_tokens": engine.written}
        usage |= {"total_tokens": engine.read + engine.written, "prompt_tokens_details": {"cached_tokens": 0}}
        assert body["usage"] == usage
        assert engine.written <= max_tokens
        texts.append(body["choices"][0]["text"])
    assert any(texts) and len(set(texts)) > 1


def test_streaming_concatenates_to_the_completion(client: TestClient) -> None:
    for prompt in PROMPTS:
        req = {"prompt": prompt, "max_tokens": 40}
        plain = client.post("/v1/completions", json=req).json()["choices"][0]
        r = client.post("/v1/completions", json={**req, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.text)
        assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == plain["text"]
        assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == plain["finish_reason"]


def test_accepted_request_variants(client: TestClient) -> None:
    base = client.post("/v1/completions", json={"prompt": "for i in range(", "max_tokens": 8}).json()
    variants = [
        {"prompt": ["for i in range("], "model": "tiny"},  # a list of one prompt, the server's own model name
        {"prompt": "for i in range(", "model": "", "temperature": None, "top_p": None, "user": "me", "echo": False},
    ]
    for extra in variants:
        r = client.post("/v1/completions", json={"max_tokens": 8, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == base["choices"][0]["text"]
    r = client.post("/v1/completions", json={"prompt": "x = 1", "stop": " ", "temperature": 1.5, "seed": 3})
    assert r.status_code == 200 and " " not in r.json()["choices"][0]["text"]


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"max_tokens": 4}, 422, "prompt"),
    ({"prompt": 12}, 422, "prompt"),
    ({"prompt": "x", "max_tokens": "16"}, 422, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, 422, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, 422, "temperature"),
    ({"prompt": "x", "top_p": 0}, 422, "top_p"),
    ({"prompt": "x", "stream": "yes"}, 422, "stream"),
    ({"prompt": "x", "stop": ["a", 1]}, 422, "stop"),
    ({"prompt": "x", "suffix": 3}, 422, "suffix"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, 422, "stream_options"),
    ({"prompt": "x" * 1001}, 413, "prompt"),
    (b'{"prompt": "' + b"x" * 100_000 + b'"}', 413, None),  # body larger than any allowed prompt
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "logprobs": 2}, 400, "logprobs"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD)])
def test_bad_input_is_a_4xx_and_the_server_keeps_serving(
    client: TestClient, body: Any, status: int, param: str | None
) -> None:
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {}
    r = client.post("/v1/completions", **(kw or {"json": body}))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]
    if param:
        assert param in err["message"]
    assert client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2}).status_code == 200


def test_unknown_routes_use_the_error_shape(client: TestClient) -> None:
    for r, status in ((client.get("/v1/nothing"), 404), (client.get("/v1/completions"), 405)):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_models_and_health(client: TestClient) -> None:
    assert client.get("/v1/models").json() == {
        "object": "list",
        "data": [{"id": "tiny", "object": "model", "created": 0, "owned_by": "distil-codegpt"}],
    }
    health = client.get("/health").json()
    assert health == {"status": "ok", "model": "tiny", "engine": "torch", "mode": "codexglue"} | {
        "queue": {"waiting": 0, "limit": 32}
    }


def test_model_name_defaults_to_the_directory(engine: CountingEngine, model_dir: Path) -> None:
    cfg = build_config(ServeConfig, {"model": str(model_dir)})
    with TestClient(create_app(Completer(engine), cfg)) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-model"


def test_raw_teacher_completions_are_the_engines_greedy_lines(tmp_path: Path) -> None:
    """A llama with a SmolLM2-like tokenizer of its own: each answer is the engine's greedy line after the prompt
    framed by `<|endoftext|>`, cut at the first line break (also inside a token), plain and streamed alike."""
    model = raw_llama_dir(tmp_path / "smol-llama")
    engine = load_engine(model)
    tok = engine.tokenizer
    with TestClient(create_app(Completer(engine), serve_cfg(model))) as c:
        assert c.get("/health").json()["mode"] == "raw"
        for prompt in RAW_PROMPTS:
            ids = greedy_ids(engine, prompt, 12)
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12})
            assert r.status_code == 200, r.text
            choice, usage = r.json()["choices"][0], r.json()["usage"]
            assert choice["text"] == line_of(tok, ids) and not any(t in choice["text"] for t in SPECIALS)
            assert choice["finish_reason"] == ("stop" if "\n" in tok.decode(ids) else "length")
            assert usage["prompt_tokens"] == 1 + len(tok.encode(prompt, add_special_tokens=False))
            events = sse(c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "stream": True}).text)
            assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]


def test_full_queue_answers_503(tmp_path: Path) -> None:
    fake = GatedCompleter()
    with TestClient(create_app(fake, serve_cfg(tmp_path, queue_size=1))) as c:
        answers: dict[str, Any] = {}

        def post(name: str) -> None:
            answers[name] = c.post("/v1/completions", json={"prompt": name})

        running = threading.Thread(target=post, args=("first",))
        running.start()
        assert fake.started.wait(10)  # the worker holds "first"
        waiting = threading.Thread(target=post, args=("second",))
        waiting.start()
        deadline = time.monotonic() + 10
        while c.get("/health").json()["queue"]["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/completions", json={"prompt": "third"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "server_error"
        fake.gate.set()
        running.join(10)
        waiting.join(10)
        assert [answers[k].json()["choices"][0]["text"] for k in ("first", "second")] == ["first", "second"]
        assert c.post("/v1/completions", json={"prompt": "fourth"}).status_code == 200


def test_client_disconnect_stops_the_stream(tmp_path: Path) -> None:
    """Drive the ASGI app directly: the client vanishes after the first event; the generator must be closed."""
    fake = GatedCompleter(endless=True)
    app = create_app(fake, serve_cfg(tmp_path))
    gone = asyncio.Event()
    body = [{"type": "http.request", "body": json.dumps({"prompt": "p", "stream": True}).encode()}]

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1"}
    scope |= {"method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions"}
    scope |= {"query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    deadline = time.monotonic() + 5
    while not fake.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.closed == ["p"]
    app.state.worker.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_uvicorn_server(model_dir: Path, engine: CountingEngine) -> None:
    """`run_server` in its own process: it loads the model, answers over TCP, and stops cleanly on Ctrl-C."""
    port = free_port()
    values = {"model": str(model_dir), "model_name": "tiny", "port": port}
    code = "from distil_codegpt.serve.server import *; from distil_codegpt.config import *; "
    code += f"run_server(build_config(ServeConfig, {values!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    assert json.load(r)["status"] == "ok"
                    break
            except OSError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        req = urllib.request.Request(
            f"{url}/v1/completions",
            data=json.dumps({"prompt": PROMPTS[0], "max_tokens": 20}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            text = json.load(r)["choices"][0]["text"]
        assert text == Completer(engine).complete(PROMPTS[0], max_tokens=20).text
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"{url}/v1/completions" in err
