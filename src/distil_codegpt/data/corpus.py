"""Python source trees -> train/dev/test splits in CodeXGLUE py150 format (or raw), plus line-completion sets.

Bad input never stops the run: every file that cannot be used is skipped and counted by reason in
corpus.json. The split is by file, after exact-duplicate removal, and depends only on the seed and the
set of file contents, so no content can land in two splits.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import io
import multiprocessing as mp
import os
import random
import stat
import sys
import sysconfig
import time
import tokenize
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from distil_codegpt.config import CorpusConfig, UserError, to_dict
from distil_codegpt.data import line_completion
from distil_codegpt.data.formats import encode_document
from distil_codegpt.data.normalize import Literals, NoCodeError, NormalizeError, load_literals, normalize_code
from distil_codegpt.runinfo import atomic_open, write_json, write_manifest

SKIP_REASONS = (
    "too_large",
    "empty",
    "binary",
    "decode_error",
    "tokenize_error",
    "no_code",
    "unreadable",
    "not_regular_file",
    "symlink_loop",
)


def default_sources() -> list[str]:
    """The running interpreter's standard library (its site-packages is excluded by the default excludes)."""
    return [sysconfig.get_paths()["stdlib"]]


# ---------------------------------------------------------------- walking


@dataclass
class Walk:
    files: list[tuple[str, str]]  # (path to open, name recorded in files.tsv)
    skipped: Counter


def walk_sources(roots: list[str], excludes: list[str]) -> Walk:
    """Every .py file under the roots, in sorted order, following symlinks but never around a loop."""
    files: list[tuple[str, str]] = []
    skipped: Counter = Counter()
    seen_dirs: set[tuple[int, int]] = set()
    for root in roots:
        root_path = Path(root)
        if not root_path.exists():
            raise UserError(f"--src {root}: no such file or directory; pass an existing source tree")
        label = root_path.resolve().name or "root"
        if root_path.is_file():
            files.append((str(root_path), label))
            continue
        _walk_dir(str(root_path), label, frozenset(), seen_dirs, excludes, files, skipped)
    return Walk(files, skipped)


def _walk_dir(path, label, ancestors, seen_dirs, excludes, files, skipped) -> None:  # noqa: ANN001
    try:
        st = os.stat(path)
    except OSError as e:
        skipped["symlink_loop" if e.errno == errno.ELOOP else "unreadable"] += 1
        return
    key = (st.st_dev, st.st_ino)
    if key in ancestors:
        skipped["symlink_loop"] += 1
        return
    if key in seen_dirs:  # reached again through a symlink: its files are already listed
        return
    seen_dirs.add(key)
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        skipped["unreadable"] += 1
        return
    for entry in entries:
        name = f"{label}/{entry.name}"
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError as e:
            skipped["symlink_loop" if e.errno == errno.ELOOP else "unreadable"] += 1
            continue
        if is_dir:
            if not any(fnmatch.fnmatch(entry.name, pat) for pat in excludes):
                _walk_dir(entry.path, name, ancestors | {key}, seen_dirs, excludes, files, skipped)
        elif entry.name.endswith(".py"):
            files.append((entry.path, name))


# ---------------------------------------------------------------- reading one file (in a worker process)

_LITERALS: Literals | None = None
_FORMAT = "codexglue"
_MAX_BYTES = 0


def _init_worker(literals: Literals, fmt: str, max_bytes: int) -> None:
    global _LITERALS, _FORMAT, _MAX_BYTES
    _LITERALS, _FORMAT, _MAX_BYTES = literals, fmt, max_bytes


@dataclass
class FileResult:
    status: str  # "ok" or a skip reason
    sha: str = ""
    doc: str = ""  # the split-file line: normalised tokens, or the JSON-encoded source
    n_tokens: int = 0
    n_bytes: int = 0


def read_source(path: str, max_bytes: int) -> tuple[str | None, str, bytes]:
    """(text or None, status, raw bytes): decodes as Python does (PEP 263 coding line, UTF-8 by default)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return None, "symlink_loop" if e.errno == errno.ELOOP else "unreadable", b""
    if not stat.S_ISREG(st.st_mode):
        return None, "not_regular_file", b""
    if st.st_size > max_bytes:
        return None, "too_large", b""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError:
        return None, "unreadable", b""
    if len(data) > max_bytes:
        return None, "too_large", b""
    if not data.strip():
        return None, "empty", data
    if b"\x00" in data:
        return None, "binary", data
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
    except (SyntaxError, LookupError, UnicodeDecodeError):
        return None, "decode_error", data
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, "ok", data


def process_file(path: str) -> FileResult:
    assert _LITERALS is not None
    text, status, data = read_source(path, _MAX_BYTES)
    if text is None:
        return FileResult(status)
    try:
        tokens = normalize_code(text, _LITERALS)
    except NoCodeError:
        return FileResult("no_code")
    except (NormalizeError, RecursionError, MemoryError, ValueError):
        return FileResult("tokenize_error")
    doc = " ".join(tokens) if _FORMAT == "codexglue" else encode_document(text, "raw")
    return FileResult("ok", hashlib.sha256(data).hexdigest(), doc, len(tokens), len(data))


# ---------------------------------------------------------------- the split


def split_files(shas: list[str], seed: int, dev_fraction: float, test_fraction: float) -> dict[str, str]:
    """sha -> split, from the seed and the set of contents only (not paths, not walk order)."""
    order = sorted(set(shas))
    random.Random(seed).shuffle(order)
    n = len(order)

    def count(frac: float) -> int:
        return max(1, round(n * frac)) if frac > 0 and n >= 3 else 0

    n_test, n_dev = count(test_fraction), count(dev_fraction)
    split = {}
    for i, sha in enumerate(order):
        split[sha] = "test" if i < n_test else "dev" if i < n_test + n_dev else "train"
    return split


# ---------------------------------------------------------------- the stage


def build_corpus(cfg: CorpusConfig) -> dict:
    """Run the corpus stage; returns the summary also written to corpus.json."""
    t0 = time.perf_counter()
    literals = load_literals(cfg.literals or None)
    roots = cfg.src or default_sources()
    walk = walk_sources(roots, cfg.exclude)
    if not walk.files:
        raise UserError(f"no .py file under {', '.join(roots)}; pass --src with a tree that holds Python code")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    workers = cfg.workers or os.cpu_count() or 1
    paths = [p for p, _ in walk.files]
    results: list[FileResult] = []
    bar = tqdm(total=len(paths), desc="corpus", unit="file", dynamic_ncols=True)
    if workers == 1:
        _init_worker(literals, cfg.format, cfg.max_file_bytes)
        for p in paths:
            results.append(process_file(p))
            bar.update()
    else:
        ctx = mp.get_context("spawn" if sys.platform == "darwin" else "fork")
        with ctx.Pool(workers, _init_worker, (literals, cfg.format, cfg.max_file_bytes)) as pool:
            for r in pool.imap(process_file, paths, chunksize=8):
                results.append(r)
                bar.update()
    bar.close()
    t_read = time.perf_counter() - t0

    skipped = Counter(walk.skipped)
    kept: dict[str, tuple[str, FileResult]] = {}
    duplicates = 0
    for (_, name), r in zip(walk.files, results):
        if r.status != "ok":
            skipped[r.status] += 1
        elif r.sha in kept:
            duplicates += 1
        else:
            kept[r.sha] = (name, r)
    if not kept:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        raise UserError(f"no usable .py file under {', '.join(roots)} (skipped: {reasons}); check --src")

    assign = split_files(list(kept), cfg.seed, cfg.dev_fraction, cfg.test_fraction)
    splits: dict[str, dict] = {}
    docs_by_split: dict[str, list[str]] = {}
    with atomic_open(out / "files.tsv") as index:
        index.write("split\tsha256\ttokens\tpath\n")
        for split in ("train", "dev", "test"):
            members = sorted((name, sha, r) for sha, (name, r) in kept.items() if assign[sha] == split)
            docs_by_split[split] = [r.doc for _, _, r in members]
            with atomic_open(out / f"{split}.txt") as f:
                for name, sha, r in members:
                    f.write(r.doc + "\n")
                    index.write(f"{split}\t{sha}\t{r.n_tokens}\t{name}\n")
            splits[split] = {
                "files": len(members),
                "tokens": sum(r.n_tokens for _, _, r in members),
                "bytes": sum(r.n_bytes for _, _, r in members),
            }
    t_write = time.perf_counter() - t0 - t_read

    line_sets = {}
    for split, n, seed in (("test", cfg.line_examples, cfg.seed), ("dev", cfg.dev_line_examples, cfg.seed + 1)):
        examples = line_completion.make_examples(docs_by_split[split], cfg.format, n, cfg.max_input_tokens, seed)
        line_completion.write_examples(out / "line_completion" / f"{split}.json", examples)
        line_sets[split] = len(examples)
    seconds = time.perf_counter() - t0

    summary = {
        "config": {**to_dict(cfg), "src": roots},
        "python": sys.version.split()[0],
        "files": {
            "seen": len(walk.files),
            "kept": len(kept),
            "duplicates": duplicates,
            "skipped": {k: skipped[k] for k in sorted(skipped)},
        },
        "splits": splits,
        "line_completion": line_sets,
        "seconds": {"read_normalize": round(t_read, 2), "write": round(t_write, 2), "total": round(seconds, 2)},
    }
    write_json(out / "corpus.json", summary)
    write_manifest(out, "corpus", summary["config"], {k: summary[k] for k in ("files", "splits")}, seconds, cfg.seed)
    return summary
