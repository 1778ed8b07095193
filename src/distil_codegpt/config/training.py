"""Settings of the training stages: the loop `train` and `distil` share, the KD recipes, and `cache-teacher`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from distil_codegpt.config.base import PRECISION_HELP, _check, _require, opt


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
    max_minutes: float = opt(
        0.0,
        "stop before this many minutes of training (every resumed process counted, dev evaluations not), saving"
        " first; the learning rate decays over them (0 = no limit)",
    )
    eval_every: int = opt(100, "dev loss / perplexity every N steps (0 = only at the end)")
    eval_batches: int = opt(20, "dev batches per evaluation")
    save_every: int = opt(200, "checkpoint every N steps (0 = only at the end)")
    snapshots: int = opt(
        0,
        "also save the model at each 1/N of the run (of --max-minutes when set, else of --max-steps) to"
        " OUT/snapshots/K-of-N, for a learning curve; its saving is not counted in the minutes (0 = off)",
    )
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
        zero_ok += ("snapshots",)
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
# The share of a distil budget spent first in the local stage, per recipe (0 = global KD only): for a pretrained
# teacher, a quarter (the one-hour comparison, docs/RESULTS.md), when the student is a cut of that teacher.
LOCAL_SHARE: dict[str, float] = {"distilbert": 0.0, "logit": 0.25}
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
    local_share: float = opt(
        -1.0,
        "with --stage global: first spend this share of the budget (of --max-minutes when set, and of --max-steps"
        " and --max-tokens) in the local stage, saved to OUT/local, then global KD from it in the rest"
        " (-1 = the recipe's: logit 0.25 when the student comes straight from `student` (a cut of the teacher, not"
        " yet trained), the teacher runs online and frozen and the budget has 4 steps or more; else 0)",
    )

    def resolved(self) -> bool:
        """Whether every recipe-dependent weight holds a value (no -1 left) and the recipe is named."""
        fields = [*RECIPES["logit"], "local_share"]
        return self.recipe != "auto" and all(getattr(self, k) != -1 for k in fields)

    def resolve(self, pretrained_teacher: bool, cut_student: bool = False) -> DistilConfig:
        """The one place the recipe's defaults are filled in (fields left at -1), once the teacher is known.

        A cache holds no hidden states, so alpha_cos defaults to 0 there, while an explicit alpha_cos > 0 with a
        cache still fails (with the fix). The recipe's local stage is the default only for a student straight from
        `student` (`cut_student`: a cut of the teacher, not yet trained)."""
        name = self.recipe if self.recipe != "auto" else ("logit" if pretrained_teacher else "distilbert")
        values = {k: v for k, v in RECIPES[name].items() if getattr(self, k) == -1}
        if self.teacher_cache and self.alpha_cos == -1:
            values["alpha_cos"] = 0.0
        if self.local_share == -1:  # a local stage needs the online frozen teacher and comes before global KD only
            plain = self.teacher_cache or self.teacher_mode == "train" or self.stage == "local" or not cut_student
            plain = plain or self.max_steps < 4  # a stage of its own needs steps to spare
            values["local_share"] = 0.0 if plain else LOCAL_SHARE[name]
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
        _check(
            0 <= self.local_share < 1 or self.local_share == -1,
            "local_share",
            self.local_share,
            "use a share in [0, 1), or -1 (the recipe's)",
        )
        if self.stage == "local" or self.local_share > 0:  # --local-share runs the local stage too
            _check(not self.teacher_cache, "teacher_cache", self.teacher_cache, "the local stage needs --teacher")
            _check(self.teacher_mode == "frozen", "teacher_mode", self.teacher_mode, "the local stage uses frozen")
        if self.stage == "local":
            _check(self.local_share <= 0, "local_share", self.local_share, "use it with --stage global (the default)")


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
