"""The study as one resumable command: data, teacher, students of several depths, variants, evaluation, report.

Every step writes into its own directory and is done when that directory's run.json (or eval/metrics.json)
exists; a step found done is skipped, and a training step that left a checkpoint is resumed, so an
interrupted sweep goes on where it stopped.

The teacher is either a preset trained here from scratch, with a tokenizer trained here on the corpus (OUT/tok), or
an existing model of any supported family (a directory, .gguf file or hub id) used with its own tokenizer: then no
tokenizer is trained, the shards are built with the teacher's, and every student, the untrained floor included, is
the teacher's family and shape with fewer blocks. `teacher_steps` > 0 fine-tunes an existing teacher on the corpus
first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distil_codegpt.config import (
    CacheTeacherConfig,
    ConfigError,
    CorpusConfig,
    DistilConfig,
    EvaluateConfig,
    ReportConfig,
    StudentConfig,
    SweepConfig,
    TokenizerConfig,
    TrainConfig,
    build_config,
    to_dict,
)
from distil_codegpt.runinfo import write_json, write_manifest


@dataclass
class Step:
    """One stage run; done when `marker` exists (the file the stage writes last)."""

    name: str
    marker: Path
    run: Callable[[], Any]


@dataclass
class Model:
    """One model of the study: how it is made, and how the report labels it."""

    name: str  # its directory under the sweep dir
    label: str
    layers: int
    kind: str  # teacher | untrained | student | control
    variant: str
    steps: list[Step] = field(default_factory=list)


class Sweep:
    def __init__(self, cfg: SweepConfig) -> None:
        from distil_codegpt.model.presets import PRESETS

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.data = self.out / "data"
        self.preset_teacher = cfg.teacher_model in PRESETS
        self.tok: Path | None  # the tokenizer trained here; None: the teacher's own
        if self.preset_teacher:
            self.tok, self.source = self.out / "tok", ""
            family, self.teacher_depth = PRESETS[cfg.teacher_model]["family"], cfg.teacher_layers
        else:
            self.tok = None
            self.source, family, self.teacher_depth = self._existing_teacher()
        # the teacher every student learns from: trained (or fine-tuned) here, else the existing one as it loads
        self.teacher = self.out / "teacher" if self.preset_teacher or cfg.teacher_steps else Path(self.source)
        self.teacher_info = {"model": cfg.teacher_model, "family": family, "layers": self.teacher_depth}
        self.teacher_info["tokenizer"] = str(self.tok) if self.tok else "the teacher's own"
        deepest = max([*cfg.students, cfg.variant_layers if cfg.variants else 0])
        if deepest > self.teacher_depth:
            raise ConfigError(f"students: {deepest} layers exceed the teacher's {self.teacher_depth}; use fewer")

    def _existing_teacher(self) -> tuple[str, str, int]:
        """(where it loads from, family, depth) of an existing teacher, checked against the corpus format first."""
        from transformers import AutoConfig

        from distil_codegpt.data.normalize import EOL
        from distil_codegpt.evaluate.run import model_tokenizer
        from distil_codegpt.model import families
        from distil_codegpt.model.presets import model_type_of, resolve_model

        c = self.cfg
        source = resolve_model(c.teacher_model, role="teacher_model")  # a .gguf file: imported once, cached
        families.family_name(model_type_of(source, role="teacher_model"), what=f"teacher_model {c.teacher_model!r}")
        if c.format == "codexglue" and EOL not in model_tokenizer(source).get_vocab():
            raise ConfigError(
                f"format: 'codexglue' needs a teacher trained on normalised code (an {EOL} token), and "
                f"{c.teacher_model!r}'s own tokenizer has none; pass --format raw (the source text, as it was trained)"
            )
        config = AutoConfig.from_pretrained(source)
        return source, families.family(config).name, families.depth(config)

    # ------------------------------------------------------------ configs of the stages

    def _loop(self, out: Path, steps: int, lr: float, **kw: Any) -> dict[str, Any]:
        c = self.cfg
        return {
            "data": str(self.data),
            "out": str(out),
            "seq_len": c.seq_len,
            "batch_size": c.batch_size,
            "micro_batch_size": c.micro_batch_size,
            "warmup_steps": min(c.warmup_steps, max(steps // 5, 1)),
            "max_steps": steps,
            "lr": lr,
            "eval_every": c.eval_every,
            "save_every": max(steps // 4, 1),
            "device": c.device,
            "precision": c.precision,
            "threads": c.threads,
            "seed": c.seed,
            "resume": (out / "checkpoints" / "last.pt").is_file(),
            **kw,
        }

    def _train(self, what: str, out: Path, model: str, steps: int, lr: float, **kw: Any) -> Step:
        from distil_codegpt.distill.run import run_train
        from distil_codegpt.model.presets import looks_local

        tok = {}
        if model == self.cfg.teacher_model:  # the tokenizer trained here, or the teacher's own (a .gguf's: its import)
            own = self.tok or (self.source if looks_local(self.source) else "")
            tok = {"tokenizer": str(own)} if own else {}
        values = self._loop(out, steps, lr, model=model, **tok, **kw)
        return Step(what, out / "run.json", lambda: run_train(build_config(TrainConfig, values)))

    def _distil(self, out: Path, init: Path, steps: int, **kw: Any) -> Step:
        from distil_codegpt.distill.run import run_distil

        c = self.cfg
        values = self._loop(out, steps, c.student_lr, teacher=str(self.teacher), student=str(init))
        values.update(temperature=c.temperature, alpha_ce=c.alpha_ce, alpha_clm=c.alpha_clm, alpha_cos=c.alpha_cos)
        values.update(teacher_mode="train", teacher_lr=c.student_lr)
        values.update(kw)
        return Step("distil", out / "run.json", lambda: run_distil(build_config(DistilConfig, values)))

    def _cache(self) -> Step:
        """The teacher's top-k over the train split, once, for every frozen-teacher student (`teacher_cache`)."""
        from distil_codegpt.distill.teacher_cache import build_cache

        c = self.cfg
        values = {"teacher": str(self.teacher), "data": str(self.data), "out": str(self.out / "teacher-cache"),
                  "top_k": c.cache_top_k, "seq_len": c.seq_len, "device": c.device, "precision": c.precision,
                  "threads": c.threads}  # fmt: skip
        return Step("cache teacher", self.out / "teacher-cache" / "run.json",
                    lambda: build_cache(build_config(CacheTeacherConfig, values)))  # fmt: skip

    def _student(self, what: str, out: Path, layers: int, **kw: Any) -> Step:
        """A student directory; one made from the teacher's layers takes them by `pick` (a data pick scores them
        on the corpus's dev split, with the teacher's tokenizer)."""
        from distil_codegpt.model.student import DATA_PICKS, build_student

        c = self.cfg
        values = {"teacher": str(self.teacher), "out": str(out), "layers": layers, "seed": c.seed, **kw}
        if not (kw.get("random") or kw.get("init_from")):
            values["pick"] = c.pick
            if c.pick in DATA_PICKS:
                values.update(data=str(self.data), pick_seq_len=c.seq_len)
        return Step(what, out / "run.json", lambda: build_student(build_config(StudentConfig, values)))

    # ------------------------------------------------------------ the plan

    def models(self) -> list[Model]:
        c = self.cfg
        s = self.out / "students"
        models = []
        n = self.teacher_depth
        teacher = Model("teacher", f"Teacher ({n} layers)", n, "teacher", "")
        if self.preset_teacher or c.teacher_steps:
            layers = {"layers": c.teacher_layers} if self.preset_teacher else {}
            teacher.steps.append(
                self._train("train teacher", self.teacher, c.teacher_model, c.teacher_steps, c.teacher_lr, **layers)
            )
        models.append(teacher)
        untrained = Model("untrained", "Untrained (teacher shape)", n, "untrained", "no training")
        untrained.steps.append(self._student("random init", self.out / "untrained", n, random=True))
        models.append(untrained)
        for k in c.students:
            m = Model(f"students/kd-{k}", f"{k} layers", k, "student", "in-training KD")
            m.steps += [
                self._student("init", s / f"init-{k}", k),
                self._distil(s / f"kd-{k}", s / f"init-{k}", c.student_steps),
            ]
            models.append(m)
        k = c.variant_layers
        init = s / f"init-{k}"
        plans = {
            "pretrained-weights": ("Pretrained-Weights", "CLM pre-training on code, then in-training KD"),
            "frozen": ("Frozen teacher", "pre-training KD (teacher frozen)"),
            "low-temperature": (f"T={c.low_temperature:g}", f"in-training KD at temperature {c.low_temperature:g}"),
            "high-temperature": (f"T={c.high_temperature:g}", f"in-training KD at temperature {c.high_temperature:g}"),
            "no-cosine": ("No hidden-state loss", "in-training KD, alpha_cos = 0"),
            "longer": (f"{c.longer_factor:g}x steps", f"in-training KD, {c.longer_factor:g}x the steps"),
            "ce-only": ("No KD (CE only)", "causal LM only, same init and steps: the control"),
        }
        for v in c.variants:
            label, desc = plans[v]
            m = Model(f"students/{k}-{v}", f"{k} layers, {label}", k, "control" if v == "ce-only" else "student", desc)
            m.steps.append(self._student("init", init, k))  # shared with the kd-k student and the other variants
            out = s / f"{k}-{v}"
            if v == "pretrained-weights":
                pre = s / f"{k}-clm-pretrain"
                steps = c.pretrain_steps or c.student_steps
                m.steps = [
                    self._student("random init", pre / "init", k, random=True),
                    self._train("CLM pre-training", pre, str(pre / "init"), steps, c.student_lr),
                    self._student("init from pre-trained", pre / "student-init", k, init_from=str(pre)),
                    self._distil(out, pre / "student-init", c.student_steps),
                ]
            elif v == "ce-only":
                m.steps.append(self._train("CE training", out, str(init), c.student_steps, c.student_lr))
            else:
                kw: dict[str, Any] = {
                    "frozen": {"teacher_mode": "frozen"},
                    "low-temperature": {"temperature": c.low_temperature},
                    "high-temperature": {"temperature": c.high_temperature},
                    "no-cosine": {"alpha_cos": 0.0},
                    "longer": {},
                }[v]
                steps = round(c.student_steps * c.longer_factor) if v == "longer" else c.student_steps
                if v == "frozen" and c.teacher_cache:
                    m.steps.append(self._cache())
                    kw.update(teacher="", teacher_cache=str(self.out / "teacher-cache"), alpha_cos=0.0)
                    m.variant += ", from the teacher cache (no hidden-state loss)"
                m.steps.append(self._distil(out, init, steps, **kw))
            models.append(m)
        return models

    # ------------------------------------------------------------ running

    def run(self) -> dict[str, Any]:
        from distil_codegpt.data.corpus import build_corpus
        from distil_codegpt.data.tokenizer import train_tokenizer
        from distil_codegpt.evaluate.run import run_evaluate
        from distil_codegpt.experiment.report import build_report

        t0 = time.perf_counter()
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        models = self.models()
        entries = [_entry(m) for m in models]
        write_json(self.out / "sweep.json", {"config": to_dict(c), "teacher": self.teacher_info, "models": entries})
        corpus = {"out": str(self.data), "src": c.src, "format": c.format, "seed": c.seed,
                  "line_examples": c.line_examples, "workers": c.threads}  # fmt: skip
        plan = [Step("corpus", self.data / "corpus.json", lambda: build_corpus(build_config(CorpusConfig, corpus)))]
        if self.tok:
            tok = {"data": str(self.data), "out": str(self.tok), "vocab_size": c.vocab_size}
            plan.append(Step("tokenizer", self.tok / "tokenizer_meta.json",
                             lambda: train_tokenizer(build_config(TokenizerConfig, tok))))  # fmt: skip
        for m in models:
            planned = {st.marker for st in plan}  # the variants share the init of the kd-k student: run it once
            plan += [Step(f"{m.name}: {st.name}", st.marker, st.run) for st in m.steps if st.marker not in planned]
            ev = {"model": str(self._model_dir(m)), "test": str(self.data / "line_completion" / "test.json"),
                  "out": str(self.out / m.name / "eval"), "limit": c.eval_limit, "batch_size": c.eval_batch_size,
                  "latency_samples": c.latency_samples, "beam": c.beam, "device": c.device,
                  "precision": c.precision, "threads": c.threads, "tokens": str(self.data / "test.txt")}  # fmt: skip
            plan.append(Step(f"{m.name}: evaluate", self.out / m.name / "eval" / "metrics.json",
                             lambda ev=ev: run_evaluate(build_config(EvaluateConfig, ev))))  # fmt: skip
        done = 0
        for i, step in enumerate(plan, 1):
            if step.marker.is_file():
                print(f"[{i}/{len(plan)}] {step.name}: done already, skipped", flush=True)
                done += 1
                continue
            print(f"[{i}/{len(plan)}] {step.name}  (sweep time so far {_mmss(time.perf_counter() - t0)})", flush=True)
            step.run()
        summary = build_report(build_config(ReportConfig, {"dir": str(self.out)}))
        seconds = time.perf_counter() - t0
        write_manifest(self.out, "sweep", to_dict(c), {"steps": len(plan), "skipped": done}, seconds, c.seed)
        return {**summary, "seconds": round(seconds, 1), "skipped": done, "steps": len(plan)}

    def _model_dir(self, m: Model) -> Path:
        return self.teacher if m.name == "teacher" else self.out / m.name


def _entry(m: Model) -> dict[str, Any]:
    return {"name": m.name, "label": m.label, "layers": m.layers, "kind": m.kind, "variant": m.variant}


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    return Sweep(cfg).run()
