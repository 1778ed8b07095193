"""benchmarks/recipe_table.py: a student's stages found by walking back through run.json files (cut, local stage,
global KD), ES kept as the ratio of means with its paired-bootstrap interval, the learning curve's minutes, and
--save copying the small files behind the table."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import benchmark


@pytest.fixture(scope="module")
def table() -> ModuleType:
    return benchmark("recipe_table")


def write(path: Path, data: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "run.json").write_text(json.dumps(data))


def study(root: Path) -> None:
    """cut-mix (30 s of scoring) -> local-mix (10 min, 1,000 tokens) -> mix-local (30 min, 5,000 tokens), with a
    snapshot at 12 training minutes of the last stage and evaluations of the teacher, the student and the snapshot
    on 4 examples."""
    write(root / "cut-mix", {"stage": "student", "seconds": 30.0, "config": {}})
    local = {"stage": "local", "student": str(root / "cut-mix")}
    write(root / "local-mix", {"stage": "distil", "config": local, "metrics": {"train_seconds": 600, "tokens": 1000}})
    kd = {"stage": "global", "student": "elsewhere/local-mix"}  # moved: found next to the student by its name
    write(root / "mix-local", {"stage": "distil", "config": kd, "metrics": {"train_seconds": 1800, "tokens": 5000}})
    test = root / "test.json"
    answers = ["return x", "pass", "x = 1", "print(y)"]
    test.write_text("".join(json.dumps({"input": "def f():", "gt": a}) + "\n" for a in answers))
    preds = {
        "teacher-eval": answers,
        "mix-local/eval": ["return x", "pass", "x = 2", "print(z)"],
        "mix-local/snapshots/1-of-4/eval": ["return", "", "x = 2", "print(z)"],
    }
    for d, p in preds.items():
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d / "predictions.txt").write_text("\n".join(p) + "\n")
        metrics = {"n": 4, "test": str(test), "edit_sim": 0.0, "exact_match": 0.0}
        (root / d / "metrics.json").write_text(json.dumps(metrics))
    snap = {"fraction": 0.25, "step": 10, "tokens": 1200, "train_seconds": 720}
    (root / "mix-local/snapshots/1-of-4/snapshot.json").write_text(json.dumps(snap))
    (root / "mix-local/snapshots/2-of-4").mkdir()  # saved, not yet evaluated: in neither the curve nor the copies
    (root / "mix-local/snapshots/2-of-4/snapshot.json").write_text(json.dumps({**snap, "train_seconds": 1000}))


def test_stages_walk_back_to_the_cut(table: ModuleType, tmp_path: Path) -> None:
    study(tmp_path)
    assert table.stages(tmp_path / "mix-local") == [("cut", 0.5, 0), ("local", 10.0, 1000), ("global", 30.0, 5000)]


def test_es_kept_is_the_ratio_of_means_inside_its_interval(table: ModuleType) -> None:
    rng = np.random.default_rng(1)
    t = rng.uniform(20, 80, 200)
    s = t * 0.8 + rng.normal(0, 5, 200)
    kept, lo, hi = table.kept_interval(s, t)
    assert kept == pytest.approx(s.mean() / t.mean(), abs=1e-12)
    assert lo < kept < hi and hi - lo < 0.1
    same = table.kept_interval(t, t)
    assert same == pytest.approx((1.0, 1.0, 1.0))


def test_the_curve_counts_earlier_stages_and_save_copies_the_files(table: ModuleType, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    study(root)
    teacher_scores = table.example_scores(root / "teacher-eval", {"n": 4, "test": str(root / "test.json")})
    assert teacher_scores.tolist() == [100.0] * 4
    points = table.curve(root, "mix-local", {"scores": teacher_scores})
    # the snapshot: 0.5 + 10 minutes before the last stage, and its 12 minutes; the end: all 40.5 minutes
    assert [(m, tok) for m, tok, *_ in points] == [(22.5, 1200), (40.5, 5000)]
    final = table.example_scores(root / "mix-local/eval", {"n": 4, "test": str(root / "test.json")})
    assert points[-1][3][0] == pytest.approx(final.mean() / 100)
    assert points[0][3][0] < points[-1][3][0]
    table.save(root, ["teacher-eval", "mix-local"], tmp_path / "docs", "| table |\n")
    docs = tmp_path / "docs"
    assert (docs / "table.md").read_text() == "| table |\n"
    for f in ("teacher-eval/predictions.txt", "mix-local/eval/predictions.txt", "mix-local/run.json",
              "mix-local/snapshots/1-of-4/eval/metrics.json", "mix-local/snapshots/1-of-4/snapshot.json",
              "cut-mix/run.json", "local-mix/run.json"):  # fmt: skip
        assert (docs / f).read_bytes() == (root / f).read_bytes(), f
    assert not (docs / "mix-local/snapshots/2-of-4").exists()


def test_the_machine_comes_from_the_training_run_else_the_evaluation(table: ModuleType, tmp_path: Path) -> None:
    study(tmp_path)
    assert table.machine_of(tmp_path / "mix-local") == "not recorded"
    run = json.loads((tmp_path / "mix-local/run.json").read_text())
    write(tmp_path / "mix-local", {**run, "machine": {"cpu": "AMD EPYC", "cores": 2, "isa": "AVX2"}})
    (tmp_path / "teacher-eval/run.json").write_text(json.dumps({"machine": {"cpu": "Xeon", "cores": 2, "isa": None}}))
    assert table.machine_of(tmp_path / "mix-local") == "AMD EPYC, 2 cores, AVX2"
    assert table.machine_of(tmp_path / "teacher-eval") == "Xeon, 2 cores"
