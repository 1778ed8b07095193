"""A trimmed output head, the cut of the vocabulary: logits only for the tokens a corpus uses, scattered back into
the full vocabulary.

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
