"""What a training or caching run reads, checked against each other before any compute: the tokenizer directory,
and each model's vocabulary and context against the tokenizer and the window (`train`, `distil`, `cache-teacher`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distil_codegpt.config import ConfigError, LoopConfig
from distil_codegpt.model import families


def tokenizer_dir(cfg: LoopConfig, *model_dirs: str) -> str:
    """--tokenizer, else the first model directory that carries tokenizer files."""
    if cfg.tokenizer:
        return cfg.tokenizer
    for d in model_dirs:
        if d and (Path(d) / "tokenizer.json").is_file():
            return d
    raise ConfigError("tokenizer: missing; pass --tokenizer DIR (from `distil-codegpt tokenizer`)")


def check_model(model: torch.nn.Module, name: str, n_vocab: int, seq_len: int) -> None:
    vocab, context = model.config.vocab_size, families.context(model)
    if vocab < n_vocab:
        raise ConfigError(f"{name}: vocabulary {vocab} is smaller than the tokenizer's {n_vocab}; retrain it")
    if seq_len > context:
        raise ConfigError(f"seq_len: {seq_len} exceeds {name}'s context of {context}; use at most that")
