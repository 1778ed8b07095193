"""The sweep: the whole study on tiny settings, then a rerun that skips every finished step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import SLICE, STDLIB

from distil_codegpt.config import ConfigError, SweepConfig, build_config
from distil_codegpt.experiment.sweep import Sweep, run_sweep

TINY = {
    "vocab_size": 1000,
    "line_examples": 40,
    "teacher_layers": 3,
    "teacher_steps": 6,
    "students": [1, 2],
    "student_steps": 3,
    "variant_layers": 2,
    "seq_len": 32,
    "batch_size": 4,
    "warmup_steps": 1,
    "eval_limit": 6,
    "eval_batch_size": 4,
    "latency_samples": 2,
    "threads": 1,
    "teacher_cache": True,  # the frozen-teacher student distils from the teacher cache
    "cache_top_k": 8,
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, SweepConfig]:
    root = tmp_path_factory.mktemp("sweep")
    src = root / "src"
    src.mkdir()
    for name in SLICE:
        shutil.copy(STDLIB / name, src / name)
    cfg = build_config(SweepConfig, {**TINY, "out": str(root / "out"), "src": [str(src)]})
    return root / "out", run_sweep(cfg), cfg


def test_every_model_of_the_study_is_made_and_evaluated(swept) -> None:
    out, summary, _ = swept
    names = [m["name"] for m in json.loads((out / "sweep.json").read_text())["models"]]
    variants = ["pretrained-weights", "frozen", "low-temperature", "high-temperature", "no-cosine", "longer", "ce-only"]
    assert names == ["teacher", "untrained", "students/kd-1", "students/kd-2"] + [f"students/2-{v}" for v in variants]
    for name in names:
        metrics = json.loads((out / name / "eval" / "metrics.json").read_text())
        assert metrics["n"] == 6 and 0 <= metrics["edit_sim"] <= 100
    assert summary["rows"] == len(names) and (out / "results.md").is_file() and (out / "results.csv").is_file()
    longer = json.loads((out / "students/2-longer/run.json").read_text())["metrics"]
    assert longer["steps"] == 6  # twice student_steps
    frozen = json.loads((out / "students/2-frozen/run.json").read_text())["config"]
    assert frozen["teacher_mode"] == "frozen" and frozen["temperature"] == 2.0
    assert frozen["teacher_cache"] == str(out / "teacher-cache") and frozen["alpha_cos"] == 0.0
    cache = json.loads((out / "teacher-cache" / "cache.json").read_text())
    assert cache["complete"] and cache["top_k"] == 8 and cache["seq_len"] == 32
    low = json.loads((out / "students/2-low-temperature/run.json").read_text())["config"]
    assert low["temperature"] == 1.0 and low["teacher_mode"] == "train"
    ce = json.loads((out / "students/2-ce-only/run.json").read_text())
    assert ce["stage"] == "train"  # no teacher at all: the control
    pre = json.loads((out / "students/2-clm-pretrain/student-init/config.json").read_text())
    assert pre["distil_init"] == "pretrained"


def test_rerun_skips_finished_steps(swept, capsys: pytest.CaptureFixture) -> None:
    out, first, cfg = swept
    weights = out / "students/kd-2/model.safetensors"
    before = weights.stat().st_mtime_ns
    (out / "students/kd-1/eval/metrics.json").unlink()  # as if interrupted before this evaluation
    capsys.readouterr()
    again = run_sweep(cfg)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    ran = [x for x in lines if "skipped" not in x]
    assert len(ran) == 1 and "students/kd-1: evaluate" in ran[0]
    assert again["skipped"] == again["steps"] - 1 and weights.stat().st_mtime_ns == before


def test_students_deeper_than_the_teacher_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="students: 13 layers exceed the teacher's 12"):
        Sweep(build_config(SweepConfig, {"out": str(tmp_path), "students": [4, 13]}))
    with pytest.raises(ConfigError, match="variants: 'bigger' is not allowed"):
        build_config(SweepConfig, {"out": str(tmp_path), "variants": ["frozen", "bigger"]})
