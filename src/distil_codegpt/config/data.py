"""Settings of the data stages: corpus, tokenizer, token shards, and `prepare` (all three in one go)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distil_codegpt.config.base import _check, _require, opt

DEFAULT_EXCLUDES = [".*", "__pycache__", "site-packages", "dist-packages", "node_modules"]


@dataclass
class CorpusConfig:
    """Turn Python source trees into CodeXGLUE-format splits and line-completion test sets."""

    out: str = opt("", "output directory (created)", required=True)
    src: list[str] = opt([], "source trees to walk for .py files (default: the running interpreter's stdlib)")
    format: Literal["codexglue", "raw"] = opt("codexglue", "codexglue = py150 normalised tokens; raw = source text")
    seed: int = opt(42, "seed for the split and the line-completion cuts")
    literals: str = opt("", "JSON literal list {'str': [...], 'num': [...]} (default: CodeXGLUE's py150 list)")
    dev_fraction: float = opt(0.05, "share of files in dev")
    test_fraction: float = opt(0.05, "share of files in test")
    max_file_bytes: int = opt(1_000_000, "skip files larger than this")
    exclude: list[str] = opt(DEFAULT_EXCLUDES, "directory names (glob) not to descend into")
    line_examples: int = opt(10_000, "line-completion examples in test.json (fewer if the files do not allow)")
    dev_line_examples: int = opt(1_000, "line-completion examples in dev.json")
    max_input_tokens: int = opt(1000, "line-completion inputs have at most this many tokens (<s> included)")
    workers: int = opt(0, "processes for reading and normalising (0 = all cores)")

    def validate(self) -> None:
        _require(self.out, "out", "pass --out DIR")
        _check(0 <= self.dev_fraction < 1, "dev_fraction", self.dev_fraction, "use a value in [0, 1)")
        _check(0 <= self.test_fraction < 1, "test_fraction", self.test_fraction, "use a value in [0, 1)")
        _check(
            self.dev_fraction + self.test_fraction < 1,
            "test_fraction",
            self.test_fraction,
            "dev_fraction + test_fraction must leave files for train",
        )
        _check(self.max_file_bytes > 0, "max_file_bytes", self.max_file_bytes, "use a positive byte count")
        _check(self.line_examples >= 0, "line_examples", self.line_examples, "use 0 or more")
        _check(self.dev_line_examples >= 0, "dev_line_examples", self.dev_line_examples, "use 0 or more")
        _check(self.max_input_tokens >= 2, "max_input_tokens", self.max_input_tokens, "use at least 2")
        _check(self.workers >= 0, "workers", self.workers, "use 0 (all cores) or a positive count")


@dataclass
class TokenizerConfig:
    """Train a byte-level BPE tokenizer on a corpus's train split."""

    data: str = opt("", "corpus directory (from `distil-codegpt corpus`)", required=True)
    out: str = opt("", "output directory for the tokenizer (loadable by transformers.AutoTokenizer)", required=True)
    vocab_size: int = opt(50_000, "total vocabulary, special and literal tokens included (CodeGPT-small-py: 50k)")
    min_frequency: int = opt(2, "minimum pair frequency for a BPE merge")
    literals: str = opt("", "literal list for the single-token literals (default: the one the corpus used)")

    def validate(self) -> None:
        _require(self.data, "data", "pass --data DIR")
        _require(self.out, "out", "pass --out DIR")
        _check(self.vocab_size >= 512, "vocab_size", self.vocab_size, "use at least 512 (256 bytes + specials)")
        _check(self.min_frequency >= 1, "min_frequency", self.min_frequency, "use 1 or more")


@dataclass
class ShardsConfig:
    """Tokenise the splits into flat memmap shards for training."""

    data: str = opt("", "corpus directory", required=True)
    tokenizer: str = opt("", "tokenizer directory", required=True)
    out: str = opt("", "output directory (default: DATA/shards/<tokenizer fingerprint>)")
    splits: list[str] = opt(["train", "dev", "test"], "splits to tokenise")
    workers: int = opt(0, "tokeniser threads (0 = all cores)")

    def validate(self) -> None:
        _require(self.data, "data", "pass --data DIR")
        _require(self.tokenizer, "tokenizer", "pass --tokenizer DIR")
        for s in self.splits:
            _check(s in ("train", "dev", "test"), "splits", s, "choose from train, dev, test")
        _check(self.workers >= 0, "workers", self.workers, "use 0 (all cores) or a positive count")


@dataclass
class PrepareConfig:
    """Corpus, tokenizer and shards in one go: the foundation of every experiment."""

    out: str = opt("runs/prepare", "run directory: data/, tok/ and the shards go under it")
    src: list[str] = opt([], "source trees (default: the running interpreter's stdlib)")
    format: Literal["codexglue", "raw"] = opt("codexglue", "corpus format")
    seed: int = opt(42, "seed for split and line-completion cuts")
    vocab_size: int = opt(8000, "tokenizer vocabulary (small by default for CPU demos)")
    line_examples: int = opt(10_000, "line-completion examples in test.json")
    workers: int = opt(0, "processes/threads (0 = all cores)")

    def validate(self) -> None:
        _require(self.out, "out", "pass --out DIR")
