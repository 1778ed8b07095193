"""Reading the on-disk corpus formats: one document per line, normalised tokens or a JSON string of raw source."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from distil_codegpt.artifacts import read_json
from distil_codegpt.config import UserError

FORMATS = ("codexglue", "raw")
SPLITS = ("train", "dev", "test")


def corpus_format(data_dir: str | Path) -> str:
    """The format a corpus directory was built in, from its corpus.json."""
    manifest = Path(data_dir) / "corpus.json"
    if not manifest.is_file():
        raise UserError(
            f"{data_dir}: no corpus.json; build the corpus first with `distil-codegpt corpus --out {data_dir}`"
        )
    fix = f"rebuild the corpus with `distil-codegpt corpus --out {data_dir}`"
    fmt = read_json(manifest, fix=fix).get("config", {}).get("format")
    if fmt not in FORMATS:
        raise UserError(f"{manifest}: unknown format {fmt!r}; {fix}")
    return fmt


def encode_document(text: str, fmt: str) -> str:
    """One document as one line of a split file."""
    return text if fmt == "codexglue" else json.dumps(text, ensure_ascii=False)


def decode_document(line: str, fmt: str) -> str:
    """Inverse of encode_document (the trailing newline of the file line must be stripped already)."""
    return line if fmt == "codexglue" else json.loads(line)


def read_documents(data_dir: str | Path, split: str) -> Iterator[str]:
    """Yield the documents of one split: normalised token lines, or the original source texts (raw)."""
    fmt = corpus_format(data_dir)
    path = Path(data_dir) / f"{split}.txt"
    if not path.is_file():
        raise UserError(f"{path}: missing; rebuild the corpus with `distil-codegpt corpus`")
    with path.open(encoding="utf-8", newline="\n") as f:
        for line in f:
            line = line.rstrip("\n")
            if line:
                yield decode_document(line, fmt)
