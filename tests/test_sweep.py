"""The sweep: the whole study on tiny settings, then a rerun that skips every finished step; and the study over an
existing llama teacher that brings its own tokenizer (raw code, no tokenizer trained)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SLICE, STDLIB
from test_real_tokenizer import smollm_like_tokenizer
from transformers import AutoModelForCausalLM

from distil_codegpt.config import ConfigError, CorpusConfig, EvaluateConfig, SweepConfig, TrainConfig, build_config
from distil_codegpt.data.corpus import build_corpus
from distil_codegpt.data.shards import TokenShard
from distil_codegpt.data.tokenizer import tokenizer_fingerprint
from distil_codegpt.distill.run import run_train
from distil_codegpt.evaluate.run import run_evaluate
from distil_codegpt.experiment.sweep import Sweep, run_sweep
from distil_codegpt.model.presets import preset_config

TINY = {
    "vocab_size": 1000,
    "line_examples": 40,
    "teacher_layers": 3,
    "teacher_steps": 6,
    "students": [1, 2],
    "student_steps": 3,
    "variant_layers": 2,
    "seq_len": 32,
    "batch_size": 4,
    "warmup_steps": 1,
    "eval_limit": 6,
    "eval_batch_size": 4,
    "latency_samples": 2,
    "threads": 1,
    "teacher_cache": True,  # the frozen-teacher student distils from the teacher cache
    "cache_top_k": 8,
}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, SweepConfig]:
    root = tmp_path_factory.mktemp("sweep")
    src = root / "src"
    src.mkdir()
    for name in SLICE:
        shutil.copy(STDLIB / name, src / name)
    cfg = build_config(SweepConfig, {**TINY, "out": str(root / "out"), "src": [str(src)]})
    return root / "out", run_sweep(cfg), cfg


def test_every_model_of_the_study_is_made_and_evaluated(swept) -> None:
    out, summary, _ = swept
    names = [m["name"] for m in json.loads((out / "sweep.json").read_text())["models"]]
    variants = ["pretrained-weights", "frozen", "low-temperature", "high-temperature", "no-cosine", "longer", "ce-only"]
    assert names == ["teacher", "untrained", "students/kd-1", "students/kd-2"] + [f"students/2-{v}" for v in variants]
    for name in names:
        metrics = json.loads((out / name / "eval" / "metrics.json").read_text())
        assert metrics["n"] == 6 and 0 <= metrics["edit_sim"] <= 100
    assert summary["rows"] == len(names) and (out / "results.md").is_file() and (out / "results.csv").is_file()
    longer = json.loads((out / "students/2-longer/run.json").read_text())["metrics"]
    assert longer["steps"] == 6  # twice student_steps
    frozen = json.loads((out / "students/2-frozen/run.json").read_text())["config"]
    assert frozen["teacher_mode"] == "frozen" and frozen["temperature"] == 2.0
    assert frozen["teacher_cache"] == str(out / "teacher-cache") and frozen["alpha_cos"] == 0.0
    cache = json.loads((out / "teacher-cache" / "cache.json").read_text())
    assert cache["complete"] and cache["top_k"] == 8 and cache["seq_len"] == 32
    low = json.loads((out / "students/2-low-temperature/run.json").read_text())["config"]
    assert low["temperature"] == 1.0 and low["teacher_mode"] == "train"
    ce = json.loads((out / "students/2-ce-only/run.json").read_text())
    assert ce["stage"] == "train"  # no teacher at all: the control
    pre = json.loads((out / "students/2-clm-pretrain/student-init/config.json").read_text())
    assert pre["distil_init"] == "pretrained"


def test_rerun_skips_finished_steps(swept, capsys: pytest.CaptureFixture) -> None:
    out, first, cfg = swept
    weights = out / "students/kd-2/model.safetensors"
    before = weights.stat().st_mtime_ns
    (out / "students/kd-1/eval/metrics.json").unlink()  # as if interrupted before this evaluation
    capsys.readouterr()
    again = run_sweep(cfg)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    ran = [x for x in lines if "skipped" not in x]
    assert len(ran) == 1 and "students/kd-1: evaluate" in ran[0]
    assert again["skipped"] == again["steps"] - 1 and weights.stat().st_mtime_ns == before


def test_students_deeper_than_the_teacher_fail_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="students: 13 layers exceed the teacher's 12"):
        Sweep(build_config(SweepConfig, {"out": str(tmp_path), "students": [4, 13]}))
    with pytest.raises(ConfigError, match="variants: 'bigger' is not allowed"):
        build_config(SweepConfig, {"out": str(tmp_path), "variants": ["frozen", "bigger"]})


# ---------------------------------------------------------------- an existing teacher with its own tokenizer

RAW = {
    "format": "raw",
    "teacher_steps": 0,  # the teacher as it is
    "students": [2],
    "variant_layers": 2,
    "variants": ["frozen", "ce-only"],
    "pick": "influence",  # scored on the corpus's dev windows, with the teacher's tokenizer
    "student_steps": 2,
    "seq_len": 32,
    "batch_size": 4,
    "warmup_steps": 1,
    "line_examples": 20,
    "eval_limit": 6,
    "eval_batch_size": 4,
    "latency_samples": 1,
    "threads": 1,
}


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(source tree, teacher): a 4-layer llama with a SmolLM2-like tokenizer saved in it, trained a little on the
    raw stdlib slice so that its completions are code rather than noise; no tokenizer of ours was ever trained."""
    root = tmp_path_factory.mktemp("llama-teacher")
    src = root / "src"
    src.mkdir()
    for name in SLICE[:4]:
        shutil.copy(STDLIB / name, src / name)
    init = root / "init"
    tok = smollm_like_tokenizer(init)
    torch.manual_seed(0)
    config = preset_config("tiny-llama", len(tok), layers=4, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(init)
    data = root / "data"
    build_corpus(build_config(CorpusConfig, {"out": str(data), "src": [str(src)], "format": "raw", "workers": 1}))
    loop = {"model": str(init), "data": str(data), "out": str(root / "teacher"), "max_steps": 40, "lr": 1e-2}
    loop |= {"seq_len": 64, "batch_size": 8, "warmup_steps": 2, "eval_every": 0, "threads": 1, "tensorboard": False}
    run_train(build_config(TrainConfig, loop))
    return src, root / "teacher"


@pytest.fixture(scope="module")
def llama_swept(llama_teacher: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SweepConfig]:
    src, teacher = llama_teacher
    out = tmp_path_factory.mktemp("llama-sweep") / "out"
    cfg = build_config(SweepConfig, {**RAW, "out": str(out), "src": [str(src)], "teacher_model": str(teacher)})
    run_sweep(cfg)
    return out, cfg


def test_existing_llama_teacher_sweep_makes_every_model(llama_swept, llama_teacher) -> None:
    out, _ = llama_swept
    _, teacher = llama_teacher
    names = ["teacher", "untrained", "students/kd-2", "students/2-frozen", "students/2-ce-only"]
    with open(out / "results.csv") as f:
        assert [row["name"] for row in csv.DictReader(f)] == names
    for name in names:
        metrics = json.loads((out / name / "eval" / "metrics.json").read_text())
        assert metrics["n"] == 6 and metrics["mode"] == "raw"
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["teacher"] == {"model": str(teacher), "family": "llama", "layers": 4, "tokenizer": "the teacher's own"}
    md = (out / "results.md").read_text()
    assert "mode raw" in md and "tokenizer: the teacher's own; corpus format raw" in md
    assert f"Teacher: `{teacher}` (llama, 4 layers)" in md
    untrained = json.loads((out / "untrained" / "config.json").read_text())
    assert untrained["model_type"] == "llama" and untrained["num_hidden_layers"] == 4
    assert untrained["distil_init"] == "random"
    init = json.loads((out / "students" / "init-2" / "config.json").read_text())
    assert init["model_type"] == "llama" and init["num_hidden_layers"] == 2 and init["distil_pick"] == "influence"
    assert len(init["distil_layer_map"]) == 2 and len(init["distil_pick_scores"]) == 4
    for name in names[1:]:
        config = json.loads((out / name / "config.json").read_text())
        assert config["model_type"] == "llama" and config["vocab_size"] == untrained["vocab_size"]
    assert json.loads((out / "students/2-ce-only/run.json").read_text())["stage"] == "train"
    frozen = json.loads((out / "students/2-frozen/run.json").read_text())["config"]
    assert frozen["teacher"] == str(teacher) and frozen["teacher_mode"] == "frozen"


def test_existing_teacher_tokenizer_is_used_and_none_is_trained(llama_swept, llama_teacher) -> None:
    out, _ = llama_swept
    _, teacher = llama_teacher
    assert not (out / "tok").exists() and not list(out.rglob("tokenizer_meta.json"))
    fingerprint = tokenizer_fingerprint(teacher)
    assert [p.name for p in (out / "data" / "shards").iterdir()] == [fingerprint]
    for split in ("train", "dev", "test"):
        assert TokenShard(out / "data" / "shards" / fingerprint, split).header["tokenizer_fingerprint"] == fingerprint
    for name in ("untrained", "students/kd-2", "students/2-frozen", "students/2-ce-only"):
        assert tokenizer_fingerprint(out / name) == fingerprint


def test_existing_teacher_metrics_equal_a_direct_evaluation(llama_swept, llama_teacher, tmp_path: Path) -> None:
    out, cfg = llama_swept
    _, teacher = llama_teacher
    values = {"model": str(teacher), "test": str(out / "data" / "line_completion" / "test.json"), "out": str(tmp_path)}
    values |= {"limit": cfg.eval_limit, "batch_size": cfg.eval_batch_size, "latency_samples": 0, "threads": 1}
    values |= {"tokens": str(out / "data" / "test.txt"), "device": cfg.device, "precision": cfg.precision}
    direct = run_evaluate(build_config(EvaluateConfig, values))
    swept = json.loads((out / "teacher" / "eval" / "metrics.json").read_text())
    for key in ("n", "exact_match", "edit_sim", "perplexity", "params", "mode"):
        assert swept[key] == direct[key], key
    preds = (out / "teacher" / "eval" / "predictions.txt").read_text()
    assert preds == (tmp_path / "predictions.txt").read_text() and preds.strip()
    assert swept["edit_sim"] > 0  # the teacher writes code, so the equality above compares real completions


def test_existing_teacher_is_checked_at_start(llama_teacher, tmp_path: Path) -> None:
    src, teacher = llama_teacher
    base = {**RAW, "out": str(tmp_path), "src": [str(src)], "teacher_model": str(teacher)}
    with pytest.raises(ConfigError, match="students: 5 layers exceed the teacher's 4"):
        Sweep(build_config(SweepConfig, {**base, "students": [2, 5]}))
    with pytest.raises(ConfigError, match=r"format: 'codexglue' needs a teacher trained on normalised.*--format raw"):
        Sweep(build_config(SweepConfig, {**base, "format": "codexglue"}))
    with pytest.raises(ConfigError, match="pick: '0,2' is not allowed"):
        build_config(SweepConfig, {**base, "pick": "0,2"})
