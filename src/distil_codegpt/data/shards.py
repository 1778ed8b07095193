"""Token shards (nanoGPT style): each split tokenised once into one flat file of ids, read back by memmap.

Layout of a shard directory (default `<data>/shards/<tokenizer fingerprint>/`), per split:
  <split>.bin      the ids of every document, concatenated; each document starts with bos and ends with eos;
                   uint16 when the vocabulary fits, else uint32
  <split>.idx.npy  int64 offset of each document's first token, for document-aligned use
  <split>.json     header: dtype, counts, and the tokenizer and corpus fingerprints the ids were made from

The header is written last and removed before a rebuild starts, and the files land synced, by os.replace, so a build
that dies half way never leaves a shard that looks complete. Shards whose header matches the current tokenizer
and corpus content are reused: packing happens once, on first use (`ensure_shards`).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from distil_codegpt.artifacts import check_size, read_json
from distil_codegpt.config import ShardsConfig, UserError, build_config
from distil_codegpt.data.formats import SPLITS, corpus_format, read_documents
from distil_codegpt.data.tokenizer import (
    encode_documents,
    file_stats,
    load_tokenizer,
    tokenizer_fingerprint,
    tokenizer_meta,
)
from distil_codegpt.runinfo import raise_storage_error, replace_into

SHARD_FORMAT = 1  # bump when the layout changes, so old shards are rebuilt
CHUNK_DOCS = 1024  # documents per encode_batch call: enough to keep the Rust threads busy, little memory


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: uint16 halves the file and the page cache it needs."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def build_shards(cfg: ShardsConfig) -> dict:
    """Tokenise cfg.splits into shards and return per-split counts and speed; up-to-date splits are reused."""
    start = time.perf_counter()
    data = Path(cfg.data)
    fmt = corpus_format(data)
    tok = load_tokenizer(cfg.tokenizer)
    tok_fp = tokenizer_fingerprint(cfg.tokenizer)
    meta = tokenizer_meta(cfg.tokenizer)
    if meta and meta.get("format") != fmt:
        raise UserError(
            f"tokenizer: {cfg.tokenizer} was trained on a {meta.get('format')} corpus but {data} is {fmt};"
            f" train a tokenizer on this corpus with `distil-codegpt tokenizer --data {data}`"
        )
    if cfg.workers:
        # Read by the Rust thread pool when it starts, i.e. only if nothing was encoded in parallel before.
        os.environ["RAYON_NUM_THREADS"] = str(cfg.workers)
    out = Path(cfg.out) if cfg.out else default_shard_dir(data, cfg.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    splits = {s: _build_split(data, s, fmt, tok, tok_fp, out) for s in cfg.splits}
    return {
        "out": str(out),
        "format": fmt,
        "tokenizer_fingerprint": tok_fp,
        "n_tokens": sum(s["n_tokens"] for s in splits.values()),
        "reused": all(s["reused"] for s in splits.values()),
        "seconds": round(time.perf_counter() - start, 3),
        "splits": splits,
    }


def default_shard_dir(data_dir: str | Path, tokenizer_dir: str | Path) -> Path:
    """One directory per tokenizer, so shards made with another tokenizer are kept, not overwritten."""
    return Path(data_dir) / "shards" / tokenizer_fingerprint(tokenizer_dir)


def ensure_shards(data_dir: str | Path, tokenizer_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> Path:
    """The shard directory for this corpus and tokenizer, built first if missing or stale."""
    cfg = build_config(ShardsConfig, {"data": str(data_dir), "tokenizer": str(tokenizer_dir), "splits": list(splits)})
    return Path(build_shards(cfg)["out"])


class TokenShard:
    """One split's ids, memory-mapped read-only: batches read only the windows they use."""

    def __init__(self, shard_dir: str | Path, split: str):
        base = Path(shard_dir) / split
        self.split = split
        self.base = base
        rebuild = f"build the shards with `distil-codegpt shards --data DATA --tokenizer TOK --out {base.parent}`"
        self.header = read_json(f"{base}.json", fix=rebuild)
        try:
            n, dtype = int(self.header["n_tokens"]), np.dtype(self.header["dtype"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{base}.json: not a shard header (no n_tokens or dtype); {rebuild}") from None
        check_size(f"{base}.bin", n * dtype.itemsize, fix=rebuild)  # a memmap past the end would fail at random
        # np.memmap cannot map an empty file; an empty split is an empty array.
        self.tokens = np.memmap(f"{base}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype)
        self.vocab_size: int = self.header["vocab_size"]
        self.n_docs: int = self.header["n_docs"]

    def __len__(self) -> int:
        return len(self.tokens)

    def doc_starts(self) -> np.ndarray:
        """Offset of each document's first token (int64, memory-mapped)."""
        return np.load(f"{self.base}.idx.npy", mmap_mode="r")

    def random_batch(
        self, batch_size: int, seq_len: int, generator: torch.Generator | np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 (B, T): windows of T+1 tokens at uniform random offsets, y = x shifted by one.

        Windows cross document boundaries, as in nanoGPT: bos/eos tell the model where a file starts.
        """
        self._check(seq_len)
        high = len(self) - seq_len  # last start whose window of seq_len + 1 tokens fits is high - 1
        if isinstance(generator, torch.Generator):
            starts = torch.randint(high, (batch_size,), generator=generator).numpy()
        else:
            starts = generator.integers(0, high, size=batch_size)
        return self._gather(np.asarray(starts), seq_len)

    def grid_windows(self, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 (B, T): windows number `windows` of the fixed grid `sequential_batches` walks (window w
        starts at token w * seq_len); the teacher cache is laid out on this grid."""
        self._check(seq_len)
        return self._gather(np.asarray(windows) * seq_len, seq_len)

    def _gather(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        # One gather from the memmap and one widening to int64; x and y are two views of that one (B, T+1) array.
        window = torch.from_numpy(self.tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
        return window[:, :-1], window[:, 1:]

    def num_windows(self, seq_len: int) -> int:
        """How many windows `sequential_batches` yields in all (for progress bars and averages)."""
        return (len(self) - 1) // seq_len

    def sequential_batches(self, batch_size: int, seq_len: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping consecutive windows from the start, for evaluation: every token is predicted once.

        The last batch may hold fewer than batch_size windows; the final tokens that do not fill a whole window
        (fewer than seq_len) are left out.
        """
        self._check(seq_len)
        n_windows = self.num_windows(seq_len)
        for first in range(0, n_windows, batch_size):
            b = min(batch_size, n_windows - first)
            chunk = self.tokens[first * seq_len : (first + b) * seq_len + 1]
            x = chunk[:-1].reshape(b, seq_len).astype(np.int64)
            y = chunk[1:].reshape(b, seq_len).astype(np.int64)
            yield torch.from_numpy(x), torch.from_numpy(y)

    def _check(self, seq_len: int) -> None:
        if len(self) < seq_len + 1:
            raise UserError(
                f"{self.split} shard: {len(self)} tokens, fewer than seq_len + 1 = {seq_len + 1};"
                " use a shorter seq_len or a larger corpus"
            )


# ---------------------------------------------------------------- building


def _build_split(data: Path, split: str, fmt: str, tok: PreTrainedTokenizerFast, tok_fp: str, out: Path) -> dict:
    src = data / f"{split}.txt"
    if not src.is_file():
        raise UserError(f"{src}: missing; rebuild the corpus with `distil-codegpt corpus --out {data}`")
    n_lines, corpus_fp = file_stats(src)
    header_path = out / f"{split}.json"
    wanted = {"shard_format": SHARD_FORMAT, "tokenizer_fingerprint": tok_fp, "corpus_fingerprint": corpus_fp}
    old = _read_header(header_path)
    if old and all(old.get(k) == v for k, v in wanted.items()) and _files_complete(out, split, old):
        return {**_summary(old), "reused": True}

    header_path.unlink(missing_ok=True)
    start = time.perf_counter()
    dtype = token_dtype(len(tok))
    tmp = f".{os.getpid()}.tmp"  # per process: ranks racing to build the same shard do not share a file
    bin_tmp, idx_tmp, header_tmp = (out / f"{split}{suffix}{tmp}" for suffix in (".bin", ".idx.npy", ".json"))
    starts: list[np.ndarray] = []
    n_tokens = 0
    try:
        docs = read_documents(data, split)
        with open(bin_tmp, "wb") as f, tqdm(total=n_lines, desc=f"shards {split}", unit="doc", unit_scale=True) as bar:
            while chunk := list(itertools.islice(docs, CHUNK_DOCS)):
                ids = encode_documents(tok, chunk, fmt)
                lengths = np.fromiter(map(len, ids), np.int64, len(ids))
                n_chunk = int(lengths.sum())
                np.fromiter(itertools.chain.from_iterable(ids), dtype, n_chunk).tofile(f)
                starts.append(n_tokens + np.cumsum(lengths) - lengths)
                n_tokens += n_chunk
                bar.update(len(chunk))
                bar.set_postfix(tok_per_s=f"{n_tokens / (time.perf_counter() - start):.3g}", refresh=False)
        doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        with open(idx_tmp, "wb") as f:
            np.save(f, doc_starts)
        seconds = time.perf_counter() - start
        header = {
            "shard_format": SHARD_FORMAT,
            "split": split,
            "format": fmt,
            "dtype": dtype.name,
            "n_tokens": n_tokens,
            "n_docs": len(doc_starts),
            "vocab_size": len(tok),
            "tokenizer_fingerprint": tok_fp,
            "corpus_fingerprint": corpus_fp,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(n_tokens / max(seconds, 1e-9)),
        }
        header_tmp.write_text(json.dumps(header, indent=2) + "\n")
        replace_into(bin_tmp, out / f"{split}.bin")
        replace_into(idx_tmp, out / f"{split}.idx.npy")
        replace_into(header_tmp, header_path)  # last: a header means its files are complete
    except OSError as e:
        raise_storage_error(out / f"{split}.bin", e)
        raise
    finally:
        for p in (bin_tmp, idx_tmp, header_tmp):
            p.unlink(missing_ok=True)
    return {**_summary(header), "reused": False}


def _summary(header: dict) -> dict:
    return {k: header[k] for k in ("n_tokens", "n_docs", "dtype", "seconds", "tokens_per_s")}


def _read_header(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _files_complete(out: Path, split: str, header: dict) -> bool:
    """The .bin holds exactly the header's token count, and the index exists."""
    bin_path = out / f"{split}.bin"
    size = header["n_tokens"] * np.dtype(header["dtype"]).itemsize
    return bin_path.is_file() and bin_path.stat().st_size == size and (out / f"{split}.idx.npy").is_file()
