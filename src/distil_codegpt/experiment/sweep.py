"""The study as one resumable command: data, teacher, students of several depths, variants, evaluation, report.

Every step writes into its own directory and is done when that directory's run.json (or eval/metrics.json)
exists; a step found done is skipped, and a training step that left a checkpoint is resumed, so an interrupted
sweep goes on where it stopped. Each step's wall time goes to OUT/timings.json, kept across resumed runs.

The teacher is either a preset trained here from scratch, with a tokenizer trained here on the corpus (OUT/tok), or
an existing model of any supported family (a directory, .gguf file, hub id, or fetch:NAME) used with its own
tokenizer: then no tokenizer is trained, the shards are built with the teacher's, and every student, the untrained
floor included, is the teacher's family and shape with fewer blocks. `teacher_steps` > 0 fine-tunes an existing
teacher on the corpus first.

With search_lr/search_batch/search_seq_len set, a short measured search (experiment/search.py) runs after the data
and the teacher and before any student, and its winners become the students' learning rate, batch and window.

A variant (config.VARIANTS) is data: the overrides it applies to the main students' recipe. The learning curve
costs no extra training: the variant_layers student stops at each fraction of its budget (its schedule is that of
the whole budget), its model files are copied aside and evaluated, and it resumes from its checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from distil_codegpt.artifacts import read_json
from distil_codegpt.config import (
    VARIANTS,
    CacheTeacherConfig,
    ConfigError,
    CorpusConfig,
    EvaluateConfig,
    ReportConfig,
    StudentConfig,
    SweepConfig,
    TokenizerConfig,
    TrainConfig,
    Variant,
    build_config,
    to_dict,
)
from distil_codegpt.data.corpus import build_corpus
from distil_codegpt.data.normalize import EOL
from distil_codegpt.data.tokenizer import train_tokenizer
from distil_codegpt.distill.run import run_train
from distil_codegpt.distill.teacher_cache import build_cache
from distil_codegpt.evaluate.run import add_warm_latency, model_tokenizer, run_evaluate
from distil_codegpt.experiment.costs import WARM_KEY
from distil_codegpt.experiment.report import build_report
from distil_codegpt.experiment.search import Search, searching
from distil_codegpt.experiment.stages import (
    FETCH,
    Step,
    fetched_teacher,
    first_files,
    read_done,
    run_distil_from,
    snapshot,
    trained,
)
from distil_codegpt.model import families
from distil_codegpt.model.presets import PRESETS, looks_local, model_type_of, resolve_model
from distil_codegpt.model.student import DATA_PICKS, build_student
from distil_codegpt.runinfo import write_json, write_manifest

EVAL_AGAIN = "delete its eval directory and run the sweep again: it evaluates the model again"
MAIN = Variant("", "")  # the main students' recipe, unchanged


@dataclass
class Model:
    """One model of the study: how it is made, and how the report labels it."""

    name: str  # its directory under the sweep dir
    label: str
    layers: int
    kind: str  # teacher | untrained | student | control | curve
    variant: str
    steps: list[Step] = field(default_factory=list)
    tokens: int | None = None  # training tokens (KD or CE) of a student
    seed: int | None = None
    distil: dict[str, Any] | None = None  # the settings of its KD run


class Sweep:
    def __init__(self, cfg: SweepConfig) -> None:
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
        self._set_loop(cfg)
        widths = {"ffn": cfg.student_ffn, "heads": cfg.student_heads, "hidden": cfg.student_hidden}
        self.width_tag = "".join(f"-{k}{v}" for k, v in widths.items() if v)
        self.width_label = "".join(f", {k} {v}" for k, v in widths.items() if v)
        self.ppl = self.data / "perplexity" / "test.txt" if cfg.perplexity_files else self.data / "test.txt"

    def _set_loop(self, cfg: SweepConfig) -> None:
        """The config the students are planned from, with the tokens of one step and of one student's budget."""
        self.cfg = cfg
        self.step_tokens = cfg.batch_size * cfg.seq_len
        self.budget = cfg.student_tokens or cfg.student_steps * self.step_tokens  # tokens per student

    def _existing_teacher(self) -> tuple[str, str, int]:
        """(where it loads from, family, depth) of an existing teacher, checked against the corpus format first."""
        c = self.cfg
        if c.teacher_model.startswith(FETCH):
            source = str(fetched_teacher(c.teacher_model[len(FETCH) :]))
        else:  # a .gguf file: imported once, cached
            source = resolve_model(c.teacher_model, role="teacher_model")
        families.family_name(model_type_of(source, role="teacher_model"), what=f"teacher_model {c.teacher_model!r}")
        if c.format == "codexglue" and EOL not in model_tokenizer(source).get_vocab():
            raise ConfigError(
                f"format: 'codexglue' needs a teacher trained on normalised code (an {EOL} token), and "
                f"{c.teacher_model!r}'s own tokenizer has none; pass --format raw (the source text, as it was trained)"
            )
        config = AutoConfig.from_pretrained(source)
        return source, families.family(config).name, families.depth(config)

    # ------------------------------------------------------------ configs of the stages

    def _steps(self, tokens: int) -> int:
        return math.ceil(tokens / self.step_tokens)

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
            **kw,
        }

    @staticmethod
    def _resumed(values: dict[str, Any]) -> dict[str, Any]:
        """Resume when the run left a checkpoint: decided when the step runs, after the steps before it."""
        return {**values, "resume": (Path(values["out"]) / "checkpoints" / "last.pt").is_file()}

    def _train(self, what: str, out: Path, model: str, steps: int, lr: float, **kw: Any) -> Step:
        tok = {}
        if model == (self.source or self.cfg.teacher_model):  # the tokenizer trained here, or the teacher's own
            own = self.tok or (self.source if looks_local(self.source) else "")
            tok = {"tokenizer": str(own)} if own else {}
        values = self._loop(out, steps, lr, model=model, **tok, **kw)
        return Step(what, out / "run.json", lambda: run_train(build_config(TrainConfig, self._resumed(values))))

    def _distil(self, out: Path, init: Path, steps: int, **kw: Any) -> dict[str, Any]:
        c = self.cfg
        values = self._loop(out, steps, c.student_lr, teacher=str(self.teacher), student=str(init))
        values.update(temperature=c.temperature, alpha_ce=c.alpha_ce, alpha_clm=c.alpha_clm, alpha_cos=c.alpha_cos)
        values.update(divergence=c.divergence, teacher_mode=c.teacher_mode, teacher_lr=c.correction_lr or c.student_lr)
        values["local_share"] = 0.0  # the sweep runs a local stage as a step of its own (study.local_share)
        values.update(kw)
        return values

    def _cache(self) -> Step:
        """The teacher's top-k over the train split, once, for every frozen-teacher student (`teacher_cache`)."""
        c = self.cfg
        values = {"teacher": str(self.teacher), "data": str(self.data), "out": str(self.out / "teacher-cache"),
                  "top_k": c.cache_top_k, "seq_len": c.seq_len, "device": c.device, "precision": c.precision,
                  "threads": c.threads, "max_windows": c.cache_windows}  # fmt: skip
        return Step("cache teacher", self.out / "teacher-cache" / "run.json",
                    lambda: build_cache(build_config(CacheTeacherConfig, values)))  # fmt: skip

    def _student(self, what: str, out: Path, layers: int, pick: str = "", **kw: Any) -> Step:
        """A student directory; one made from the teacher's layers takes them by `pick` (a data pick scores them
        on the corpus's dev split, with the teacher's tokenizer) and is cut to the students' width."""
        c = self.cfg
        widths = {"ffn": c.student_ffn, "heads": c.student_heads, "hidden": c.student_hidden}
        values = {"teacher": str(self.teacher), "out": str(out), "layers": layers, "seed": c.seed, **widths, **kw}
        if not (kw.get("random") or kw.get("init_from")):
            values["pick"] = pick or c.pick
            if values["pick"] in DATA_PICKS or any(widths.values()):
                values.update(data=str(self.data), pick_seq_len=c.seq_len)
        return Step(what, out / "run.json", lambda: build_student(build_config(StudentConfig, values)))

    # ------------------------------------------------------------ the plan

    def models(self) -> list[Model]:
        c = self.cfg
        n = self.teacher_depth
        teacher = Model("teacher", f"Teacher ({n} layers)", n, "teacher", "")
        if self.preset_teacher or c.teacher_steps:
            layers = {"layers": c.teacher_layers} if self.preset_teacher else {}
            model = self.source or c.teacher_model  # a fetched or imported teacher loads from its directory
            teacher.steps.append(
                self._train("train teacher", self.teacher, model, c.teacher_steps, c.teacher_lr, **layers)
            )
        models = [teacher]
        if c.untrained:
            untrained = Model("untrained", "Untrained (teacher shape)", n, "untrained", "no training")
            full = {"ffn": 0, "heads": 0, "hidden": 0}
            untrained.steps.append(self._student("random init", self.out / "untrained", n, random=True, **full))
            models.append(untrained)
        for k in c.students:
            curve = bool(c.curve) and k == c.variant_layers
            main = self._model(k, "main", MAIN, c.seed, curve=curve)
            models += [*(self._curve(main) if curve else []), main]
        models += [self._model(c.variant_layers, v, VARIANTS[v], c.seed) for v in c.variants]
        for seed in c.seeds:
            for v in c.seed_variants:
                models.append(self._model(c.variant_layers, v, MAIN if v == "main" else VARIANTS[v], seed))
        for v in c.depth_variants:  # last: a finding at variant_layers, tried at the other depths
            depths = [k for k in c.students if k != c.variant_layers or v not in c.variants]
            models += [self._model(k, v, VARIANTS[v], c.seed) for k in depths]
        return models

    def _model(self, k: int, name: str, v: Variant, seed: int, curve: bool = False) -> Model:
        """The k-layer student of variant `name` (main: the main students' recipe) trained with `seed`."""
        c, s = self.cfg, self.out / "students"
        fields = to_dict(c)
        suffix = "" if seed == c.seed else f"-seed{seed}"
        label = f"{k} layers" + self.width_label + (f", {v.label.format(**fields)}" if v.label else "")
        label += f", seed {seed}" if suffix else ""
        k_tag = f"{k}{self.width_tag}"
        out = s / (f"kd-{k_tag}{suffix}" if name == "main" else f"{k_tag}-{name}{suffix}")
        tokens = round(self.budget * (getattr(c, v.tokens) if v.tokens else 1))
        n_steps = self._steps(tokens)
        m = Model(f"students/{out.name}", label, k, "student" if v.kd else "control", "", tokens=tokens, seed=seed)
        pick = v.pick or c.pick
        init = s / (f"init-{k_tag}" if pick == c.pick else f"init-{k_tag}-{pick}")
        if v.init == "pretrained":
            pre = s / f"{k}-clm-pretrain{suffix}"
            pre_steps = c.pretrain_steps or n_steps
            m.steps = [
                self._student("random init", pre / "init", k, random=True, seed=seed),
                self._train("CLM pre-training", pre, str(pre / "init"), pre_steps, c.student_lr, seed=seed),
                self._student("init from pre-trained", pre / "student-init", k, init_from=str(pre)),
            ]
            init = pre / "student-init"
        elif v.init == "random":
            init = s / f"init-{k}-random{suffix}"
            m.steps.append(self._student("random init", init, k, random=True, seed=seed))
        else:  # the teacher's layers: shared by every student of this depth and pick
            m.steps.append(self._student("init", init, k, pick=pick))
        desc = v.description.format(**fields)
        if not v.kd:
            m.variant = desc
            m.steps.append(self._train("CE training", out, str(init), n_steps, c.student_lr, seed=seed))
            return m
        kw = {key: getattr(c, x[1:]) if isinstance(x, str) and x.startswith("@") else x for key, x in v.distil.items()}
        mode = kw.get("teacher_mode", c.teacher_mode)
        how = "in-training KD" if mode == "train" else "frozen-teacher KD"
        if c.teacher_cache and mode == "frozen" and not v.online:
            m.steps.append(self._cache())
            kw.update(teacher="", teacher_cache=str(self.out / "teacher-cache"), alpha_cos=0.0)
            how += " from the teacher cache (no hidden-state loss)"
        m.variant = how + (f"; {desc}" if desc else "")
        cut = init  # the student as cut from the teacher: its run.json holds the scoring's seconds
        if c.local_share and mode == "frozen":
            local = out.with_name(out.name + "-local")
            local_steps = max(round(c.local_share * n_steps), 1)  # a token budget: its share of the steps
            n_steps -= local_steps
            local_values = self._distil(local, init, local_steps, seed=seed, stage="local", teacher=str(self.teacher))
            local_values.update(teacher_cache="", alpha_cos=0.0)
            m.steps.append(Step("local stage", local / "run.json", partial(self._timed, local_values, init, None)))
            m.variant += f"; local stage first ({100 * c.local_share:.0f}% of the budget)"
            init, local_dir = local, local
        else:
            local_dir = None
        m.distil = values = self._distil(out, init, n_steps, seed=seed, **kw)
        done = (lambda: trained(out, n_steps)) if curve else None  # the curve's stops write run.json too
        if c.student_minutes:
            m.steps.append(Step("distil", out / "run.json", partial(self._timed, values, cut, local_dir), done))
        else:
            m.steps.append(Step("distil", out / "run.json", lambda: run_distil_from(self._resumed(values)), done))
        return m

    def _trained_tokens(self, m: Model) -> int | None:
        """The tokens a student's training stages ran (local stage and global KD), from their run.json."""
        if m.tokens is None:
            return None
        runs = [self.out / m.name / "run.json", self.out / f"{m.name}-local" / "run.json"]
        return sum((read_done(r).get("metrics") or {}).get("tokens", 0) for r in runs)

    def _timed(self, values: dict[str, Any], init: Path, local: Path | None) -> Any:
        """Run a training stage inside the student's minutes: the local stage takes local_share of what the width
        scoring left, global KD the rest of the budget once the local stage has run (read from their run.json)."""
        c = self.cfg
        if not c.student_minutes:
            return run_distil_from(self._resumed(values))
        scoring = (read_done(init / "run.json").get("seconds") or 0.0) / 60
        left = c.student_minutes - scoring
        if values.get("stage") == "local":
            minutes = c.local_share * left
        else:
            spent = (read_done(local / "run.json").get("metrics") or {}).get("train_seconds", 0.0) if local else 0.0
            minutes = left - spent / 60
        if minutes <= 0:
            raise ConfigError(
                f"student_minutes: {c.student_minutes:g} min are spent before {values['out']} could train "
                f"(width scoring {scoring:.1f} min); give a larger budget"
            )
        timed = {**values, "max_minutes": minutes, "max_steps": 10**9, "save_every": 20}
        timed["warmup_steps"] = c.warmup_steps
        return run_distil_from(self._resumed(timed))

    def _curve(self, main: Model) -> list[Model]:
        """The main student at each fraction of its budget: one run that stops, is copied aside and resumes (the
        copies are evaluated like any model)."""
        c, s, k = self.cfg, self.out / "students", main.layers
        values, points = main.distil or {}, []
        for f in sorted(set(c.curve)):
            tokens = max(round(f * self._steps(self.budget)), 1) * self.step_tokens
            if tokens >= self.budget or tokens in [p.tokens for p in points]:
                continue
            snap = s / f"kd-{k}-at-{tokens}"
            p = Model(f"students/{snap.name}", f"{k} layers, {tokens:,} tokens", k, "curve", main.variant)
            p.tokens, p.seed = tokens, c.seed
            stop = {**values, "max_tokens": tokens}
            step = Step(f"distil to {tokens:,} tokens", snap / "run.json", partial(self._stop, stop, snap))
            p.steps = [*main.steps[:-1], step]
            points.append(p)
        return points

    def _stop(self, values: dict[str, Any], snap: Path) -> None:
        """Train up to a learning-curve point (resuming), then copy the model aside for its evaluation."""
        out, tokens = Path(values["out"]), values["max_tokens"]
        run = read_done(out / "run.json")
        if (run.get("metrics") or {}).get("tokens", 0) > tokens:
            raise ConfigError(
                f"curve: {out} has trained past {tokens:,} tokens, so that point can no longer be saved; remove {out}"
                " (and its students/*-at-* copies) to redo the learning curve, or drop the point from curve"
            )
        run_distil_from(self._resumed(values))
        snapshot(out, snap)

    # ------------------------------------------------------------ running

    def plan(self, models: list[Model], evaluate: bool = True) -> list[Step]:
        c = self.cfg
        corpus = {"out": str(self.data), "src": c.src, "format": c.format, "seed": c.seed,
                  "line_examples": c.line_examples, "workers": c.threads}  # fmt: skip
        plan = [Step("corpus", self.data / "corpus.json", lambda: build_corpus(build_config(CorpusConfig, corpus)))]
        if c.perplexity_files:
            plan.append(
                Step("perplexity files", self.ppl, lambda: first_files(self.data, self.ppl, c.perplexity_files))
            )
        if self.tok:
            tok = {"data": str(self.data), "out": str(self.tok), "vocab_size": c.vocab_size}
            plan.append(Step("tokenizer", self.tok / "tokenizer_meta.json",
                             lambda: train_tokenizer(build_config(TokenizerConfig, tok))))  # fmt: skip
        for m in models:
            planned = {st.marker for st in plan}  # the variants share inits and the cache: each runs once
            plan += [
                Step(f"{m.name}: {st.name}", st.marker, st.run, st.done) for st in m.steps if st.marker not in planned
            ]
            if not evaluate:
                continue
            ev = {"model": str(self._model_dir(m)), "test": str(self.data / "line_completion" / "test.json"),
                  "out": str(self.out / m.name / "eval"), "limit": c.eval_limit, "batch_size": c.eval_batch_size,
                  "latency_samples": c.latency_samples, "beam": c.beam, "device": c.device, "context": c.eval_context,
                  "max_new_tokens": c.eval_max_new_tokens, "precision": c.precision, "threads": c.threads,
                  "tokens": str(self.ppl), "perplexity_tokens": c.perplexity_tokens}  # fmt: skip
            metrics = self.out / m.name / "eval" / "metrics.json"
            plan.append(Step(f"{m.name}: evaluate", metrics,
                             lambda ev=ev: run_evaluate(build_config(EvaluateConfig, ev))))  # fmt: skip
            if c.latency_samples:  # an evaluation from before `evaluate` measured warm latency: that alone now
                warm = partial(_add_warm_latency, ev)
                plan.append(
                    Step(f"{m.name}: warm latency", metrics.with_name("warm.json"), warm, partial(_has_warm, metrics))
                )
        return plan

    def run(self) -> dict[str, Any]:
        self.t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        chosen = None
        if searching(self.cfg):  # data and teacher first, then the trials; their winner sets the students' loop
            self._execute(self.plan(self.models()[:1], evaluate=False), "prepare")
            chosen = Search(self).run(self._execute)
            windows = round(self.cfg.cache_windows * self.cfg.seq_len / chosen.seq_len)  # the same cached tokens
            lr, batch, seq = chosen.lr, chosen.batch_size, chosen.seq_len
            self._set_loop(replace(self.cfg, student_lr=lr, batch_size=batch, seq_len=seq, cache_windows=windows))
        c = self.cfg
        models = self.models()
        entries = [_entry(m) for m in models]
        info = {"config": to_dict(c), "teacher": self.teacher_info, "budget_tokens": self.budget, "models": entries}
        if chosen is not None:
            info["search"] = {
                "chosen": chosen.record(),
                "file": str(self.out / "search" / "search.json"),
            }
        write_json(self.out / "sweep.json", info)
        plan = self.plan(models)
        done = self._execute(plan)
        if c.student_minutes:  # a budget of minutes: the tokens are what each student's stages trained on
            info["models"] = [_entry(m, self._trained_tokens(m)) for m in models]
            write_json(self.out / "sweep.json", info)
        summary = build_report(build_config(ReportConfig, {"dir": str(self.out)}))
        seconds = time.perf_counter() - self.t0
        write_manifest(self.out, "sweep", to_dict(c), {"steps": len(plan), "skipped": done}, seconds, c.seed)
        return {**summary, "seconds": round(seconds, 1), "skipped": done, "steps": len(plan)}

    def _execute(self, steps: list[Step], tag: str = "") -> int:
        """Run the steps not done yet, each one's wall time into timings.json; returns how many were done already."""
        timings_path = self.out / "timings.json"
        timings = read_done(timings_path)
        done, where = 0, f"{tag} " if tag else ""
        for i, step in enumerate(steps, 1):
            if step.is_done():
                print(f"[{where}{i}/{len(steps)}] {step.name}: done already, skipped", flush=True)
                done += 1
                continue
            so_far = _mmss(time.perf_counter() - self.t0)
            print(f"[{where}{i}/{len(steps)}] {step.name}  (sweep time so far {so_far})", flush=True)
            start = time.perf_counter()
            step.run()
            timings[step.name] = round(time.perf_counter() - start, 1)
            write_json(timings_path, timings)
            print(f"    {step.name}: done in {_mmss(timings[step.name])}", flush=True)
        return done

    def _model_dir(self, m: Model) -> Path:
        return self.teacher if m.name == "teacher" else self.out / m.name


def _add_warm_latency(values: dict[str, Any]) -> Any:
    return add_warm_latency(build_config(EvaluateConfig, values))


def _has_warm(metrics: Path) -> bool:
    return metrics.is_file() and WARM_KEY in read_json(metrics, fix=EVAL_AGAIN)


def _entry(m: Model, tokens: int | None = None) -> dict[str, Any]:
    entry = {"name": m.name, "label": m.label, "layers": m.layers, "kind": m.kind, "variant": m.variant}
    tokens = m.tokens if tokens is None else tokens
    return entry | ({"tokens": tokens, "seed": m.seed} if tokens is not None else {})


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    return Sweep(cfg).run()
