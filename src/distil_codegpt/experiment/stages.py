"""The sweep's steps and their file work, apart from the plan: a step, a distillation from a step's values, a fetched
teacher, copies of a run stopped along its budget, the perplexity files, and reading what a step wrote."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distil_codegpt.artifacts import read_json
from distil_codegpt.config import ConfigError, DistilConfig, build_config
from distil_codegpt.distill.run import run_distil
from distil_codegpt.model import gguf

FETCH = "fetch:"


@dataclass
class Step:
    """One stage run; done when `marker` exists (the file the stage writes last), or when `done` says so."""

    name: str
    marker: Path
    run: Callable[[], Any]
    done: Callable[[], bool] | None = None

    def is_done(self) -> bool:
        return self.done() if self.done else self.marker.is_file()


def run_distil_from(values: dict[str, Any]) -> Any:
    """`run_distil` on the config built from a sweep step's values."""
    return run_distil(build_config(DistilConfig, values))


def fetched_teacher(name: str) -> Path:
    """fetch:NAME as a model directory: downloaded and imported once into the cache, then reused by every sweep."""
    if name not in gguf.TEACHERS:
        raise ConfigError(
            f"teacher_model: '{FETCH}{name}' names no known teacher; use one of {', '.join(gguf.TEACHERS)}"
        )
    target = gguf.cache_root() / "teachers" / f"{name}-fp32"
    if not (target / "config.json").is_file():  # an import lands whole or not at all
        gguf.fetch_teacher(name, target)
    return target


def read_done(path: Path) -> dict[str, Any]:
    """A JSON file this sweep wrote, or {} before it exists."""
    return read_json(path, fix=f"remove {path} and rerun the sweep") if path.is_file() else {}


def trained(out: Path, steps: int) -> bool:
    """Whether the run in `out` reached its last step (a learning-curve stop writes run.json before that)."""
    run = read_done(out / "run.json")
    return (run.get("metrics") or {}).get("steps", 0) >= steps


def snapshot(src: Path, dst: Path) -> None:
    """The run's model files as they are now (not its checkpoints, logs or in-training teacher), with its run.json:
    copied to a sibling and renamed into place, so `dst` is whole or absent."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_file() and p.name != "metrics.jsonl":
            shutil.copy2(p, tmp / p.name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def first_files(data: Path, out: Path, n: int) -> None:
    """The first n files of the test split (one per line), beside a copy of corpus.json that says their format:
    perplexity over a whole split costs as much as evaluating a model twice."""
    lines = (data / "test.txt").read_text(encoding="utf-8").split("\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(data / "corpus.json", out.parent / "corpus.json")
    out.write_text("".join(x + "\n" for x in [x for x in lines if x][:n]), encoding="utf-8")
