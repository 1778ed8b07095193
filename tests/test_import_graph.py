"""Imports run one way (shared/DESIGN.md): no circle between modules, no import up the layers (settings and files ->
data -> model -> distill -> compress -> engines -> evaluate -> serve -> experiment -> cli), and no project import
inside a function except cli.py's per-verb ones. benchmarks/import_graph.py reads the source with `ast`, so these
tests import nothing of the package and take well under a second; the last one shows the checker can fail."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
from conftest import benchmark


@pytest.fixture(scope="module")
def checker() -> ModuleType:
    return benchmark("import_graph")


def test_no_module_imports_itself_through_others(checker: ModuleType) -> None:
    assert checker.circles(checker.graph()) == []


def test_no_module_imports_a_higher_layer(checker: ModuleType) -> None:
    assert checker.upward(checker.graph()) == []


def test_only_cli_imports_the_project_inside_functions(checker: ModuleType) -> None:
    inside, kept = checker.lazy()
    assert inside == []
    assert kept > 0  # cli.py's verbs import their stage when they run: `--help` loads no torch


def test_the_checker_finds_a_circle_an_upward_and_a_function_level_import(
    checker: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {
        "__init__.py": "",
        "config.py": "",
        "data/__init__.py": "",
        "data/a.py": "from fake.model.b import B\n",  # up a layer, and half of a circle
        "model/__init__.py": "",
        "model/b.py": "from fake.data import a\n\nB = 1\n",
        "model/c.py": "import os\n\n\ndef f():\n    from . import b\n\n    return b, os\n",  # relative, in a function
        "serve/__init__.py": "",
        "serve/s.py": "from typing import TYPE_CHECKING\n\nimport fake.config\n\nif TYPE_CHECKING:\n"
        "    from fake.experiment import e\n",  # under TYPE_CHECKING still counts
        "experiment/__init__.py": "",
        "experiment/e.py": "from fake.serve import s\n",
        "cli.py": "def main():\n    from fake.model import c\n",  # allowed: a verb's lazy import
    }
    root = tmp_path / "fake"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)

    g = checker.graph(root)
    assert checker.circles(g) == [["fake.data.a", "fake.model.b"], ["fake.experiment.e", "fake.serve.s"]]
    up = [("fake.data.a", "fake.model.b"), ("fake.serve.s", "fake.experiment"), ("fake.serve.s", "fake.experiment.e")]
    assert checker.upward(g) == up
    assert checker.lazy(root) == ([("fake.model.c", 5, "from . import b")], 1)
    checker.main(root)
    assert "2 circles, 3 upward imports, 1 function-level project imports (1 more in cli" in capsys.readouterr().out
