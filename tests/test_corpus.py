"""Corpus builder: bad files skipped and counted, dedup, split determinism, line-completion sets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distil_codegpt.config import ConfigError, CorpusConfig, UserError, build_config
from distil_codegpt.data.corpus import build_corpus, split_files
from distil_codegpt.data.formats import read_documents
from distil_codegpt.data.line_completion import LineExample, make_examples, read_examples
from distil_codegpt.data.normalize import load_literals, normalize_code

GOOD = {
    f"pkg/mod{i}.py": f"import os\n\n\ndef f{i}(x, y={i}):\n    '''doc'''\n    if x:\n        return x + y\n"
    f"    return os.path.join('a', 'b{i}')\n\n\nclass C{i}:\n    name = 'name'\n"
    for i in range(12)
}


def make_tree(root: Path) -> Path:
    """A source tree with twelve good files and one file of every kind the builder must skip."""
    for rel, text in GOOD.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "pkg/dup.py").write_text(GOOD["pkg/mod0.py"])  # exact duplicate
    (root / "bad").mkdir()
    (root / "bad/latin1.py").write_bytes(b"x = '\xe9t\xe9'\n")  # not UTF-8, no coding line
    (root / "bad/binary.py").write_bytes(b"\x7fELF\x00\x01\x02")
    (root / "bad/broken.py").write_text("def f(:\n    s = 'unterminated\n")
    (root / "bad/empty.py").write_text("")
    (root / "bad/comments.py").write_text("# nothing but a comment\n")
    (root / "bad/big.py").write_text("x = 1\n" * 400)  # 2400 bytes: over the limit the tests set
    (root / "bad/dangling.py").symlink_to(root / "nowhere.py")
    (root / "bad/self.py").symlink_to(root / "bad/self.py")
    (root / "bad/loop").symlink_to(root / "bad")
    os.mkfifo(root / "bad/fifo.py")
    (root / ".git").mkdir()
    (root / ".git/hidden.py").write_text("x = 1\n")  # excluded directory
    (root / "ok_latin1.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9t\xe9'\n")  # declared: fine
    return root


def cfg(out: Path, src: Path, **kw) -> CorpusConfig:
    return build_config(
        CorpusConfig,
        {"out": str(out), "src": [str(src)], "max_file_bytes": 2000, "dev_fraction": 0.2, "test_fraction": 0.2, **kw},
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def built(tree: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus(cfg(out, tree, workers=2))


def read_index(out: Path) -> list[tuple[str, str, str]]:
    rows = [line.split("\t") for line in (out / "files.tsv").read_text().splitlines()[1:]]
    return [(split, sha, path) for split, sha, _, path in rows]


def test_counts_by_reason(built) -> None:
    _, s = built
    assert s["files"]["seen"] == 22
    assert s["files"]["kept"] == 13  # 12 good + the latin-1 file with a coding line
    assert s["files"]["duplicates"] == 1
    assert s["files"]["skipped"] == {
        "binary": 1,
        "decode_error": 1,
        "empty": 1,
        "no_code": 1,
        "not_regular_file": 1,
        "symlink_loop": 2,  # bad/self.py, and bad/loop pointing back at its parent
        "tokenize_error": 1,
        "too_large": 1,
        "unreadable": 1,
    }


def test_split_files_match_token_counts(built) -> None:
    out, s = built
    lits = load_literals()
    by_split = {k: list(read_documents(out, k)) for k in ("train", "dev", "test")}
    assert {k: len(v) for k, v in by_split.items()} == {k: v["files"] for k, v in s["splits"].items()}
    assert sum(len(v) for v in by_split.values()) == 13
    assert {k: sum(len(d.split(" ")) for d in v) for k, v in by_split.items()} == {
        k: v["tokens"] for k, v in s["splits"].items()
    }
    expected = " ".join(normalize_code(GOOD["pkg/mod3.py"], lits))
    assert any(expected == d for docs in by_split.values() for d in docs)


def test_splits_disjoint_and_deterministic(built, tree: Path, tmp_path: Path) -> None:
    out, _ = built
    index = read_index(out)
    shas = [sha for _, sha, _ in index]
    assert len(shas) == len(set(shas)) == 13
    again = tmp_path / "again"
    build_corpus(cfg(again, tree, workers=1))
    for name in ("train.txt", "dev.txt", "test.txt", "files.tsv"):
        assert (again / name).read_bytes() == (out / name).read_bytes()
    assert (again / "line_completion/test.json").read_bytes() == (out / "line_completion/test.json").read_bytes()


def test_split_depends_on_content_not_location(tree: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(tree / "pkg", moved)
    for name in ("mod1.py", "mod2.py"):  # names (and so walk order) change too
        (moved / name).rename(moved / f"z_{name}")
    build_corpus(cfg(tmp_path / "a", tree / "pkg", workers=1))
    build_corpus(cfg(tmp_path / "b", moved, workers=1))
    assert sorted(r[:2] for r in read_index(tmp_path / "a")) == sorted(r[:2] for r in read_index(tmp_path / "b"))


def test_split_files_exact_counts_and_seed() -> None:
    shas = [f"{i:064x}" for i in range(100)]
    a = split_files(shas, 1, 0.1, 0.2)
    assert sorted(a.values()).count("test") == 20 and sorted(a.values()).count("dev") == 10
    assert split_files(list(reversed(shas)), 1, 0.1, 0.2) == a
    assert split_files(shas, 2, 0.1, 0.2) != a


def test_raw_mode_keeps_source_and_split(built, tree: Path, tmp_path: Path) -> None:
    out, _ = built
    raw = tmp_path / "raw"
    build_corpus(cfg(raw, tree, format="raw", workers=1))
    assert [r[:2] for r in read_index(raw)] == [r[:2] for r in read_index(out)]
    texts = {t for k in ("train", "dev", "test") for t in read_documents(raw, k)}
    assert GOOD["pkg/mod5.py"] in texts
    assert "x = 'été'\n" in "".join(texts)  # the latin-1 file, decoded
    for ex in read_examples(raw / "line_completion/test.json"):
        assert ex.gt.strip() and "\n" not in ex.gt
        assert any(t.startswith(ex.input + ex.gt) for t in texts)


def test_line_completion_contract(built) -> None:
    out, _ = built
    docs = list(read_documents(out, "test"))
    examples = read_examples(out / "line_completion/test.json")
    assert examples, "the test split must give examples"
    for ex in examples:
        assert ex.input.startswith("<s>")
        assert ex.gt and "<EOL>" not in ex.gt.split(" ") and "</s>" not in ex.gt.split(" ")
        assert any(d.startswith(ex.input + " " + ex.gt) for d in docs)
        full = next(d for d in docs if d.startswith(ex.input + " " + ex.gt))
        rest = full[len(ex.input + " " + ex.gt) :].split(" ")
        assert rest[1] in ("<EOL>", "</s>")  # gt runs to the end of the line
    assert len(set(examples)) == len(examples)


def test_line_completion_counts_and_limits() -> None:
    docs = ["<s> a = <NUM_LIT:1> <EOL> b = a </s>", "<s> x <EOL> <EOL> y </s>"]
    # cuts: doc0 at a, =, 1, b, =, a (6); doc1 at x, y (2; an <EOL> position is never a cut)
    allx = make_examples(docs, "codexglue", 100, 1000, seed=0)
    assert len(allx) == 8 and len(set(allx)) == 8
    assert LineExample("<s> a = <NUM_LIT:1> <EOL> b", "= a") in allx
    assert LineExample("<s>", "a = <NUM_LIT:1>") in allx
    short = make_examples(docs, "codexglue", 100, 3, seed=0)
    assert all(len(ex.input.split(" ")) <= 3 for ex in short) and len(short) == 4  # a, =, 1 and x
    first_two = make_examples(docs, "codexglue", 2, 1000, seed=5)
    source = [next(i for i, d in enumerate(docs) if d.startswith(f"{ex.input} {ex.gt}")) for ex in first_two]
    assert sorted(source) == [0, 1]  # one per file while there are more files than examples
    assert make_examples(docs, "codexglue", 5, 1000, seed=3) == make_examples(docs, "codexglue", 5, 1000, seed=3)


def test_read_official_format(tmp_path: Path) -> None:
    p = tmp_path / "test.json"
    p.write_text(json.dumps({"input": "<s> import os <EOL> os .", "gt": "path", "id": 3}) + "\n\n")
    assert read_examples(p) == [LineExample("<s> import os <EOL> os .", "path")]
    p.write_text('{"input": "x"}\n')
    with pytest.raises(UserError, match="test.json:1"):
        read_examples(p)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        build_corpus(cfg(tmp_path / "o", tmp_path / "missing"))
    (tmp_path / "empty_tree").mkdir()
    (tmp_path / "empty_tree" / "x.py").write_text("# only a comment\n")
    with pytest.raises(UserError, match="no usable .py file"):
        build_corpus(cfg(tmp_path / "o", tmp_path / "empty_tree"))
    with pytest.raises(ConfigError, match="test_fraction"):
        build_config(CorpusConfig, {"out": "x", "dev_fraction": 0.5, "test_fraction": 0.5})
    with pytest.raises(ConfigError, match="format"):
        build_config(CorpusConfig, {"out": "x", "format": "json"})


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "distil_codegpt.cli", "corpus", "--src", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "no such file or directory" in r.stderr
