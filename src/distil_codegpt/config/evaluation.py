"""Settings of `evaluate`: line-level completion on a CodeXGLUE test file, with size, speed and latency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distil_codegpt.config.base import ENGINE_HELP, PRECISION_HELP, _check, _require, opt


@dataclass
class EvaluateConfig:
    """Line-level code completion on a CodeXGLUE line-completion file: EM, ES, size, speed, latency."""

    model: str = opt("", "model: HF dir or hub id (with its tokenizer), or a .gguf file", required=True)
    test: str = opt("", "line-completion file: JSON lines {input, gt} (ours, or CodeXGLUE's test.json)", required=True)
    out: str = opt("", "output directory: predictions.txt, metrics.json, run.json", required=True)
    limit: int = opt(0, "evaluate only the first N examples (0 = all)")
    beam: int = opt(1, "beam width: 1 = greedy; CodeXGLUE's pipeline used 5")
    line_end: Literal["token", "mass", "majority"] = opt(
        "token",
        "greedy's end of line: token = the likeliest id; mass = the line ends when the ids that end it together"
        " outweigh every other id; majority = when they take over half the probability",
    )
    batch_size: int = opt(32, "examples decoded together")
    max_new_tokens: int = opt(100, "at most this many new tokens per completion")
    context: int = opt(0, "use at most this many positions (0 = the model's context); e.g. the trained seq_len")
    tokens: str = opt("", "token-completion file (e.g. DATA/test.txt) for perplexity (empty = skip)")
    perplexity_tokens: int = opt(200_000, "perplexity over at most this many of its tokens (the work it costs)")
    latency_samples: int = opt(50, "examples for the batch-1 latency percentiles (0 = skip)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to run")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", PRECISION_HELP)
    threads: int = opt(0, "CPU threads for torch (0 = all cores)")
    seed: int = opt(0, "seed (decoding is deterministic; kept for the manifest)")
    draft: str = opt(
        "",
        "a student of the model (same vocabulary) that drafts for it: speculative greedy decoding,"
        " the output stays the model's own",
    )
    draft_tokens: int = opt(0, "tokens the draft proposes per teacher pass (0 = adaptive)")
    engine: Literal["auto", "torch", "llamacpp"] = opt("auto", ENGINE_HELP + "; llamacpp decodes greedily, batch 1")

    def validate(self) -> None:
        _check(self.perplexity_tokens >= 2, "perplexity_tokens", self.perplexity_tokens, "use 2 or more")
        _require(self.model, "model", "pass --model DIR")
        _require(self.test, "test", "pass --test FILE (e.g. DATA/line_completion/test.json)")
        _require(self.out, "out", "pass --out DIR")
        for name in ("beam", "batch_size", "max_new_tokens"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "use 1 or more")
        _check(self.line_end == "token" or self.beam == 1, "line_end", self.line_end, "it is greedy's: use --beam 1")
        for name in ("limit", "latency_samples", "threads", "context"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 or more")
