"""Stages chained into one job: the foundation every experiment starts from."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distil_codegpt.config import CorpusConfig, PrepareConfig, ShardsConfig, TokenizerConfig, build_config, to_dict
from distil_codegpt.data.corpus import build_corpus
from distil_codegpt.data.shards import build_shards
from distil_codegpt.data.tokenizer import train_tokenizer
from distil_codegpt.runinfo import write_manifest


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """corpus -> tokenizer -> shards under one run directory: OUT/data, OUT/tok, OUT/data/shards/<fingerprint>."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    data, tok = out / "data", out / "tok"
    corpus_cfg = build_config(
        CorpusConfig,
        {
            "out": str(data),
            "src": cfg.src,
            "format": cfg.format,
            "seed": cfg.seed,
            "line_examples": cfg.line_examples,
            "workers": cfg.workers,
        },
    )
    corpus = build_corpus(corpus_cfg)
    tokenizer = train_tokenizer(
        build_config(TokenizerConfig, {"data": str(data), "out": str(tok), "vocab_size": cfg.vocab_size})
    )
    shards = build_shards(
        build_config(ShardsConfig, {"data": str(data), "tokenizer": str(tok), "workers": cfg.workers})
    )
    seconds = time.perf_counter() - t0
    summary = {
        "out": str(out),
        "corpus": corpus,
        "tokenizer": tokenizer,
        "shards": shards,
        "seconds": round(seconds, 2),
    }
    metrics = {
        "files": corpus["files"],
        "tokens": {k: v["tokens"] for k, v in corpus["splits"].items()},
        "seconds": {
            "corpus": corpus["seconds"]["total"],
            "tokenizer": tokenizer["seconds"],
            "shards": shards.get("seconds"),
            "total": round(seconds, 2),
        },
    }
    write_manifest(out, "prepare", to_dict(cfg), metrics, seconds, cfg.seed)
    return summary
