"""Editor protocols: FIM templates taken apart, the suffix cutting a completion, lines and deadlines, the prefix KV
cache (cached == uncached), and each surface (OpenAI, llama.cpp, Ollama, the openai client) driven with requests
shaped as the real clients send them, on the torch engine and on llama.cpp (`--engine llamacpp`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_complete import SPECIALS, ScriptedEngine, raw_llama_dir

from distil_codegpt.config import ConfigError, ServeConfig, build_config
from distil_codegpt.engines.base import TorchEngine
from distil_codegpt.engines.load import load_engine
from distil_codegpt.serve.complete import Completer, Job
from distil_codegpt.serve.fim import TEMPLATES, build_prompt, split_prompt, suffix_overlap, template_for
from distil_codegpt.serve.server import create_app

PREFIX = "import os\n\n\ndef join(a, b):\n    return os.path.join("
SUFFIX = ")\n\n\ndef split(p):\n    return p.split('/')\n"
EXTRA = [("util/paths.py", "ROOT = '/'\n"), ("", "def other():\n    pass\n")]
# Continue's StarCoder template (its default for an unknown model name) and its stop list, as sent
CONTINUE_STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>"]
CONTINUE_STOPS += ["</code>", "\n\n", "\r\n\r\n", "/src/"]


# ---------------------------------------------------------------- templates


def continue_prompt(name: str, prefix: str, suffix: str) -> str:
    """The prompt string Continue builds for a template (AutocompleteTemplate.ts shapes)."""
    return {
        "starcoder": f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
        "qwen": f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
        "codellama": f"<PRE> {prefix} <SUF>{suffix} <MID>",
        "deepseek": f"<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>",
        "codestral": f"[SUFFIX]{suffix}[PREFIX]{prefix}",
        "codegeex": f"<|user|>\n###PATH:a.py\n###LANGUAGE:Python\n###MODE:BLOCK\n<|code_suffix|>{suffix}"
        f"<|code_prefix|>{prefix}<|code_middle|><|assistant|>\n",
    }[name]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_client_template_splits_back(name: str) -> None:
    parts = split_prompt(continue_prompt(name, PREFIX, SUFFIX))
    assert (parts.prefix, parts.suffix, parts.template) == (PREFIX, SUFFIX, name)
    rebuilt = split_prompt(build_prompt(TEMPLATES[name], PREFIX, SUFFIX, []))  # our own builder agrees
    assert (rebuilt.prefix, rebuilt.suffix) == (PREFIX, SUFFIX)


def test_repository_context_becomes_extra() -> None:
    starcoder2 = f"<file_sep>{EXTRA[1][1]}<file_sep><fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    parts = split_prompt(starcoder2)
    assert (parts.prefix, parts.suffix, parts.extra) == (PREFIX, SUFFIX, [("", EXTRA[1][1])])
    qwen_repo = "<|repo_name|>proj\n" + "".join(f"<|file_sep|>{n}\n{t}" for n, t in EXTRA[:1])
    parts = split_prompt(qwen_repo + f"<|file_sep|>main.py\n<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>")
    assert parts.extra == [EXTRA[0]] and parts.prefix == PREFIX
    codestral = f"[SUFFIX]{SUFFIX}[PREFIX]+++++ util/paths.py\n{EXTRA[0][1]}\n\n+++++ main.py\n{PREFIX}"
    parts = split_prompt(codestral)
    assert (parts.prefix, parts.suffix, parts.extra) == (PREFIX, SUFFIX, [("util/paths.py", EXTRA[0][1].rstrip())])


def test_instruction_templates_and_plain_prompts() -> None:
    hole = "SYSTEM\n<QUERY>\nex{{FILL_HERE}}ample\n</QUERY>\nTASK: Fill the {{FILL_HERE}} hole. ..."
    hole += f"\n\n<QUERY>\n{PREFIX}{{{{FILL_HERE}}}}{SUFFIX}\n</QUERY>\nTASK: Fill the {{{{FILL_HERE}}}} hole. Do it."
    assert (split_prompt(hole).prefix, split_prompt(hole).suffix) == (PREFIX, SUFFIX)
    blank = f"```\n{PREFIX}[BLANK]{SUFFIX}\n```\n\nFill in the blank to complete the code block. Your response..."
    assert (split_prompt(blank).prefix, split_prompt(blank).suffix) == (PREFIX, SUFFIX)
    assert split_prompt(PREFIX).prefix == PREFIX and split_prompt(PREFIX).suffix == ""


@pytest.mark.parametrize(
    "line,suffix,cut",
    [
        ("a, b))", "))\n", 2),  # the whole rest of the line
        ("a, b)", "))\n", 1),  # a start of it made of closers
        ("name", "e = 1\n", 0),  # a word is never cut for sharing a letter with the suffix
        ("x = 1  ", "x = 1\n", 7),  # trailing blanks go with it
        ("foo()", "\nnext", 0),  # nothing after the cursor on its line
    ],
)
def test_suffix_overlap(line: str, suffix: str, cut: int) -> None:
    assert suffix_overlap(line, suffix) == cut


def test_fim_template_needs_its_tokens() -> None:
    with pytest.raises(ConfigError, match="no <fim_prefix>"):
        template_for("starcoder", {"<|endoftext|>"})
    assert template_for("starcoder", {"<fim_prefix>", "<fim_suffix>", "<fim_middle>"}) is TEMPLATES["starcoder"]


# ---------------------------------------------------------------- the core: suffix, lines, deadlines


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return raw_llama_dir(tmp_path_factory.mktemp("proto") / "smol")


@pytest.fixture(scope="module")
def raw_engine(raw_dir: Path) -> TorchEngine:
    return load_engine(raw_dir)


def scripted(engine: TorchEngine, text: str, tmp_path: Path) -> Completer:
    return Completer(ScriptedEngine(engine.tokenizer, tmp_path, engine.tokenizer.encode(text)))


def test_suffix_cuts_what_the_code_after_the_cursor_holds(raw_engine: TorchEngine, tmp_path: Path) -> None:
    c = scripted(raw_engine, "a, b))\n    return 1\n", tmp_path)
    r: dict[str, Any] = {}
    assert "".join(c.stream(Job("f(g(", "))\nx = 2\n", max_tokens=20), r)) == "a, b"
    assert r["stop_type"] == "eol"
    # the rest of the line is not a closer: the completion stays one line even with max_lines 3
    assert c.complete("f(g(", 20, suffix=" # note\n", max_lines=3).text == "a, b))"


def test_lines_indent_and_suffix_repeat(raw_engine: TorchEngine, tmp_path: Path) -> None:
    body = "if x:\n        y = 1\n        z = 2\n    return y\nprint(1)\n"
    c = scripted(raw_engine, body, tmp_path)
    assert c.complete("def f(x):\n    ", 40).text == "if x:"
    assert c.complete("def f(x):\n    ", 40, max_lines=9).text == body.rstrip("\n")
    r: dict[str, Any] = {}
    text = "".join(c.stream(Job("def f(x):\n    ", max_tokens=40, max_lines=9, min_indent=8), r))
    assert text == "if x:\n        y = 1\n        z = 2" and r["stop_type"] == "indent"
    text = "".join(c.stream(Job("def f(x):\n    ", "\n    return y\n", max_tokens=40, max_lines=9), r))
    assert text == "if x:\n        y = 1\n        z = 2" and r["stop_type"] == "suffix"


def test_deadline_ends_at_the_next_line_break(raw_engine: TorchEngine, tmp_path: Path) -> None:
    class Slow(ScriptedEngine):
        def stream(self, *a: Any, **kw: Any) -> Iterator[int]:
            for i in super().stream(*a, **kw):
                time.sleep(0.01)
                yield i

    tok = raw_engine.tokenizer
    c = Completer(Slow(tok, tmp_path, tok.encode("x = 1\ny = 2\nz = 3\nw = 4\n")))
    assert c.complete("", 40, max_lines=9).text == "x = 1\ny = 2\nz = 3\nw = 4"
    assert c.complete("", 40, max_lines=9, predict_ms=1).text == "x = 1"


def test_template_text_never_reaches_a_completion(raw_engine: TorchEngine, tmp_path: Path) -> None:
    c = scripted(raw_engine, "x<fim_suffix>y <|fim_middle|>\n", tmp_path)
    assert c.complete("a = ", 40).text == "x"
    assert c.complete("a = ", 10).text == "x"  # cut at the limit inside the marker: its start goes too


# ---------------------------------------------------------------- the prefix KV cache


def typing_session(code: str) -> list[str]:
    """The prompts an editor sends while `code` is typed: at each blank and line end, the file so far."""
    cuts = [i for i, ch in enumerate(code) if ch in " \n("] + [len(code)]
    return [code[:i] for i in cuts if i > 0]


CODE = "import os\n\n\nclass Paths:\n    def join(self, a, b):\n        return os.path.join(a, b)\n"


def test_cached_answers_equal_uncached(raw_dir: Path) -> None:
    cold, warm = load_engine(raw_dir), load_engine(raw_dir, cache_slots=2)
    plain, cached = Completer(cold), Completer(warm)
    reused = []
    for prompt in typing_session(CODE) + typing_session(CODE.replace("os", "sys"))[:6]:
        r: dict[str, Any] = {}
        text = "".join(cached.stream(Job(prompt, max_tokens=8), r))
        assert text == plain.complete(prompt, 8).text, prompt
        assert warm.generate(cold.tokenizer.encode(prompt), 6, set()) == cold.generate(
            cold.tokenizer.encode(prompt), 6, set()
        )
        reused.append(r["cached_tokens"])
    assert sum(reused) > 0 and reused[0] == 0 and len(warm.slots) == 2  # the second file took the second slot
    assert all(len(s.ids) == s.cache.get_seq_length() for s in warm.slots)


def test_warm_up_reads_the_prompt_and_writes_nothing(raw_dir: Path) -> None:
    engine = load_engine(raw_dir, cache_slots=1)
    ids = engine.tokenizer.encode(CODE)
    assert engine.generate(ids, 0, set()) == [] and engine.slots[0].ids == ids
    engine.generate(ids + engine.tokenizer.encode("x"), 2, set())
    assert engine.cached_tokens == len(ids)


def test_a_stopped_stream_leaves_the_cache_consistent(raw_dir: Path) -> None:
    engine = load_engine(raw_dir, cache_slots=1)
    ids = engine.tokenizer.encode(CODE)
    gen = engine.stream(ids, 20, set())
    first = [next(gen), next(gen)]
    gen.close()
    slot = engine.slots[0]
    assert slot.ids == ids + first[:1] and slot.cache.get_seq_length() == len(slot.ids)
    assert engine.generate(ids, 5, set()) == load_engine(raw_dir).generate(ids, 5, set())


# ---------------------------------------------------------------- the surfaces


@pytest.fixture(scope="module", params=["torch", "llamacpp"])
def served(request: pytest.FixtureRequest, raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(model dir, engine) behind the surfaces: every surface test runs on PyTorch and on llama.cpp (the model exported
    to an f32 GGUF on first use), against the same PyTorch reference, so the answers must be equal."""
    if request.param == "torch":
        yield raw_dir, "torch"
        return
    pytest.importorskip("llama_cpp")
    from test_llamacpp_engine import gguf_ready_dir  # GGUF export needs a tokenizer llama.cpp can split

    root = tmp_path_factory.mktemp("proto-gguf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTIL_CODEGPT_CACHE", str(root / "cache"))
        yield gguf_ready_dir(root / "smol"), "llamacpp"


@pytest.fixture(scope="module")
def app_client(served: tuple[Path, str]) -> Iterator[TestClient]:
    model, engine = served
    values = {"model": str(model), "engine": engine, "max_tokens_limit": 24, "max_prompt_chars": 20_000}
    with TestClient(
        create_app(Completer(load_engine(model, cache_slots=2, engine=engine)), build_config(ServeConfig, values))
    ) as c:
        assert c.get("/health").json()["engine"] == engine
        yield c


@pytest.fixture(scope="module")
def reference(served: tuple[Path, str]) -> Completer:
    return Completer(load_engine(served[0]))  # PyTorch for both


def sse(body: str) -> list[Any]:
    events = [b[len("data: ") :] for b in body.split("\n\n") if b]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_continue_starcoder_prompt(app_client: TestClient, reference: Completer) -> None:
    """Continue with provider openai and a name it does not know: StarCoder's template, 10 stops, max_tokens 4096
    (clamped), temperature 0.01, streamed."""
    want = reference.complete(PREFIX, 24, suffix=SUFFIX, stop=CONTINUE_STOPS, temperature=0.01, seed=1)
    req = {"model": "anything", "prompt": continue_prompt("starcoder", PREFIX, SUFFIX), "max_tokens": 4096}
    req |= {"temperature": 0.01, "stop": CONTINUE_STOPS, "stream": True, "seed": 1}
    r = app_client.post("/v1/completions", json=req)
    assert r.status_code == 200, r.text
    events = sse(r.text)
    assert events[-1] == "[DONE]" and all(e["model"] == "anything" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want.text
    assert events[-2]["choices"][0]["finish_reason"] == want.finish_reason
    assert not any(m in want.text for m in (*SPECIALS, "<fim_", "\n"))
    plain = app_client.post("/v1/completions", json={**req, "stream": False}).json()
    assert plain["choices"][0]["text"] == want.text and plain["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_openai_usage_chunk_before_done(app_client: TestClient) -> None:
    req = {"prompt": PREFIX, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    events = sse(app_client.post("/v1/completions", json=req).text)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] <= 5
    assert all(e["usage"] is None for e in events[:-2]) and events[-3]["choices"][0]["finish_reason"]


def test_infill_with_extra_and_warm_up(app_client: TestClient, reference: Completer) -> None:
    """llama.vscode: a warm-up (n_predict 0) with the context, then the request with the current line as prompt."""
    line_start = PREFIX.rsplit("\n", 1)[0] + "\n"
    typed = PREFIX[len(line_start) :]
    extra = [{"filename": n or "tmp", "text": t} for n, t in EXTRA]
    base = {"input_prefix": line_start, "input_suffix": SUFFIX, "input_extra": extra, "prompt": typed}
    base |= {"samplers": ["top_k", "top_p", "infill"], "top_k": 40, "top_p": 0.99, "cache_prompt": True}
    fields = ["content", "timings/prompt_n", "timings/predicted_n", "truncated", "tokens_cached"]
    warm = app_client.post("/infill", json={**base, "n_predict": 0, "t_max_prompt_ms": 500, "t_max_predict_ms": 1})
    assert warm.status_code == 200 and warm.json()["content"] == ""
    r = app_client.post("/infill", json={**base, "n_predict": 16, "t_max_predict_ms": 250, "response_fields": fields})
    body = r.json()
    assert set(body) == set(fields), body
    want = reference.complete(PREFIX, 16, suffix=SUFFIX, extra=[(c["filename"], c["text"]) for c in extra])
    assert body["content"] == want.text
    assert body["tokens_cached"] > 0 and body["timings/prompt_n"] >= 1 and body["truncated"] is False


def test_llamacpp_completion_stream_and_health(app_client: TestClient, reference: Completer) -> None:
    assert app_client.get("/health").json()["status"] == "ok"
    r = app_client.post("/completion", json={"prompt": PREFIX, "n_predict": 12, "stream": True, "stop": ["\n"]})
    events = sse(r.text)
    assert all(not e["stop"] for e in events[:-1]) and events[-1]["stop"] is True
    assert "".join(e["content"] for e in events) == reference.complete(PREFIX, 12).text
    assert events[-1]["stop_type"] in ("eos", "limit", "word") and "timings" in events[-1]


def test_ollama_generate_stream_and_metadata(app_client: TestClient, reference: Completer) -> None:
    want = reference.complete(PREFIX, 10, suffix=SUFFIX)
    req = {"model": "qwen2.5-coder:1.5b", "prompt": PREFIX, "suffix": SUFFIX, "options": {"num_predict": 10}}
    r = app_client.post("/api/generate", json=req)
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert r.headers["content-type"].startswith("application/x-ndjson")
    assert all(x["done"] is False for x in lines[:-1]) and lines[-1]["done"] is True
    assert "".join(x["response"] for x in lines) == want.text and lines[-1]["eval_count"] <= 10
    assert {"model", "created_at", "done_reason", "prompt_eval_count", "total_duration"} <= set(lines[-1])
    whole = app_client.post("/api/generate", json={**req, "stream": False}).json()
    assert whole["response"] == want.text and whole["done"] is True
    assert app_client.post("/api/generate", json={"model": "x"}).json()["done_reason"] == "load"
    assert app_client.get("/api/tags").json()["models"][0]["name"] == "smol"
    assert ".Suffix" in app_client.post("/api/show", json={"model": "x"}).json()["template"]
    assert app_client.get("/api/version").json()["version"]


@pytest.mark.parametrize(
    "path,body,shape",
    [
        ("/v1/completions", {"prompt": 3}, {"message", "type", "param", "code"}),
        ("/infill", {"input_prefix": 3}, {"code", "message", "type"}),
        ("/completion", {"prompt": "x", "n_predict": "9"}, {"code", "message", "type"}),
        ("/api/generate", {"prompt": "x", "options": {"num_predict": "9"}}, None),
    ],
)
def test_errors_come_in_each_protocols_shape(app_client: TestClient, path: str, body: dict, shape: set | None) -> None:
    r = app_client.post(path, json=body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert (set(err) == shape) if shape else isinstance(err, str) and err
    assert app_client.post(path, json={"prompt": "x = ", "input_prefix": "x = "}).status_code == 200


def test_the_openai_client(app_client: TestClient, reference: Completer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=app_client)
    want = reference.complete(PREFIX, 12, suffix=SUFFIX, stop=["\n\n", "#"])
    got = client.completions.create(model="m", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, stop=["\n\n", "#"])
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    chunks = list(
        client.completions.create(
            model="m",
            prompt=PREFIX,
            suffix=SUFFIX,
            max_tokens=12,
            stop=["\n\n", "#"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_a_file_longer_than_the_context_still_hits_the_cache(raw_dir: Path) -> None:
    """The start of an over-long prompt drops by whole blocks (an eighth of the context), so the next keystroke's
    prompt shares it, unless its growth crosses a block's end."""
    engine = load_engine(raw_dir, cache_slots=1)
    c, plain = Completer(engine), Completer(load_engine(raw_dir))
    long = CODE * 12  # far more than the 256 positions of the tiny model
    hits = []
    for extra in ("x", "x = ", "x = os", "x = os.path", "x = os.path.join("):
        r: dict[str, Any] = {}
        text = "".join(c.stream(Job(long + extra, max_tokens=8), r))
        assert r["truncated"] and r["prompt_tokens"] <= engine.context - 8
        assert text == plain.complete(long + extra, 8).text
        hits.append(r["cached_tokens"])
    assert hits[0] == 0 and sorted(hits[1:])[1] > 150


def test_a_fim_model_reads_its_own_template(raw_dir: Path, tmp_path: Path) -> None:
    from distil_codegpt.data.tokenizer import load_tokenizer

    tok = load_tokenizer(raw_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]})
    engine = ScriptedEngine(tok, tmp_path, tok.encode("a, b"))
    c = Completer(engine, fim="starcoder")
    prompt = continue_prompt("qwen", PREFIX, SUFFIX)  # whatever the client built, the model gets its own
    assert c.complete(PREFIX, 8, suffix=SUFFIX).text == "a, b"
    read = tok.decode(engine.prompts[0])
    assert read == f"<|endoftext|><fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    assert split_prompt(prompt).prefix == PREFIX
    c.complete(CODE * 20, 8, suffix=CODE * 20)  # far longer than the context: the ends are cut, never a marker
    ids = engine.prompts[-1]
    assert len(ids) <= engine.context - 8
    read = tok.decode(ids)
    assert read.startswith("<|endoftext|><fim_prefix>") and read.endswith("<fim_middle>")
    assert read.split("<fim_suffix>")[0].endswith(CODE[-20:]) and read.split("<fim_suffix>")[1].startswith(CODE[:20])
    with pytest.raises(ConfigError, match="no <fim_prefix>"):
        Completer(ScriptedEngine(load_tokenizer(raw_dir), tmp_path, []), fim="starcoder")


def test_prompts_read_in_chunks_and_a_cancelled_read_stops(raw_dir: Path) -> None:
    """Reading a prompt in chunks gives the one-pass answer; a request cancelled while its prompt is read stops
    after the chunk in hand, and what it read serves the next request from the cache."""
    whole, chunked = load_engine(raw_dir), load_engine(raw_dir, cache_slots=1)
    chunked.prefill_chunk = 16
    ids = whole.tokenizer.encode(CODE)[:200]
    assert len(ids) > 3 * 16
    assert chunked.generate(ids, 8, set()) == whole.generate(ids, 8, set())
    fresh = load_engine(raw_dir, cache_slots=1)
    fresh.prefill_chunk, asked = 16, []
    fresh.interrupt = lambda: asked.append(1) or len(asked) >= 2  # the client leaves during the second chunk
    assert fresh.generate(ids, 8, set()) == []
    assert fresh.slots[0].ids == ids[:32] and fresh.slots[0].cache.get_seq_length() == 32
    fresh.interrupt = None
    assert fresh.generate(ids, 8, set()) == whole.generate(ids, 8, set()) and fresh.cached_tokens == 32
