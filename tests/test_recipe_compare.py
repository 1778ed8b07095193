"""benchmarks/recipe_compare.py's machine guard: the first run records the machine and its probe, later runs on a
machine whose probe differs by more than the tolerance stop (rows compare only within one machine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import benchmark


def test_the_machine_is_recorded_then_checked(tmp_path: Path) -> None:
    rc = benchmark("recipe_compare")
    first = rc.check_machine(tmp_path, 0.15, False, gflops=50.0)
    recorded = json.loads((tmp_path / "machine.json").read_text())
    assert recorded["probe_gflops"] == 50.0 and recorded["cores"] >= 1 and "cpu" in recorded and "recorded" in first
    assert "(1.04x)" in rc.check_machine(tmp_path, 0.15, False, gflops=52.0)  # within 15%: goes on
    with pytest.raises(SystemExit, match=r"at 50.0 \(0.44x\).*--other-machine"):
        rc.check_machine(tmp_path, 0.15, False, gflops=22.0)  # the 2.3x slower machine of docs/RESULTS.md
    assert "(2.00x)" in rc.check_machine(tmp_path, 0.15, True, gflops=100.0)  # asked for: goes on
    assert json.loads((tmp_path / "machine.json").read_text())["probe_gflops"] == 50.0  # the record is the first's
    assert rc.probe_gflops(n=64, seconds=0.05) > 0


def test_a_row_run_again_is_the_same_recipe() -> None:
    rc = benchmark("recipe_compare")
    assert rc.recipe("width-local@2") == rc.recipe("width-local") == ("width", True, 1e-3, False)
    assert rc.recipe("width-local-lr3e-4@3") == ("width", True, 3e-4, False)
    for bad in ("width-local@1", "width-local@", "width-local@x", "widths", "width@2@3"):
        with pytest.raises(KeyError):
            rc.recipe(bad)
