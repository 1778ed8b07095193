"""A trimmed output head: logits only for the tokens a corpus uses, scattered back into the full vocabulary.

Why: in a small student the (vocab x width) head is the largest matrix of a decoding step (SmolLM2: 49,152 x 576,
as many multiply-adds as 8 of its 30 blocks), yet code in one language uses a fraction of a general vocabulary.
The trimmed head multiplies only the K kept rows and writes them into a full-size logits tensor filled with -inf
(the scatter costs K values against the K x width matmul), so every caller (evaluate, complete, serve, distil)
still sees vocabulary-sized logits whose argmax, softmax and top-p are those of the kept tokens alone. The input
embedding stays whole, so any prompt still reads.

On disk a trimmed model is a plain Hugging Face directory (the full weights, so transformers alone loads it, then
untrimmed) plus `KEPT_FILE`, the kept ids; `load_model` rebuilds the trimmed head from it (`apply_saved_trim`).
The head keeps the full matrix as its parameter (tied to the embedding where the family ties them), so state dicts
and saved files keep the family's own layout, and training a trimmed student updates the same matrix; at inference
the kept rows are gathered once and reused until the weights change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distil_codegpt.config import UserError
from distil_codegpt.runinfo import write_json

KEPT_FILE = "kept_ids.json"


class TrimmedHead(nn.Module):
    """The LM head restricted to `kept` rows: (B, T, H) -> (B, T, V) logits, -inf outside the kept ids."""

    def __init__(self, weight: nn.Parameter, kept: Tensor, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.weight = weight  # [V, H] the full head matrix (the embedding's, where tied)
        self.bias = bias
        self.register_buffer("kept", kept.to(torch.long), persistent=False)  # [K] sorted full-vocabulary ids
        self.proj: nn.Module | None = None  # set by `freeze`: the kept rows as their own layer
        self.vocab = weight.size(0)
        self._rows: tuple[Tensor, Tensor | None] | None = None
        self._key: tuple | None = None

    def freeze(self) -> None:
        """The kept rows become their own `nn.Linear(H, K)` and the full matrix is let go: what int8 quantization
        needs (quantize_dynamic converts that layer), at the price of training through the head."""
        w, b = self.rows()
        self.proj = nn.Linear(w.size(1), w.size(0), bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.proj.weight.copy_(w)
            if b is not None:
                self.proj.bias.copy_(b)
        self.vocab = self.weight.size(0)
        del self.weight
        self.bias, self._rows, self._key = None, None, None

    def rows(self) -> tuple[Tensor, Tensor | None]:
        """([K, H] kept rows, [K] their bias): gathered afresh where gradients flow into the matrix, otherwise cached
        as long as the matrix is unchanged (a gather per decoding step would cost as much as the matmul itself)."""
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() and w.requires_grad:
            return w.index_select(0, self.kept), None if b is None else b.index_select(0, self.kept)
        key = (w.data_ptr(), w._version, w.dtype, w.device, self.kept.data_ptr())
        if self._key != key:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable outside inference mode too
                rows = w.detach().index_select(0, self.kept).contiguous()
                bias = None if b is None else b.detach().index_select(0, self.kept)
            self._rows, self._key = (rows, bias), key
        assert self._rows is not None
        return self._rows

    def forward(self, hidden: Tensor) -> Tensor:
        if self.proj is not None:
            z, vocab = self.proj(hidden), self.vocab  # (B, T, K)
        else:
            z, vocab = F.linear(hidden, *self.rows()), self.weight.size(0)  # the matrix may be padded (pad_vocab)
        full = z.new_full((*z.shape[:-1], vocab), float("-inf"))  # (B, T, V)
        return full.index_copy(-1, self.kept, z.to(full.dtype))

    def extra_repr(self) -> str:
        return f"kept={self.kept.numel()}, vocab={self.vocab}"


def head_module_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return name
    raise KeyError("model has no output embeddings")


def trim_head(model: nn.Module, kept: Tensor | list[int]) -> nn.Module:
    """In place: the model's LM head becomes a `TrimmedHead` over the same matrix (a trimmed one is re-trimmed)."""
    head = model.get_output_embeddings()
    kept = torch.as_tensor(kept, dtype=torch.long).unique()  # sorted, each id once
    vocab = head.weight.size(0)
    if kept.numel() == 0 or int(kept.min()) < 0 or int(kept.max()) >= vocab:
        raise UserError(f"trim: kept ids must be 1 or more ids in [0, {vocab}); got {kept.numel()} ids; recount them")
    bias = getattr(head, "bias", None)
    trimmed = TrimmedHead(head.weight, kept.to(head.weight.device), bias if isinstance(bias, nn.Parameter) else None)
    parent, _, child = head_module_name(model).rpartition(".")
    setattr(model.get_submodule(parent), child, trimmed)
    return model


def kept_ids(model: nn.Module) -> Tensor | None:
    """[K] the ids a trimmed model's head keeps; None for a full head."""
    head = model.get_output_embeddings()
    return head.kept if isinstance(head, TrimmedHead) else None


def kept_mask(model: nn.Module, vocab: int | None = None) -> Tensor | None:
    """[V] bool, True at the kept ids (what the KD losses take as `kept`); None for a full head."""
    ids = kept_ids(model)
    if ids is None:
        return None
    mask = torch.zeros(vocab or model.get_output_embeddings().vocab, dtype=torch.bool, device=ids.device)
    mask[ids] = True
    return mask


def save_kept(model: nn.Module, out: str | Path, **details: Any) -> None:
    """Write KEPT_FILE beside a saved model when its head is trimmed (nothing otherwise)."""
    ids = kept_ids(model)
    if ids is not None:
        write_json(Path(out) / KEPT_FILE, {"vocab_size": model.config.vocab_size, "kept": ids.tolist(), **details})


def read_kept(model_dir: str | Path) -> dict[str, Any] | None:
    """KEPT_FILE of a trimmed model directory ({"vocab_size", "kept", ...}), or None when it has none."""
    path = Path(model_dir).expanduser() / KEPT_FILE
    if not path.is_file():
        return None
    try:
        spec = json.loads(path.read_text())
        return {**spec, "vocab_size": int(spec["vocab_size"]), "kept": [int(i) for i in spec["kept"]]}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"model: {path} is not a kept-ids file ({e}); rebuild it with `compress --trim-vocab`")


def apply_saved_trim(model: nn.Module, model_dir: str | Path) -> nn.Module:
    """The model with its head trimmed as KEPT_FILE in its directory says (unchanged without one)."""
    spec = read_kept(model_dir) if Path(str(model_dir)).expanduser().is_dir() else None
    if spec is None:
        return model
    if spec["vocab_size"] != model.config.vocab_size:
        raise UserError(
            f"model: {Path(model_dir) / KEPT_FILE} was made for a vocabulary of {spec['vocab_size']}, the model has"
            f" {model.config.vocab_size}; remove the file or trim this model again with `compress --trim-vocab`"
        )
    return trim_head(model, spec["kept"])


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
    from distil_codegpt.data.shards import TokenShard, ensure_shards

    src = Path(source).expanduser()
    if not src.is_dir():
        raise UserError(f"trim_vocab: {source}: no such directory; pass a corpus directory or its shards/<id> dir")
    if not (src / "train.json").is_file():
        from distil_codegpt.compress.prune import tokenizer_dir_of

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
    from distil_codegpt.data.tokenizer import load_tokenizer

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
