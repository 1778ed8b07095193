"""Speculative completion: whatever the draft proposes, the output is token for token the teacher's greedy output,
through the prefix cache too; a draft that is the teacher itself is always accepted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_complete import raw_llama_dir
from transformers import AutoModelForCausalLM

from distil_codegpt.config import StudentConfig, UserError, build_config
from distil_codegpt.engines.load import load_engine
from distil_codegpt.engines.speculative import SpeculativeEngine
from distil_codegpt.model.student import build_student
from distil_codegpt.serve.complete import Completer

PROMPTS = ["import os\n\ndef f(x):\n    return ", "class A:\n    def g(self):\n        return [", "x = 1\ny = ", "for"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    teacher = raw_llama_dir(root / "teacher")
    model = AutoModelForCausalLM.from_pretrained(teacher)
    torch.manual_seed(1)
    with torch.no_grad():  # a teacher that does not only repeat its input: its layers perturbed
        for p in model.model.layers.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(teacher)
    build_student(build_config(StudentConfig, {"teacher": str(teacher), "out": str(root / "s1"), "layers": 1}))
    return {"teacher": teacher, "student": root / "s1"}


def teacher_ids(dirs: dict[str, Path], ids: list[int], n: int) -> list[int]:
    return load_engine(dirs["teacher"]).generate(ids, n, set())


@pytest.mark.parametrize("k", [0, 1, 3])
def test_output_is_the_teachers_greedy_output(dirs: dict[str, Path], k: int) -> None:
    teacher = load_engine(dirs["teacher"])
    spec = SpeculativeEngine(
        load_engine(dirs["teacher"], cache_slots=2), load_engine(dirs["student"], cache_slots=2), k
    )
    tok = teacher.tokenizer
    for prompt in PROMPTS + [p + "z" for p in PROMPTS]:  # the second round reuses both caches
        ids = tok.encode(prompt)
        for n in (1, 7, 30):
            assert spec.generate(ids, n, set()) == teacher.generate(ids, n, set()), (prompt, n)
    assert spec.stats.teacher_passes < spec.stats.tokens  # the draft saved teacher passes
    assert 0 < spec.stats.acceptance < 1
    for slot_engine in (spec.teacher, spec.draft):
        assert all(len(s.ids) == (s.cache.get_seq_length() if s.cache else 0) for s in slot_engine.slots)


def test_stops_and_healing_match_the_teacher(dirs: dict[str, Path]) -> None:
    teacher = load_engine(dirs["teacher"])
    spec = SpeculativeEngine(load_engine(dirs["teacher"]), load_engine(dirs["student"]))
    ids = teacher.tokenizer.encode(PROMPTS[0])
    full = teacher.generate(ids, 20, set())
    stop = {full[5]}
    assert spec.generate(ids, 20, stop) == teacher.generate(ids, 20, stop)
    allowed = frozenset(sorted(set(range(50, 90))))
    got = spec.generate(ids, 12, set(), first_allowed=allowed)
    assert got == teacher.generate(ids, 12, set(), first_allowed=allowed) and got[0] in allowed
    for prompt in PROMPTS:  # a completion through the Completer: the same line as the teacher's
        assert Completer(spec).complete(prompt, 24).text == Completer(teacher).complete(prompt, 24).text


def test_the_teacher_as_its_own_draft_is_always_accepted(dirs: dict[str, Path]) -> None:
    spec = SpeculativeEngine(load_engine(dirs["teacher"]), load_engine(dirs["teacher"]))
    ids = spec.tokenizer.encode(PROMPTS[1])
    assert spec.generate(ids, 30, set()) == teacher_ids(dirs, ids, 30)
    assert spec.stats.acceptance == 1.0 and spec.stats.tokens_per_pass > 2


def test_a_draft_with_another_vocabulary_is_refused(dirs: dict[str, Path], tiny_data: dict) -> None:
    from transformers import GPT2LMHeadModel

    from distil_codegpt.data.tokenizer import copy_tokenizer, load_tokenizer
    from distil_codegpt.model.presets import preset_config

    other = dirs["teacher"].parent / "other"
    GPT2LMHeadModel(preset_config("tiny", len(load_tokenizer(tiny_data["tok"])))).save_pretrained(other)
    copy_tokenizer(tiny_data["tok"], other)
    with pytest.raises(UserError, match="another vocabulary"):
        SpeculativeEngine(load_engine(dirs["teacher"]), load_engine(other))


def test_evaluate_and_complete_take_a_draft(dirs: dict[str, Path], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """`evaluate --draft` scores exactly the teacher's predictions and reports the draft's acceptance; `complete
    --draft` prints the teacher's line."""
    import json

    from distil_codegpt.config import CompleteConfig, EvaluateConfig
    from distil_codegpt.evaluate.run import run_evaluate
    from distil_codegpt.serve.complete import run_complete

    test = tmp_path / "test.json"
    test.write_text("".join(json.dumps({"input": p, "gt": "x"}) + "\n" for p in PROMPTS))
    base = {"model": str(dirs["teacher"]), "test": str(test), "max_new_tokens": 16, "latency_samples": 0}
    alone = run_evaluate(build_config(EvaluateConfig, {**base, "out": str(tmp_path / "a"), "batch_size": 1}))
    drafted = run_evaluate(
        build_config(EvaluateConfig, {**base, "out": str(tmp_path / "b"), "draft": str(dirs["student"])})
    )
    assert (tmp_path / "a/predictions.txt").read_text() == (tmp_path / "b/predictions.txt").read_text()
    assert drafted["edit_sim"] == alone["edit_sim"] and 0 <= drafted["draft"]["acceptance"] <= 1
    code = tmp_path / "m.py"
    code.write_text(PROMPTS[0])
    cfg = {"model": str(dirs["teacher"]), "file": str(code), "max_new_tokens": 16}
    plain = run_complete(build_config(CompleteConfig, cfg)).text
    assert run_complete(build_config(CompleteConfig, {**cfg, "draft": str(dirs["student"])})).text == plain
