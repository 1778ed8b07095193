"""Settings of the study: `sweep` (with its variants as data and the learning-rate/batch/window search) and
`report`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from distil_codegpt.config.base import PRECISION_HELP, _check, _require, opt
from distil_codegpt.config.model import NAMED_PICKS


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
