"""Offline KD: the teacher's top-k next-token log-probs over the train split, computed once, read by every student.

Online KD pays a teacher forward in every step of every student; a sweep of N students pays it N times over the same
tokens. The cache pays it once. Window w of the train shard is inputs tokens[w*T : w*T+T] and next tokens
tokens[w*T+1 : w*T+T+1], exactly as `TokenShard.sequential_batches` cuts them, and row r = w*T + t is position t:
  train.ids.bin   int32   [n_rows, k]  the teacher's top-k ids, by descending log-prob
  train.logp.bin  float16 [n_rows, k]  their log-probs at temperature 1
  train.tail.bin  float32 [n_rows]     log of the probability of every other id together (-inf when k = vocab)
  cache.json      header: settings, the teacher/tokenizer/corpus fingerprints, progress (windows_done, complete)
The .bin files are preallocated memmaps filled in window order. cache.json is rewritten atomically after the
memmaps are flushed, so the windows it counts as done are on disk and a rerun continues from there.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PretrainedConfig

from distil_codegpt.artifacts import check_size, read_json
from distil_codegpt.config import CacheTeacherConfig, ConfigError, UserError, to_dict
from distil_codegpt.data.shards import TokenShard, ensure_shards
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill.inputs import check_model, tokenizer_dir
from distil_codegpt.distill.losses import tempered_buckets
from distil_codegpt.model.families import count_params
from distil_codegpt.model.presets import load_model
from distil_codegpt.runinfo import write_json, write_manifest
from distil_codegpt.runtime import autocast_dtype, pick_device, precision_name

CACHE_FORMAT = 1  # bump when the layout changes, so old caches are refused rather than misread
SPLIT = "train"
HEADER = "cache.json"
SAVE_EVERY_S = 30.0  # flush and rewrite the header at least this often: a hard kill loses at most this much work
# A rerun must agree on all of these to continue or reuse what an out dir holds; the value names the flag to change.
IDENTITY = {
    "cache_format": "the cache format",
    "split": "the split",
    "teacher_fingerprint": "--teacher",
    "tokenizer_fingerprint": "--tokenizer",
    "corpus_fingerprint": "--data (the corpus)",
    "vocab_size": "the teacher's vocabulary",
    "seq_len": "--seq-len",
    "top_k": "--top-k",
    "n_windows": "--max-windows",
}


@dataclass
class CachedBatch:
    """The tokens of some windows and the teacher's cached rows for them: what one offline-KD step needs."""

    x: torch.Tensor  # int64 [B, T] inputs
    y: torch.Tensor  # int64 [B, T] next tokens
    ids: torch.Tensor  # int64 [B, T, k] teacher top-k ids
    logp: torch.Tensor  # float32 [B, T, k] their log-probs (T=1)
    tail: torch.Tensor  # float32 [B, T] log of the tail mass


def top_k_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs [..., k] descending, their ids [..., k], log tail mass [...]) of logits [..., V], in fp32.

    The tail is a logsumexp over the ids outside the top k, not log1p(-sum p): when the top k hold nearly all the
    mass, 1 - sum p cancels to 0 (or below) in floating point, while the logsumexp stays accurate.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    top, ids = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter_(-1, ids, float("-inf")), dim=-1)
    return top, ids, tail


def teacher_fingerprint(teacher: str, config: PretrainedConfig) -> str:
    """First 16 hex of a sha256 over a teacher dir's config.json and weight files, streamed: retrained = different.

    A hub id has no local files to hash: its id, resolved commit and config stand for it.
    """
    h = hashlib.sha256()
    path = Path(teacher).expanduser()
    if not path.is_dir():
        h.update(f"{teacher}\0{getattr(config, '_commit_hash', None)}\0{config.to_json_string()}".encode())
        return h.hexdigest()[:16]
    for f in [path / "config.json", *sorted(path.glob("*.safetensors")), *sorted(path.glob("*.bin"))]:
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()[:16]


def build_cache(cfg: CacheTeacherConfig, *, stop_after: int | None = None) -> dict[str, Any]:
    """Fill the cache in cfg.out, continue a partial one, or reuse a complete one; returns its header and counts.

    `stop_after` (tests) interrupts after that many batches, as a Ctrl-C there would.
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    device = pick_device(cfg.device, cfg.threads)
    amp = autocast_dtype(cfg.precision, device)
    tok_dir = tokenizer_dir(cfg, cfg.teacher)  # reads only cfg.tokenizer, which this config has too
    tokenizer = load_tokenizer(tok_dir)
    teacher = load_model(cfg.teacher, role="teacher")
    check_model(teacher, "teacher", len(tokenizer), cfg.seq_len)
    vocab = teacher.config.vocab_size
    if cfg.top_k > vocab:
        raise ConfigError(
            f"top_k: {cfg.top_k} exceeds the teacher's vocabulary of {vocab}; use --top-k {vocab} or less"
        )
    shard_dir = ensure_shards(cfg.data, tok_dir, splits=(SPLIT,))
    shard = TokenShard(shard_dir, SPLIT)
    n_windows = shard.num_windows(cfg.seq_len)
    if cfg.max_windows:
        n_windows = min(n_windows, cfg.max_windows)
    if n_windows < 1:
        raise UserError(
            f"{SPLIT} shard: {len(shard)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1};"
            " use a shorter --seq-len or a larger corpus"
        )
    T, k = cfg.seq_len, cfg.top_k
    header: dict[str, Any] = {
        "cache_format": CACHE_FORMAT,
        "split": SPLIT,
        "seq_len": T,
        "top_k": k,
        "n_windows": n_windows,
        "n_rows": n_windows * T,
        "vocab_size": vocab,
        "teacher": cfg.teacher,
        "teacher_fingerprint": teacher_fingerprint(cfg.teacher, teacher.config),
        "teacher_params": count_params(teacher),
        "tokenizer_fingerprint": shard.header["tokenizer_fingerprint"],
        "corpus_fingerprint": shard.header["corpus_fingerprint"],
        "shard_dir": str(shard_dir),
        "bytes_per_token": 6 * k + 4,
        "seconds": 0.0,
        "tokens_per_s": 0,
        "device": str(device),
        "precision": precision_name(amp),
        "complete": False,
        "windows_done": 0,
    }
    old = _read_header(out / HEADER)
    if old is not None:
        _check_same(out, old, header)
    resume = old is not None and _files_ok(out, old)
    if resume and old["complete"]:
        return {**old, "reused": True, "windows_computed": 0}
    if resume:
        _check_precision(out, old, header)
        header.update(seconds=old["seconds"], windows_done=old["windows_done"])
    out.mkdir(parents=True, exist_ok=True)
    arrays = _open(out, header, "r+" if resume else "w+")
    if not resume:
        write_json(out / HEADER, header)
    first_done = header["windows_done"]
    _fill(teacher.to(device).eval(), shard, arrays, header, out, device, amp, cfg.batch_size, stop_after)
    metrics = {**header, "reused": False, "windows_computed": n_windows - first_done}
    write_manifest(out, "cache-teacher", to_dict(cfg), metrics, time.perf_counter() - t0)
    return metrics


def _fill(
    teacher: torch.nn.Module,
    shard: TokenShard,
    arrays: tuple[np.memmap, np.memmap, np.memmap],
    header: dict[str, Any],
    out: Path,
    device: torch.device,
    amp: torch.dtype | None,
    batch_size: int,
    stop_after: int | None,
) -> None:
    """Run the teacher over windows windows_done.. n_windows - 1, a batch at a time; header tracks the progress."""
    T, k, n_windows = header["seq_len"], header["top_k"], header["n_windows"]
    ids_mm, logp_mm, tail_mm = arrays
    done = start = header["windows_done"]
    seconds_before, t_start = header["seconds"], time.perf_counter()
    last_save = t_start

    def save(complete: bool = False) -> None:
        for a in arrays:
            a.flush()
        seconds = seconds_before + time.perf_counter() - t_start
        header.update(
            windows_done=done,
            complete=complete,
            seconds=round(seconds, 3),
            tokens_per_s=round(done * T / max(seconds, 1e-9)),
        )
        write_json(out / HEADER, header)

    bar = tqdm(total=n_windows, initial=done, desc="cache-teacher", unit="win")
    try:
        for n_batches, first in enumerate(range(start, n_windows, batch_size)):
            if n_batches == stop_after:
                raise KeyboardInterrupt
            w = np.arange(first, min(first + batch_size, n_windows))
            x, _ = shard.grid_windows(w, T)
            with torch.inference_mode():
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = teacher(x.to(device), use_cache=False).logits  # (b, T, V)
                top, ids, tail = top_k_logprobs(logits, k)  # (b, T, k), (b, T, k), (b, T)
                del logits
                ids_mm[first : first + len(w)] = ids.to(torch.int32).cpu().numpy()
                logp_mm[first : first + len(w)] = top.half().cpu().numpy()
                tail_mm[first : first + len(w)] = tail.cpu().numpy()
            done = first + len(w)
            bar.update(len(w))
            bar.set_postfix(tok_per_s=f"{(done - start) * T / (time.perf_counter() - t_start):.4g}", refresh=False)
            if done < n_windows and time.perf_counter() - last_save >= SAVE_EVERY_S:
                save()
                last_save = time.perf_counter()
    except KeyboardInterrupt:
        save()
        raise
    finally:
        bar.close()
    save(complete=True)


def print_cache(summary: dict[str, Any], out: str | Path) -> None:
    """What a person reads after `distil-codegpt cache-teacher`; every number is in cache.json."""
    s = summary
    if s["reused"]:
        print(f"cache-teacher: {out} already holds this complete cache ({s['n_windows']:,} windows); reused as is")
        return
    mb = s["n_rows"] * s["bytes_per_token"] / 1e6
    print(
        f"cache-teacher: {s['n_windows']:,} windows x {s['seq_len']} = {s['n_rows']:,} tokens, top-{s['top_k']} of"
        f" {s['vocab_size']:,}, {s['bytes_per_token']} bytes/token = {mb:.1f} MB  |  {s['tokens_per_s']:,} tokens/s,"
        f" {s['seconds']:.1f} s ({s['device']}, {s['precision']})"
    )
    print(f"  written to {out} (train.ids.bin, train.logp.bin, train.tail.bin, cache.json)")


class TeacherCache:
    """A complete cache, memory-mapped read-only: a batch reads only its own windows' rows."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        build = f"`distil-codegpt cache-teacher --teacher DIR --data DIR --out {self.cache_dir}`"
        if not (self.cache_dir / HEADER).is_file():
            raise UserError(f"teacher_cache: {self.cache_dir} holds no {HEADER}; build the cache with {build}")
        header = read_json(self.cache_dir / HEADER, fix=f"rebuild the cache with {build}")
        if header.get("cache_format") != CACHE_FORMAT:
            raise UserError(
                f"teacher_cache: {self.cache_dir} has cache format {header.get('cache_format')!r}, this version reads"
                f" {CACHE_FORMAT}; rebuild it with {build}"
            )
        if not header.get("complete"):
            raise UserError(
                f"teacher_cache: {self.cache_dir} is incomplete ({header.get('windows_done')} of"
                f" {header.get('n_windows')} windows); finish it by rerunning {build} with the same settings"
            )
        try:
            shapes = _shapes(header)
        except (KeyError, TypeError):
            raise UserError(f"teacher_cache: {self.cache_dir / HEADER} lacks its array sizes; rebuild it with {build}")
        for name, (dtype, shape) in shapes.items():
            check_size(self.cache_dir / name, dtype.itemsize * int(np.prod(shape)), fix=f"rebuild it with {build}")
        self.header: dict = header
        self.seq_len: int = header["seq_len"]
        self.top_k: int = header["top_k"]
        self.n_windows: int = header["n_windows"]
        self.vocab_size: int = header["vocab_size"]
        self._ids, self._logp, self._tail = _open(self.cache_dir, header, "r")

    def tempered_tail_share(self, temperature: float, windows: int = 8) -> tuple[float, float, float]:
        """(the teacher's mean tail mass, the mean and the median share of the tempered target that the tail bucket
        takes at `temperature`) over the first `windows` windows, with the tail spread evenly over the other V - k
        tokens as the sparse KD loss assumes (distill/losses.py). At T = 1 the share is the tail mass itself."""
        n = min(windows, self.n_windows)
        logp = torch.from_numpy(np.asarray(self._logp[:n], dtype=np.float64).reshape(-1, self.top_k))
        tail = torch.from_numpy(np.asarray(self._tail[:n], dtype=np.float64).reshape(-1))
        if self.top_k >= self.vocab_size:  # the top-k is the whole distribution: no tail bucket
            return 0.0, 0.0, 0.0
        share = tempered_buckets(logp, tail, temperature, self.vocab_size)[:, -1].exp().double().numpy()
        return float(tail.exp().mean()), float(share.mean()), float(np.median(share))

    def check_shards(self, shard_dir: str | Path) -> None:
        """The cache's rows are only right for the token ids it was built from: same tokenizer, same corpus."""
        shard = TokenShard(shard_dir, SPLIT).header
        for key in ("tokenizer_fingerprint", "corpus_fingerprint"):
            if shard.get(key) != self.header[key]:
                raise ConfigError(
                    f"teacher_cache: {self.cache_dir} was built with {key} {self.header[key]}, but the shards in"
                    f" {shard_dir} have {shard.get(key)}; rebuild the cache for this data with `distil-codegpt"
                    " cache-teacher --out NEW_DIR`"
                )

    def batch(self, windows: np.ndarray | list[int], shard: TokenShard) -> CachedBatch:
        """The given windows' tokens and teacher rows, in the given order."""
        w = np.asarray(windows, dtype=np.int64)
        if w.ndim != 1 or (w.size and (w.min() < 0 or w.max() >= self.n_windows)):
            raise IndexError(f"windows: expected a 1-d list of indices in [0, {self.n_windows}), got {windows!r}")
        x, y = shard.grid_windows(w, self.seq_len)
        return CachedBatch(
            x=x,
            y=y,
            ids=torch.from_numpy(self._ids[w].astype(np.int64)),
            logp=torch.from_numpy(self._logp[w].astype(np.float32)),
            tail=torch.from_numpy(self._tail[w]),  # fancy indexing copies: a fresh, writable array
        )

    def bytes_per_token(self) -> int:
        return 6 * self.top_k + 4


# ---------------------------------------------------------------- files


def _read_header(path: Path) -> dict | None:
    try:
        header = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _shapes(header: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """File name -> (dtype, shape by window), from the header."""
    n, T, k = header["n_windows"], header["seq_len"], header["top_k"]
    return {
        f"{SPLIT}.ids.bin": (np.dtype(np.int32), (n, T, k)),
        f"{SPLIT}.logp.bin": (np.dtype(np.float16), (n, T, k)),
        f"{SPLIT}.tail.bin": (np.dtype(np.float32), (n, T)),
    }


def _files_ok(out: Path, header: dict) -> bool:
    try:
        shapes = _shapes(header)
    except (KeyError, TypeError):
        return False
    for name, (dtype, shape) in shapes.items():
        f = out / name
        if not f.is_file() or f.stat().st_size != dtype.itemsize * int(np.prod(shape)):
            return False
    return True


def _open(out: Path, header: dict, mode: str) -> tuple[np.memmap, np.memmap, np.memmap]:
    """The three arrays, indexed by window; w+ preallocates (sparse) files of the full size."""
    ids, logp, tail = (
        np.memmap(out / name, dtype=dtype, mode=mode, shape=shape) for name, (dtype, shape) in _shapes(header).items()
    )
    return ids, logp, tail


def _check_same(out: Path, old: dict, new: dict) -> None:
    """One line naming what differs between the cache in `out` and the one asked for, and the fix."""
    for key, flag in IDENTITY.items():
        if old.get(key) != new[key]:
            extra = f" (teacher {old.get('teacher')!r})" if key == "teacher_fingerprint" else ""
            raise UserError(
                f"{out}: holds a teacher cache made with {key} {old.get(key)!r}{extra}, not {new[key]!r} (from"
                f" {flag}); pass another --out, or delete {out} to rebuild it"
            )


def _check_precision(out: Path, old: dict, new: dict) -> None:
    """A partial cache is continued at the precision it was started with, so all its rows agree."""
    if old.get("precision") != new["precision"]:
        raise UserError(
            f"{out}: holds a partial teacher cache made with precision {old.get('precision')}, now {new['precision']};"
            f" rerun with --precision {old.get('precision')} to continue it, or delete {out} to rebuild it"
        )
