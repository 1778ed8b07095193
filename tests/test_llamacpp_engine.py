"""llama.cpp as an engine (llama-cpp-python): an HF model exported once to an f32 GGUF (cached by the directory's
content), or a .gguf file as it is, gives the torch engine's greedy ids and completions; its own KV cache serves the
next keystroke's prompt; a cancelled prompt read leaves the cache consistent; `--engine auto` picks it for a .gguf;
`--draft` is refused with one line; `complete` and `evaluate` run on it. The serve surfaces run on it in
test_protocols.py (the same requests against both engines)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_gguf_export import make_model, make_tokenizer

from distil_codegpt.cli import main
from distil_codegpt.config import UserError
from distil_codegpt.engines.base import TorchEngine
from distil_codegpt.engines.load import load_engine, runtime_for
from distil_codegpt.engines.speculative import with_draft
from distil_codegpt.serve.complete import Completer, Job

pytest.importorskip("llama_cpp")

from distil_codegpt.engines.llamacpp_engine import LlamaCppEngine, exported_gguf  # noqa: E402

CODE = "import os\n\n\nclass Paths:\n    def join(self, a, b):\n        return os.path.join(a, b)\n"
PROMPTS = ["def f(x):\n    return ", "class ", "x = [1, ", "import os\npath = os.pa", "for i in range("]


def gguf_ready_dir(out: Path) -> Path:
    """A tiny llama (2 layers, width 64, weights spread wide so that it writes varied code-like text rather than one
    token again and again) with a SmolLM2-style tokenizer (StarCoder's digit split, FIM markers): a raw-mode model
    that GGUF export accepts."""
    tok = make_tokenizer("smollm")
    tok.save_pretrained(out)
    make_model("llama", len(tok)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private $DISTIL_CODEGPT_CACHE: exports and imports of this module land there."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTIL_CODEGPT_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    return gguf_ready_dir(tmp_path_factory.mktemp("lcpp") / "smol")


@pytest.fixture(scope="module")
def torch_engine(model_dir: Path) -> TorchEngine:
    return load_engine(model_dir)


@pytest.fixture(scope="module")
def cpp(model_dir: Path) -> LlamaCppEngine:
    engine = load_engine(model_dir, engine="llamacpp", cache_slots=1)
    assert isinstance(engine, LlamaCppEngine)
    return engine


def typing_session(code: str) -> list[str]:
    cuts = [i for i, ch in enumerate(code) if ch in " \n(."] + [len(code)]
    return [code[:i] for i in cuts if i > 0]


def test_greedy_ids_equal_the_torch_engines(cpp: LlamaCppEngine, torch_engine: TorchEngine) -> None:
    """Measured: every prompt of the session (30) gives the same 16 greedy ids on both engines."""
    tok = torch_engine.tokenizer
    prompts = typing_session(CODE)
    same = 0
    for prompt in prompts:
        ids = [0, *tok.encode(prompt, add_special_tokens=False)]
        same += cpp.generate(ids, 16, set()) == torch_engine.generate(ids, 16, set())
    assert same == len(prompts)
    assert cpp.context == torch_engine.context == 256 and cpp.tokenizer.get_vocab() == tok.get_vocab()


def test_completions_equal_the_torch_engines(cpp: LlamaCppEngine, torch_engine: TorchEngine) -> None:
    """Through the completion core: framing, token healing of a half-typed word (first_allowed), stops, lines."""
    ours, theirs = Completer(cpp), Completer(torch_engine)
    for prompt in PROMPTS + typing_session(CODE)[::3]:
        for kw in ({}, {"max_lines": 3}, {"suffix": ")\n"}):
            assert ours.complete(prompt, 16, **kw) == theirs.complete(prompt, 16, **kw), (prompt, kw)
    sampled = [c.complete("x = ", 12, temperature=0.8, top_p=0.9, seed=3).text for c in (ours, theirs)]
    assert sampled[0] == sampled[1]  # the same picking from (nearly) the same logits, seeded alike


def test_the_next_keystroke_reads_only_what_changed(model_dir: Path, torch_engine: TorchEngine) -> None:
    cached, plain = load_engine(model_dir, engine="llamacpp", cache_slots=1), Completer(torch_engine)
    c, reused = Completer(cached), []
    for prompt in typing_session(CODE):
        r: dict[str, Any] = {}
        assert "".join(c.stream(Job(prompt, max_tokens=8), r)) == plain.complete(prompt, 8).text, prompt
        assert cached.llm.n_tokens == len(cached.held)
        reused.append((r["cached_tokens"], r["prompt_tokens"]))
    assert reused[0][0] == 0 and all(hit >= prompt_n - 8 for hit, prompt_n in reused[1:])  # each grows by a word
    off = load_engine(model_dir, engine="llamacpp")  # cache_slots 0: every prompt read in full
    off.generate([0, 1, 2, 3], 2, set())
    off.generate([0, 1, 2, 3, 4], 2, set())
    assert off.cached_tokens == 0


def test_a_cancelled_read_keeps_the_cache_consistent(model_dir: Path, torch_engine: TorchEngine) -> None:
    engine = load_engine(model_dir, engine="llamacpp", cache_slots=1)
    ids = torch_engine.tokenizer.encode(CODE * 3)[:200]
    engine.prefill_chunk, asked = 16, []
    engine.interrupt = lambda: asked.append(1) or len(asked) >= 2  # the client leaves during the second chunk
    assert engine.generate(ids, 8, set()) == [] and engine.held == ids[:32] and engine.llm.n_tokens == 32
    engine.interrupt = None
    assert engine.generate(ids, 8, set()) == torch_engine.generate(ids, 8, set()) and engine.cached_tokens == 32
    gen = engine.stream(ids, 20, set())
    first = [next(gen), next(gen)]
    gen.close()  # a stream stopped after two tokens: the context holds the prompt and the first
    assert engine.held == ids + first[:1] and engine.llm.n_tokens == len(engine.held)
    assert engine.generate(ids + first, 4, set()) == torch_engine.generate(ids + first, 4, set())


def test_export_on_first_use_is_cached_by_content(model_dir: Path, cpp: LlamaCppEngine, tmp_path: Path) -> None:
    path = exported_gguf(model_dir)
    assert path == cpp.gguf_path and path.stat().st_mtime_ns == exported_gguf(model_dir).stat().st_mtime_ns
    assert str(path).startswith(os.environ["DISTIL_CODEGPT_CACHE"])
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert exported_gguf(copy) == path  # the same files: the same export
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert exported_gguf(copy) != path


def test_auto_picks_llamacpp_for_a_gguf_file(cpp: LlamaCppEngine, model_dir: Path, torch_engine: TorchEngine) -> None:
    gguf = cpp.gguf_path
    assert runtime_for(gguf) == "llamacpp" and runtime_for(model_dir) == "torch"
    assert runtime_for(model_dir, "llamacpp") == "llamacpp" and runtime_for(gguf, "torch") == "torch"
    from_file = load_engine(gguf)
    assert isinstance(from_file, LlamaCppEngine) and from_file.tokenizer.get_vocab() == cpp.tokenizer.get_vocab()
    ids = [0, *cpp.tokenizer.encode("def f(x):", add_special_tokens=False)]
    assert from_file.generate(ids, 8, set()) == torch_engine.generate(ids, 8, set())
    assert isinstance(load_engine(gguf, engine="torch"), TorchEngine)  # imported once, run by PyTorch
    with pytest.raises(UserError, match="engine: 'onnx'; use one of auto, torch, llamacpp"):
        runtime_for(model_dir, "onnx")


def test_draft_and_int8_are_refused_with_the_fix(cpp: LlamaCppEngine, model_dir: Path) -> None:
    with pytest.raises(UserError, match="draft: the llamacpp engine runs no draft model.*--engine torch"):
        with_draft(cpp, str(model_dir))
    with pytest.raises(UserError, match="quantize: int8 is the torch engine's.*--quant q8_0"):
        load_engine(model_dir, quantize="int8", engine="llamacpp")


def test_complete_and_evaluate_verbs(
    model_dir: Path, cpp: LlamaCppEngine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "m.py"
    f.write_text(CODE)
    outs = []
    for model, engine in ((model_dir, "torch"), (model_dir, "llamacpp"), (cpp.gguf_path, "auto")):
        assert main(["complete", f"{f}:6:16", "--model", str(model), "--engine", engine]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2]
    test = tmp_path / "test.json"
    test.write_text("".join(json.dumps({"input": p, "gt": "x"}) + "\n" for p in PROMPTS))
    preds = []
    for engine in ("torch", "llamacpp"):
        out = tmp_path / engine
        args = ["evaluate", "--model", str(model_dir), "--test", str(test), "--out", str(out), "--engine", engine]
        assert main([*args, "--latency-samples", "0", "--max-new-tokens", "12"]) == 0
        preds.append((out / "predictions.txt").read_text())
    assert preds[0] == preds[1]
    metrics = json.loads((tmp_path / "llamacpp" / "metrics.json").read_text())
    assert metrics["engine"] == "llamacpp" and metrics["disk_mb"] == pytest.approx(cpp.disk_mb())
