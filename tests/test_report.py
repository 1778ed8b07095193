"""The report: the study's table computed from metrics.json files, the csv, the Pareto fronts and the plots."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distil_codegpt.config import ReportConfig, UserError
from distil_codegpt.experiment.report import DPI, FIGSIZE, build_report, collect, pareto_front, print_report


def _model(root: Path, name: str, es: float, sps: float, **extra: Any) -> None:
    """A metrics.json as `evaluate` writes it; only ES and speed vary unless a test says otherwise."""
    metrics = {
        "exact_match": es / 4,
        "edit_sim": es,
        "n": 200,
        "params": 1_500_000,
        "size_mb": 6.0,
        "samples_per_s": sps,
        "latency_ms_p50": 12.5,
        "latency_ms_p95": 30.0,
        "device": "cpu",
        **extra,
    }
    (root / name / "eval").mkdir(parents=True)
    (root / name / "eval" / "metrics.json").write_text(json.dumps(metrics))


def _sweep(root: Path, *models: tuple[str, str, int]) -> None:
    entries = [{"name": n, "label": label, "layers": layers, "kind": "student"} for n, label, layers in models]
    (root / "sweep.json").write_text(json.dumps({"models": entries}))


def _row(table: str, label: str) -> list[str]:
    """The cells of the table line whose first cell is `label`."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{table}")


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    """Teacher ES 40 at 20 samples/s; a 6-layer student ES 30 at 30 samples/s; a 4-layer one not evaluated yet."""
    root = tmp_path / "sweep"
    _model(root, "teacher", 40.0, 20.0, params=124_000_000, size_mb=510.0, perplexity=3.25)
    _model(root, "students/kd-6", 30.0, 30.0, params=82_000_000, size_mb=330.0, perplexity=None)
    _sweep(root, ("teacher", "Teacher", 12), ("students/kd-6", "6 layers (KD)", 6), ("students/kd-4", "4 layers", 4))
    return root


def test_table_values_are_the_hand_computed_ones(sweep_dir: Path) -> None:
    summary = build_report(ReportConfig(dir=str(sweep_dir)))
    student = _row(summary["table"], "6 layers (KD)")
    # Model | Layers | Params | Size | Inf. | ES | EM | ES kept | Speedup | Perplexity
    assert student == ["6 layers (KD)", "6", "82", "330", "30", "30.0", "7.5", "75.0%", "1.50×", "—"]
    assert _row(summary["table"], "Teacher")[7:] == ["100.0%", "1.00×", "3.25"]
    assert summary["rows"] == 2
    md = Path(summary["results_md"]).read_text()
    assert summary["table"] in md
    assert "n = 200" in md and "device cpu" in md


def test_csv_parses_back_to_the_same_numbers(sweep_dir: Path) -> None:
    summary = build_report(ReportConfig(dir=str(sweep_dir)))
    with open(summary["results_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["teacher", "students/kd-6"]
    s = rows[1]
    assert (s["label"], int(s["layers"])) == ("6 layers (KD)", 6)
    assert float(s["params_m"]) == 82.0 and float(s["size_mb"]) == 330.0
    assert float(s["edit_sim"]) == 30.0 and float(s["exact_match"]) == 7.5
    assert float(s["samples_per_s"]) == 30.0
    assert (float(s["latency_ms_p50"]), float(s["latency_ms_p95"])) == (12.5, 30.0)
    assert float(s["es_kept_pct"]) == pytest.approx(75.0) and float(s["speedup"]) == pytest.approx(1.5)
    assert s["perplexity"] == "" and float(rows[0]["perplexity"]) == 3.25


def test_order_follows_sweep_json_then_unlisted_models_by_name(tmp_path: Path) -> None:
    _model(tmp_path, "teacher", 40.0, 20.0)
    _model(tmp_path, "students/b", 30.0, 30.0)
    _model(tmp_path, "students/a", 20.0, 40.0)
    _model(tmp_path, "zz-extra", 10.0, 50.0)
    _model(tmp_path, "aa-extra", 5.0, 50.0)
    _sweep(tmp_path, ("students/b", "B", 6), ("teacher", "T", 12), ("students/a", "A", 4))
    assert [r.name for r in collect(tmp_path)] == ["students/b", "teacher", "students/a", "aa-extra", "zz-extra"]
    summary = build_report(ReportConfig(dir=str(tmp_path)))
    labels = [line.split("|")[1].strip() for line in summary["table"].splitlines()[2:]]
    assert labels == ["B", "T", "A", "aa-extra", "zz-extra"]  # unlisted models are labelled by their name
    assert _row(summary["table"], "aa-extra")[1] == "—"  # their depth is unknown


def test_model_without_metrics_is_listed_as_not_evaluated(sweep_dir: Path) -> None:
    rows = collect(sweep_dir)
    assert [(r.name, r.metrics is None) for r in rows][-1] == ("students/kd-4", True)
    summary = build_report(ReportConfig(dir=str(sweep_dir)))
    assert _row(summary["table"], "4 layers")[:3] == ["4 layers", "4", "not evaluated"]
    assert "Not evaluated yet (1): 4 layers." in Path(summary["results_md"]).read_text()
    assert "kd-4" not in Path(summary["results_csv"]).read_text()
    assert summary["not_evaluated"] == ["students/kd-4"]


def test_missing_baseline_gives_na_and_says_which(sweep_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    summary = build_report(ReportConfig(dir=str(sweep_dir), out=str(out), baseline="distilgpt2"))
    assert Path(summary["results_md"]).parent == out and not (sweep_dir / "results.md").exists()
    assert _row(summary["table"], "6 layers (KD)")[7:9] == ["n/a", "n/a"]
    assert _row(summary["table"], "Teacher")[7:9] == ["n/a", "n/a"]
    assert "Baseline `distilgpt2` is missing" in Path(summary["results_md"]).read_text()
    with open(summary["results_csv"], newline="") as f:
        assert all(r["es_kept_pct"] == "" and r["speedup"] == "" for r in csv.DictReader(f))


def test_other_baseline_by_name(sweep_dir: Path) -> None:
    summary = build_report(ReportConfig(dir=str(sweep_dir), baseline="students/kd-6"))
    assert _row(summary["table"], "Teacher")[7:9] == ["133.3%", "0.67×"]


@pytest.mark.parametrize(
    ("minimize_x", "expected"),
    [
        (True, [4, 0, 1, 3]),  # small and good: (0.5, 5) < (1, 10) < (2, 20) twice; (3, 15) and (1, 8) dominated
        (False, [1, 3, 2]),  # fast and good: (2, 20) twice and (3, 15); everything slower and worse is dominated
    ],
)
def test_pareto_front_both_orientations(minimize_x: bool, expected: list[int]) -> None:
    points = [(1.0, 10.0), (2.0, 20.0), (3.0, 15.0), (2.0, 20.0), (0.5, 5.0), (1.0, 8.0)]
    assert pareto_front(points, minimize_x) == expected


def test_pareto_front_ties_and_edges() -> None:
    same_y = [(1.0, 5.0), (2.0, 5.0)]
    assert pareto_front(same_y, minimize_x=True) == [0]
    assert pareto_front(same_y, minimize_x=False) == [1]
    assert pareto_front([(1.0, 7.0), (1.0, 7.0)], minimize_x=True) == [0, 1]  # equal points both stay
    assert pareto_front([(math.nan, 99.0), (1.0, 1.0)], minimize_x=True) == [1]  # unmeasured speed hides nothing
    assert pareto_front([], minimize_x=False) == []


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which the PNG format puts first, right after the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    return struct.unpack(">II", data[16:24])


def test_plots_are_pngs_of_the_configured_size(sweep_dir: Path) -> None:
    summary = build_report(ReportConfig(dir=str(sweep_dir)))
    paths = [Path(p) for p in summary["plots"]]
    assert [p.name for p in paths] == ["es_vs_size.png", "es_vs_speed.png"]
    assert all(p.parent == sweep_dir / "plots" for p in paths)
    expected = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    assert [_png_size(p) for p in paths] == [expected, expected]
    assert paths[0].read_bytes() != paths[1].read_bytes()
    assert "![es_vs_size](plots/es_vs_size.png)" in Path(summary["results_md"]).read_text()


def test_print_report_shows_table_and_paths(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = build_report(ReportConfig(dir=str(sweep_dir)))
    print_report(summary)
    out = capsys.readouterr().out
    assert summary["table"] in out and summary["plots"][1] in out and "students/kd-4" in out


def test_missing_dir_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope: no such directory; pass the sweep directory"):
        build_report(ReportConfig(dir=str(tmp_path / "nope")))


def test_dir_without_metrics_is_one_clear_error(tmp_path: Path) -> None:
    _sweep(tmp_path, ("teacher", "Teacher", 12))  # a sweep that has started but evaluated nothing yet
    with pytest.raises(UserError, match=r"no evaluated model \(no \*/eval/metrics\.json\); run `distil-codegpt sweep`"):
        build_report(ReportConfig(dir=str(tmp_path)))


def test_incomplete_metrics_name_the_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "teacher" / "eval").mkdir(parents=True)
    (tmp_path / "teacher" / "eval" / "metrics.json").write_text(json.dumps({"edit_sim": 40.0}))
    with pytest.raises(UserError, match=r"teacher/eval/metrics\.json: missing exact_match, n, params"):
        collect(tmp_path)


def test_variants_against_the_main_student_with_a_paired_bootstrap(tmp_path: Path) -> None:
    from distil_codegpt.experiment.noise import paired_bootstrap

    root = tmp_path / "sweep"
    gts = ["return x", "self.a = b", "import os", "pass"]
    test = tmp_path / "test.json"
    test.write_text("".join(json.dumps({"input": "def f():", "gt": g}) + "\n" for g in gts))
    preds = {  # the main student, a variant right on every line, one the same as the main student
        "students/kd-2": ["return y", "self.a = c", "import sys", "pas"],
        "students/2-better": gts,
        "students/2-same": ["return y", "self.a = c", "import sys", "pas"],
    }
    for name, p in preds.items():
        _model(root, name, 0.0, 1.0, n=4, test=str(test))
        (root / name / "eval" / "predictions.txt").write_text("".join(x + "\n" for x in p))
    _sweep(root, ("students/kd-2", "2 layers", 2), ("students/2-better", "better", 2), ("students/2-same", "same", 2))
    md = (Path(build_report(ReportConfig(dir=str(root)))["results_md"])).read_text()
    md = md[md.index("## Against the main student of the same depth") :]
    # fuzzywuzzy's ratio by hand, 100 * (len1 + len2 - indel) / (len1 + len2) rounded per pair: "return y" against
    # "return x" 14/16 -> 88 (87.5, halves to even), "self.a = c" 18/20 -> 90, "import sys" 16/19 -> 84, "pas" 6/7 -> 86
    main, better = (88 + 90 + 84 + 86) / 4, 100.0
    row = _row(md, "better")
    assert row[1:5] == [f"{better:.1f}", "2 layers", f"{main:.1f}", f"{better - main:+.1f}"] and row[6] == "yes"
    assert _row(md, "same")[4:7] == ["+0.0", "+0.0 to +0.0", "no"]
    lo, hi = (float(x) for x in row[5].split(" to "))
    assert 10 <= lo <= better - main <= hi <= 16  # the resampled means lie between the smallest and largest gain
    diff = paired_bootstrap(np.array([3.0, 1.0]), np.array([1.0, 1.0]))
    assert diff[0] == 1.0 and 0.0 <= diff[1] <= diff[2] <= 2.0  # means of resampled [2, 0]: 0, 1 or 2
