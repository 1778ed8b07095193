"""Completing real, unfinished code: cursor parsing, lenient normalisation, healing, de-normalisation; and raw code
with a real teacher's own tokenizer (a llama with a SmolLM2-like one): framing, line ends inside tokens, specials."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_real_tokenizer import smollm_like_tokenizer
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from distil_codegpt.config import StudentConfig, UserError, build_config
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.engines.base import Engine, TorchEngine
from distil_codegpt.engines.load import load_engine
from distil_codegpt.model.presets import preset_config
from distil_codegpt.serve.complete import Completer, Job, read_cursor, scan_end_state

UNFINISHED = {
    "open_string": "def f(x):\n    return open('data.tx",
    "open_triple_string": 'def f():\n    """Return the',
    "open_bracket": "x = foo(a, b,",
    "open_brackets_lines": "result = {\n    'a': [1, 2,\n",
    "mid_identifier": "import os\n\npath = os.pa",
    "keyword_prefix": "def f():\n    retu",
    "after_operator": "total = count + ",
    "fstring_open_field": "msg = f'{name",
    "comment": "x = 1  # set the",
    "bad_indentation": "if x:\n        a = 1\n    b = 2\nc = (",
    "tabs_and_spaces": "def f():\n\tif x:\n        y",
    "python2": "print 'hello'\nx = `y`\nz = ",
    "non_python": "$$$ ??? <<< \\",
    "empty": "",
    "unicode": "café = naïve(",
}


@pytest.fixture(scope="module")
def engine(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> TorchEngine:
    """A tiny model trained a little on the stdlib slice (codexglue format)."""
    from test_trainer import run_train, train_cfg

    out = tmp_path_factory.mktemp("complete") / "model"
    run_train(train_cfg(tiny_data, out, max_steps=150, lr=1e-2, eval_every=0))
    engine = load_engine(out)
    assert isinstance(engine, TorchEngine)
    return engine


@pytest.mark.parametrize(
    ("code", "state", "start"),
    [
        ("x = 'abc", "string", 4),
        ('x = """doc\nmore', "string", 4),
        ("x = rb'\\x00", "string", 4),
        ("x = 'a\\'b", "string", 4),
        ("x = 'abc'", "code", -1),
        ("x = 1  # it's", "comment", -1),
        ("x = '#'; y = f", "code", -1),
        ("buf'x", "string", 3),  # `buf` is a name, the quote opens a string (as tokenize reads `print'hi'`)
        ("x = bar", "code", -1),
        ("x = f'{a", "string", 4),
    ],
)
def test_scan_end_state(code: str, state: str, start: int) -> None:
    got = scan_end_state(code)
    assert got[0] == state and (got[1] == start or state != "string")


@pytest.mark.parametrize("name", sorted(UNFINISHED))
def test_unfinished_code_never_raises(engine: TorchEngine, name: str) -> None:
    result = Completer(engine).complete(UNFINISHED[name], 12)
    assert isinstance(result.text, str) and "\n" not in result.text
    assert result.finish_reason in ("stop", "length")


def test_open_string_is_closed_first(engine: TorchEngine) -> None:
    result = Completer(engine).complete(UNFINISHED["open_string"], 8)
    assert result.text.startswith("'") and any("inside a string" in n for n in result.notes)


def test_comment_gives_empty_completion_with_note(engine: TorchEngine) -> None:
    result = Completer(engine).complete(UNFINISHED["comment"], 8)
    assert result.text == "" and "comment" in result.notes[0]


def test_half_typed_word_is_healed(engine: TorchEngine) -> None:
    """The first new token must continue the typed word: its text starts with ` re` (the word `re...`)."""
    seen: list[int] = []
    real_stream = engine.stream

    def spy(*args, **kw):
        for i in real_stream(*args, **kw):
            seen.append(i)
            yield i

    engine.stream = spy  # type: ignore[method-assign]
    try:
        Completer(engine).complete("def f():\n    re", 6)
    finally:
        del engine.stream
    first = engine.tokenizer.decode([seen[0]])
    assert first.startswith(" re") or " re".startswith(first)


def test_greedy_completion_matches_the_engine_tokens(engine: TorchEngine) -> None:
    """Normalised mode: the completion is the de-normalised text of exactly the ids the engine produced."""
    c = Completer(engine)
    code = "import os\nx = "
    prompt = c._prompt(Job(code, max_tokens=10))
    ids = engine.generate(prompt.ids, 10, c.stop_ids)
    text = engine.tokenizer.decode(ids)
    from distil_codegpt.data.denormalize import denormalize_token, format_line

    expected = format_line([denormalize_token(t) for t in text.split() if t != "<EOL>"])
    assert c.complete(code, 10).text == expected


def test_stream_pieces_join_to_the_completion(engine: TorchEngine) -> None:
    c = Completer(engine)
    for code in ("x = foo(a, ", "import os\npath = os.pa", "for i in range("):
        assert "".join(c.stream(Job(code, max_tokens=16))) == c.complete(code, 16).text


def test_stop_strings_cut_the_completion(engine: TorchEngine) -> None:
    c = Completer(engine)
    prompts = ["x = ", "import os\npath = os.", "for i in range(", "self.assertEqual(", "return self."]
    code, full = max(((p, c.complete(p, 16).text) for p in prompts), key=lambda pf: len(pf[1]))
    assert len(full) >= 2, "the model should write something after one of the prompts"
    cut = full[len(full) // 2 :][:2]
    stopped = c.complete(code, 16, stop=[cut])
    assert stopped.text == full[: full.find(cut)] and stopped.finish_reason == "stop"


def test_raw_mode_stops_at_the_line_end(engine: TorchEngine) -> None:
    c = Completer(engine)
    c.mode = "raw"  # same model, fed the code as text: the prompt path of raw-mode models
    for code in UNFINISHED.values():
        result = c.complete(code, 10)
        assert "\n" not in result.text and "\r" not in result.text


def test_sampling_is_seeded(engine: TorchEngine) -> None:
    c = Completer(engine)
    a = c.complete("x = ", 12, temperature=1.0, top_p=0.9, seed=3).text
    assert a == c.complete("x = ", 12, temperature=1.0, top_p=0.9, seed=3).text


def test_read_cursor(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import os\nx = os.path\ny = 2\n")
    assert read_cursor(str(f)) == "import os\nx = os.path\ny = 2\n"
    assert read_cursor(f"{f}:2") == "import os\nx = os.path"
    assert read_cursor(f"{f}:2:7") == "import os\nx = os"
    with pytest.raises(UserError, match="line 9 is outside"):
        read_cursor(f"{f}:9")
    with pytest.raises(UserError, match="not found"):
        read_cursor(str(tmp_path / "nope.py"))


def test_torch_engine_greedy_matches_hf_generate(engine: TorchEngine) -> None:
    ids = engine.tokenizer.encode("<s> import os <EOL> x = os .", add_special_tokens=False)
    ours = engine.generate(ids, 8, set())
    ref = engine.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert ours == ref[0, len(ids) :].tolist()


def test_student_dir_is_an_engine(engine: TorchEngine, tmp_path: Path) -> None:
    from distil_codegpt.model.student import build_student

    build_student(build_config(StudentConfig, {"teacher": str(engine.path), "out": str(tmp_path / "s"), "layers": 1}))
    student = load_engine(tmp_path / "s")
    assert isinstance(student.model, GPT2LMHeadModel) and student.model.config.n_layer == 1
    assert load_tokenizer(tmp_path / "s").get_vocab() == engine.tokenizer.get_vocab()


# ---------------------------------------------------------------- a real teacher's tokenizer, raw mode

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # SmolLM2's document separator, chat bos and eos
RAW_PROMPTS = [
    "def f(x):\n    return ",
    "def f(x):\n",
    "class ",
    "x = [1, ",
    "class A:\n    def g(self):\n        return [",
]


def raw_llama_dir(out: Path) -> Path:
    """An untrained tiny llama with a SmolLM2-like tokenizer saved in its directory, as a real teacher comes.

    Its tied embeddings make it repeat the prompt's last token, some of which hold code and a line break (`):` + break).
    """
    tok = smollm_like_tokenizer(out)
    torch.manual_seed(0)
    config = preset_config("tiny-llama", len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def greedy_ids(engine: Engine, prompt: str, max_tokens: int) -> list[int]:
    """The engine's own greedy ids after the prompt framed as in pretraining (`<|endoftext|>` in front), stopped only
    at the special tokens: the reference a raw completion is checked against."""
    tok = engine.tokenizer
    ends = {tok.convert_tokens_to_ids(t) for t in SPECIALS}
    ids = [tok.convert_tokens_to_ids("<|endoftext|>"), *tok.encode(prompt, add_special_tokens=False)]
    return engine.generate(ids, max_tokens, ends)


def line_of(tok: object, ids: list[int]) -> str:
    """Ids decoded and cut at the first line break (blanks at the end wait for more text: dropped)."""
    return tok.decode(ids).split("\n", 1)[0].rstrip()


class ScriptedEngine(Engine):
    """Writes a fixed script of ids, stopping as every engine does: before the first of `stop_ids`."""

    name = "scripted"

    def __init__(self, tokenizer: object, path: Path, script: list[int]) -> None:
        self.tokenizer, self.path, self.context, self.script = tokenizer, path, 256, script
        self.prompts: list[list[int]] = []

    def stream(self, ids: list[int], max_new_tokens: int, stop_ids: set[int], **kw: object) -> Iterator[int]:
        self.prompts.append(ids)
        for i in self.script[:max_new_tokens]:
            if i in stop_ids:
                return
            yield i


@pytest.fixture(scope="module")
def raw_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return load_engine(raw_llama_dir(tmp_path_factory.mktemp("raw-llama") / "m"))


def test_raw_teacher_completion_is_the_engines_greedy_line(raw_engine: Engine) -> None:
    c = Completer(raw_engine)
    tok = raw_engine.tokenizer
    assert c.mode == "raw"
    cut_inside = False
    for prompt in RAW_PROMPTS:
        ids = greedy_ids(raw_engine, prompt, 12)
        result = c.complete(prompt, 12)
        assert result.text == line_of(tok, ids), prompt
        assert result.finish_reason == ("stop" if "\n" in tok.decode(ids) else "length")
        assert "".join(c.stream(Job(prompt, max_tokens=12))) == result.text
        assert "\n" not in result.text and not any(t in result.text for t in SPECIALS)
        breaks = [t for t in (tok.decode([i]) for i in ids) if "\n" in t]
        cut_inside |= bool(breaks) and not breaks[0].startswith("\n")
    assert cut_inside  # some completion ended inside a token that holds code before its line break


def test_raw_prompt_is_framed_by_the_separator_not_the_chat_bos(raw_engine: Engine) -> None:
    tok = raw_engine.tokenizer
    ids = Completer(raw_engine)._prompt(Job("def f(x):\n    return ", max_tokens=8)).ids
    assert ids[0] == tok.convert_tokens_to_ids("<|endoftext|>") and tok.bos_token_id not in ids
    assert tok.decode(ids[1:]) == "def f(x):\n    return "


@pytest.mark.parametrize("end", SPECIALS)
def test_raw_completion_ends_at_every_special_token(raw_engine: Engine, end: str, tmp_path: Path) -> None:
    tok = raw_engine.tokenizer
    script = [*tok.encode("a + b", add_special_tokens=False), tok.convert_tokens_to_ids(end)]
    script += tok.encode(" c\n", add_special_tokens=False)
    engine = ScriptedEngine(tok, tmp_path, script)
    result = Completer(engine).complete("x = ", 16)
    assert (result.text, result.finish_reason) == ("a + b", "stop")


def test_raw_completion_keeps_the_code_before_a_break_inside_a_token(raw_engine: Engine, tmp_path: Path) -> None:
    tok = raw_engine.tokenizer
    script = tok.encode("x):\n    return x + 1\n", add_special_tokens=False)
    assert any("\n" in (t := tok.decode([i])) and not t.startswith("\n") for i in script)
    result = Completer(ScriptedEngine(tok, tmp_path, script)).complete("def f(", 16)
    assert (result.text, result.finish_reason) == ("x):", "stop")


def test_complete_verb_with_a_raw_teacher(raw_engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from distil_codegpt.config import CompleteConfig
    from distil_codegpt.serve.complete import run_complete

    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f(x):\n    return x\n")
    cfg = build_config(CompleteConfig, {"model": str(raw_engine.path), "file": f"{f}:3", "max_new_tokens": 12})
    result = run_complete(cfg)
    expected = line_of(raw_engine.tokenizer, greedy_ids(raw_engine, "import os\n\ndef f(x):", 12))
    assert result.text == expected and capsys.readouterr().out == expected + "\n"
