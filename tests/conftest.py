"""Shared fixtures: a small real corpus (a slice of the standard library), its tokenizer and shards."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest

from distil_codegpt.config import CorpusConfig, ShardsConfig, TokenizerConfig, build_config

# `--precision auto` follows the CPU (bf16 where it has AVX-512 BF16 or AMX): pin fp32 so that every machine runs
# the same numbers; the bf16 tests ask for it themselves.
os.environ.setdefault("DISTIL_CODEGPT_CPU_BF16", "0")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SLICE = ["textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py", "colorsys.py", "bisect.py", "heapq.py"]
SLICE_DIRS = ["json", "email", "urllib"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ~1 MB corpus from real stdlib files, a 1,200-token tokenizer and its shards; built once per session."""
    from distil_codegpt.data.corpus import build_corpus
    from distil_codegpt.data.shards import build_shards
    from distil_codegpt.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    src = root / "src"
    src.mkdir()
    for name in SLICE:
        shutil.copy(STDLIB / name, src / name)
    for d in SLICE_DIRS:
        shutil.copytree(STDLIB / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    data, tok = root / "data", root / "tok"
    build_corpus(
        build_config(
            CorpusConfig,
            {"out": str(data), "src": [str(src)], "workers": 1, "dev_fraction": 0.1, "test_fraction": 0.1},
        )
    )
    train_tokenizer(build_config(TokenizerConfig, {"data": str(data), "out": str(tok), "vocab_size": 1200}))
    shards = build_shards(build_config(ShardsConfig, {"data": str(data), "tokenizer": str(tok)}))
    return {"root": root, "data": data, "tok": tok, "shards": Path(shards["out"])}


def benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py loaded as a module (the folder is not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
