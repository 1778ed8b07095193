"""Choosing the vocabulary a trimmed head keeps: the ids a corpus uses, counted on its train split (the head itself,
and how a trimmed model is saved and loaded, are model/vocab_trim.py's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distil_codegpt.config import UserError
from distil_codegpt.data.shards import TokenShard, ensure_shards
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.model.presets import tokenizer_dir_of
from distil_codegpt.model.vocab_trim import trim_head


def count_tokens(tokens: np.ndarray, vocab: int) -> np.ndarray:
    """[V] occurrences of each id, read in chunks (a memory-mapped split need not fit in memory at once)."""
    counts = np.zeros(vocab, dtype=np.int64)
    for start in range(0, len(tokens), 1 << 24):
        chunk = np.asarray(tokens[start : start + (1 << 24)], dtype=np.int64)
        if chunk.size and int(chunk.max()) >= vocab:
            raise UserError(
                f"trim_vocab: the tokens reach id {int(chunk.max())}, beyond the model's {vocab}; use the"
                " shards of this model's tokenizer"
            )
        counts += np.bincount(chunk, minlength=vocab)
    return counts


def choose_kept(counts: np.ndarray, min_count: int, special_ids: list[int]) -> Tensor:
    """[K] sorted ids seen at least `min_count` times, plus every special token (they end completions)."""
    ids = set(np.flatnonzero(counts >= min_count).tolist()) | {i for i in special_ids if 0 <= i < len(counts)}
    return torch.tensor(sorted(ids), dtype=torch.long)


def coverage(counts: np.ndarray, kept: Tensor) -> float:
    """Share of the counted tokens whose id is kept (1.0 for no tokens)."""
    total = int(counts.sum())
    return float(counts[kept.numpy()].sum() / total) if total else 1.0


def token_splits(source: str | Path, model_dir: str | Path) -> tuple[Any, Any | None]:
    """(train split, held-out split or None) of `source`: a shard directory (train.json beside train.bin), or a
    corpus directory, tokenised with the model's tokenizer on first use. Held out is test, else dev."""
    src = Path(source).expanduser()
    if not src.is_dir():
        raise UserError(f"trim_vocab: {source}: no such directory; pass a corpus directory or its shards/<id> dir")
    if not (src / "train.json").is_file():
        src = ensure_shards(src, tokenizer_dir_of(model_dir))
    held = next((s for s in ("test", "dev") if (src / f"{s}.json").is_file()), None)
    return TokenShard(src, "train"), TokenShard(src, held) if held else None


def special_ids(tokenizer: Any) -> list[int]:
    """Every special token's id: bos/eos/pad/unk and the added tokens marked special (FIM, chat, <EOL>...)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return sorted(ids)


def head_share(model: nn.Module, rows: int) -> float:
    """The head's share of a decoding step's multiply-adds with `rows` head rows: rows x width against every other
    matrix (the embedding is a lookup; attention over the cache is left out, small for short contexts)."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2 and p is not emb and p is not head)
    return rows * emb.size(1) / (matrices + rows * emb.size(1))


def trim_from_corpus(model: nn.Module, source: str, model_dir: str, min_count: int) -> dict[str, Any]:
    """In place: trim the head to the ids `source`'s train split uses `min_count` times or more, plus the special
    tokens; returns what was kept and how much of a held-out split it covers."""
    vocab = model.get_output_embeddings().weight.size(0)
    train, held = token_splits(source, model_dir)
    counts = count_tokens(train.tokens, vocab)
    kept = choose_kept(counts, min_count, special_ids(load_tokenizer(model_dir)))
    trim_head(model, kept)
    held_counts = count_tokens(held.tokens, vocab) if held is not None else None
    return {
        "source": str(source),
        "min_count": min_count,
        "kept": int(kept.numel()),
        "vocab_size": vocab,
        "train_tokens": int(counts.sum()),
        "train_coverage": coverage(counts, kept),
        "heldout_split": held.split if held is not None else None,
        "heldout_tokens": int(held_counts.sum()) if held_counts is not None else 0,
        "heldout_coverage": coverage(held_counts, kept) if held_counts is not None else None,
        "head_share_before": head_share(model, vocab),
        "head_share_after": head_share(model, int(kept.numel())),
    }
