"""The `train` and `distil` verbs: load models, tokenizer and shards, check them against each other, run the loop."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from distil_codegpt.config import ConfigError, DistilConfig, LoopConfig, TrainConfig, to_dict
from distil_codegpt.data.shards import ensure_shards
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill.checkpoint import checkpoint_path
from distil_codegpt.distill.inputs import check_model, tokenizer_dir
from distil_codegpt.distill.local import fresh_cut
from distil_codegpt.distill.teacher_cache import TeacherCache
from distil_codegpt.distill.trainer import Runtime, Trainer, pretrained_teacher, setup_runtime
from distil_codegpt.model import families
from distil_codegpt.model.families import count_params
from distil_codegpt.model.presets import PRESETS, load_model, preset_config, resolve_model, save_model
from distil_codegpt.runinfo import write_manifest
from distil_codegpt.runtime import precision_name


def _shards(cfg: LoopConfig, rt: Runtime, tok_dir: str) -> Path:
    """Build the token shards on first use (one process builds, the others wait)."""
    if rt.main:
        shard_dir = ensure_shards(cfg.data, tok_dir)
    if rt.world > 1:
        dist.barrier()
    if not rt.main:
        shard_dir = ensure_shards(cfg.data, tok_dir)  # now only reads the headers
    return shard_dir


def _saver(model: torch.nn.Module, tokenizer: Any, out: Path) -> Any:
    n_vocab = model.config.vocab_size  # the trainer may pad the head in memory; the saved model is not padded

    def save() -> None:
        save_model(model, out, n_vocab, tokenizer)

    return save


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rt = setup_runtime(cfg)
    tok_dir = tokenizer_dir(cfg, cfg.model if cfg.model not in PRESETS else "")
    tokenizer = load_tokenizer(tok_dir)
    if cfg.model in PRESETS:
        torch.manual_seed(cfg.seed)
        config = preset_config(
            cfg.model,
            len(tokenizer),
            layers=cfg.layers or None,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = load_model(cfg.model)
    check_model(model, "model", len(tokenizer), cfg.seq_len)
    shard_dir = _shards(cfg, rt, tok_dir)
    params = count_params(model)  # before the trainer pads the head
    trainer = Trainer(
        cfg,
        rt,
        model,
        shard_dir,
        on_save=_saver(model, tokenizer, out),
        on_snapshot=lambda p: _saver(model, tokenizer, p)(),
    )
    metrics = trainer.fit()
    metrics.update(params=params, device=str(rt.device), precision=precision_name(rt.dtype), processes=rt.world)
    if rt.main:
        write_manifest(out, "train", to_dict(cfg), metrics, time.perf_counter() - t0, cfg.seed)
    return metrics


def _warn_tempered_tail(cache: Any, temperature: float) -> None:
    """At T != 1 a cache's tail bucket stands for an even tail, which can take most of the tempered target."""
    if temperature == 1:
        return
    _, share, _ = cache.tempered_tail_share(temperature)
    if share > 0.25:
        print(
            f"warning: at T = {temperature:g} the cache's tail bucket (the teacher's mass outside its top "
            f"{cache.top_k}, assumed spread evenly) takes {100 * share:.0f}% of the tempered target on average; "
            "the student learns to spread its mass over the tail. Use --temperature 1 with a cache, or the online "
            "teacher (--teacher) for T != 1 (measured: docs/RESULTS.md)",
            file=sys.stderr,
            flush=True,
        )


def run_distil(cfg: DistilConfig) -> dict[str, Any]:
    """Distil the student: one stage, or with --local-share the local stage to OUT/local and global KD from it."""
    if not cfg.resolved():  # the loss defaults depend on where the teacher comes from
        source = cfg.teacher or _cached_teacher(cfg.teacher_cache)
        pretrained = pretrained_teacher(resolve_model(source, role="teacher") if source else "")
        out = Path(cfg.out)  # a run that began in global KD (no OUT/local) resumes there, with no local stage
        began_global = cfg.resume and checkpoint_path(out).exists() and not (out / "local").exists()
        cfg = cfg.resolve(pretrained, cut_student=fresh_cut(cfg.student) and not began_global)
    if cfg.stage == "global" and cfg.local_share > 0:
        return _local_then_global(cfg)
    return _run_stage(cfg)


def _share(n: int, share: float) -> int:
    """The local stage's part of a count budget (steps, tokens): at least 1, leaving at least 1."""
    return min(max(round(share * n), 1), n - 1) if n > 1 else n


def _local_then_global(cfg: DistilConfig) -> dict[str, Any]:
    """The local stage for local_share of every budget given, saved to OUT/local (skipped when a resumed run finds
    it done), then global KD from it for the rest: what the local stage used (its run.json) is taken off."""
    local_out = Path(cfg.out) / "local"
    local = dataclasses.replace(
        cfg,
        stage="local",
        out=str(local_out),
        local_share=0.0,
        snapshots=0,
        max_steps=_share(cfg.max_steps, cfg.local_share),
        max_tokens=_share(cfg.max_tokens, cfg.local_share) if cfg.max_tokens else 0,
        max_minutes=cfg.local_share * cfg.max_minutes,
        resume=cfg.resume and checkpoint_path(local_out).exists(),
    )
    done = local_out / "run.json"
    if cfg.resume and done.is_file():
        print(f"local stage: done in {local_out} (run.json), global KD next", flush=True)
        used = json.loads(done.read_text()).get("metrics") or {}
    else:
        print(f"local stage first ({100 * cfg.local_share:.0f}% of the budget) -> {local_out}", flush=True)
        used = _run_stage(local)
    left_minutes = cfg.max_minutes - used.get("train_seconds", 0.0) / 60 if cfg.max_minutes else 0.0
    if cfg.max_minutes and left_minutes <= 0:
        raise ConfigError(f"max_minutes: the local stage used all {cfg.max_minutes:g}; use a smaller --local-share")
    rest = dataclasses.replace(
        cfg,
        student=str(local_out),
        local_share=0.0,
        max_steps=max(cfg.max_steps - int(used.get("steps", 0)), 1),
        max_tokens=max(cfg.max_tokens - int(used.get("tokens", 0)), 1) if cfg.max_tokens else 0,
        max_minutes=left_minutes,
        resume=cfg.resume and checkpoint_path(Path(cfg.out)).exists(),
    )
    print(f"global KD from the local stage's student -> {cfg.out}", flush=True)
    return _run_stage(rest, {"local_stage": {k: used.get(k) for k in LOCAL_KEYS} | {"out": str(local_out)}})


LOCAL_KEYS = ("steps", "tokens", "train_seconds", "train_loss", "dev_loss")


def _run_stage(cfg: DistilConfig, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """One training stage; `before` (what an earlier stage of this run did) goes into its metrics and run.json."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # the teacher first: a wrong teacher path fails before the student's weights are read
    teacher = None if cfg.teacher_cache else load_model(cfg.teacher, role="teacher")
    student = load_model(cfg.student, role="student")
    cache = None
    if teacher is None:
        cache = _open_cache(cfg, student)
    else:
        tv, sv = teacher.config.vocab_size, student.config.vocab_size
        if tv != sv:
            raise ConfigError(
                f"student: vocabulary {sv} differs from the teacher's {tv}; build the student from this teacher"
                " (`distil-codegpt student --teacher ...`) so both share one tokenizer"
            )
        sw, tw = families.width(student), families.width(teacher)
        if cfg.alpha_cos > 0 and tw != sw:
            raise ConfigError(
                f"alpha_cos: {cfg.alpha_cos} needs equal widths, but student is {sw} wide and teacher {tw};"
                " use --alpha-cos 0"
            )
    rt = setup_runtime(cfg)
    tok_dir = tokenizer_dir(cfg, cfg.student, cfg.teacher)
    tokenizer = load_tokenizer(tok_dir)
    check_model(student, "student", len(tokenizer), cfg.seq_len)
    if teacher is not None:
        check_model(teacher, "teacher", len(tokenizer), cfg.seq_len)
    shard_dir = _shards(cfg, rt, tok_dir)
    if cache is not None:
        cache.check_shards(shard_dir)
        _warn_tempered_tail(cache, cfg.temperature)
    params = count_params(student)
    teacher_params = count_params(teacher) if teacher is not None else cache.header.get("teacher_params")

    def save() -> None:
        _saver(student, tokenizer, out)()
        if cfg.teacher_mode == "train":
            _saver(teacher, tokenizer, out / "teacher")()

    def snapshot(path: Path) -> None:
        _saver(student, tokenizer, path)()

    trainer = Trainer(
        cfg, rt, student, shard_dir, teacher=teacher, on_save=save, teacher_cache=cache, on_snapshot=snapshot
    )
    metrics = trainer.fit()
    metrics.update(params=params, teacher_params=teacher_params, device=str(rt.device), processes=rt.world)
    metrics["precision"] = precision_name(rt.dtype)  # what `auto` picked on this machine
    metrics.update(before or {})
    if rt.main:
        write_manifest(out, "distil", to_dict(cfg), metrics, time.perf_counter() - t0, cfg.seed)
    return metrics


def _cached_teacher(cache_dir: str) -> str:
    """The teacher a cache was built from (cache.json), or "" when it cannot be read (the cache check says why)."""
    try:
        return json.loads((Path(cache_dir) / "cache.json").read_text()).get("teacher", "")
    except (OSError, ValueError, AttributeError):
        return ""


def _open_cache(cfg: DistilConfig, student: torch.nn.Module) -> Any:
    """The teacher cache, checked against what this distillation asks of it before any compute."""
    unavailable = {
        "teacher_mode": (cfg.teacher_mode == "train", "a cached teacher cannot train; use --teacher-mode frozen"),
        "alpha_cos": (cfg.alpha_cos > 0, "the cache holds no hidden states; pass --alpha-cos 0, or distil online"),
        "alpha_mse": (cfg.alpha_mse > 0, "the cache holds no full logits; pass --alpha-mse 0, or distil online"),
        "loss_chunk": (cfg.loss_chunk == 0, "cached KD needs the chunked loss; use --loss-chunk -1 (auto) or N > 0"),
    }
    for name, (bad, fix) in unavailable.items():
        if bad:
            raise ConfigError(f"{name}: {getattr(cfg, name)!r} is not available with --teacher-cache: {fix}")
    cache = TeacherCache(cfg.teacher_cache)
    if cache.seq_len != cfg.seq_len:
        raise ConfigError(
            f"seq_len: {cfg.seq_len} differs from the teacher cache's windows of {cache.seq_len}; pass --seq-len"
            f" {cache.seq_len} (or rebuild the cache with --seq-len {cfg.seq_len})"
        )
    if cache.vocab_size != student.config.vocab_size:
        raise ConfigError(
            f"teacher_cache: made with a vocabulary of {cache.vocab_size}, the student has"
            f" {student.config.vocab_size}; build the cache from this student's teacher"
        )
    return cache
