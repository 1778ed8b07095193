"""The training loop: learning, exact resume, frozen vs in-training teacher, DDP equivalence, config errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import GPT2LMHeadModel

from distil_codegpt.config import ConfigError, DistilConfig, StudentConfig, TrainConfig, build_config
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill import trainer as trainer_module
from distil_codegpt.distill.run import run_distil, run_train
from distil_codegpt.distill.trainer import Trainer, loss_chunk, lr_factor, setup_runtime
from distil_codegpt.model.presets import preset_config
from distil_codegpt.model.student import build_student

LOOP = {"seq_len": 64, "batch_size": 8, "eval_batches": 4, "log_every": 1, "warmup_steps": 2, "tensorboard": False}


def tiny_model(tok_dir: Path, layers: int = 2, dropout: float = 0.1, seed: int = 0) -> GPT2LMHeadModel:
    tok = load_tokenizer(tok_dir)
    cfg = preset_config("tiny", len(tok), layers=layers)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = dropout
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def train_cfg(tiny_data: dict, out: Path, **kw) -> TrainConfig:
    values = {**LOOP, "data": str(tiny_data["data"]), "tokenizer": str(tiny_data["tok"]), "out": str(out), **kw}
    return build_config(TrainConfig, values)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedule() -> None:
    cfg = build_config(TrainConfig, {"data": "d", "out": "o", "warmup_steps": 4, "max_steps": 14, "min_lr_ratio": 0.1})
    assert [round(lr_factor(s, cfg), 4) for s in (0, 3, 4, 9, 14)] == [0.25, 1.0, 1.0, 0.55, 0.1]


def test_training_lowers_dev_loss(tiny_data: dict, tmp_path: Path) -> None:
    metrics = run_train(train_cfg(tiny_data, tmp_path / "t", max_steps=60, lr=3e-3, eval_every=0))
    untrained = Trainer(
        train_cfg(tiny_data, tmp_path / "u"),
        setup_runtime(train_cfg(tiny_data, tmp_path / "u")),
        tiny_model(tiny_data["tok"]),
        tiny_data["shards"],
    ).evaluate(tiny_model(tiny_data["tok"]))
    assert metrics["dev_loss"] < untrained["dev_loss"] - 1.5, (metrics, untrained)
    # the run's own start: an untrained model of the same shape (another init), on the same dev windows
    assert abs(metrics["start_dev_loss"] - untrained["dev_loss"]) < 0.1
    assert metrics["start_dev_loss"] > metrics["dev_loss"] + 1.5
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "t")
    assert saved.config.n_layer == 2 and (tmp_path / "t" / "tokenizer.json").is_file()
    run = json.loads((tmp_path / "t" / "run.json").read_text())
    assert run["stage"] == "train" and run["metrics"]["steps"] == 60
    lines = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {
        "step": 0,
        "tokens": 0,
        "start_dev_loss": pytest.approx(metrics["start_dev_loss"], rel=1e-5),
        "start_dev_ppl": pytest.approx(metrics["start_dev_ppl"], rel=1e-5),
    }
    lines = lines[1:]
    assert (
        lines[0]["step"] == 1
        and "tokens_per_s" in lines[0]
        and lines[-1]["dev_loss"] == pytest.approx(metrics["dev_loss"], rel=1e-5)
    )


def test_resume_is_exact(tiny_data: dict, tmp_path: Path) -> None:
    kw = {"max_steps": 6, "eval_every": 0, "save_every": 0}
    cfg = train_cfg(tiny_data, tmp_path / "a", **kw)
    first = Trainer(cfg, setup_runtime(cfg), tiny_model(tiny_data["tok"]), tiny_data["shards"])
    first.fit(stop_at=3)  # as if interrupted after step 3 (it checkpoints on the way out)
    resumed_cfg = train_cfg(tiny_data, tmp_path / "a", resume=True, **kw)
    torch.manual_seed(999)  # the checkpoint must restore the RNG, whatever happened in between
    resumed = Trainer(
        resumed_cfg, setup_runtime(resumed_cfg), tiny_model(tiny_data["tok"], seed=5), tiny_data["shards"]
    )
    resumed.fit()
    cfg_b = train_cfg(tiny_data, tmp_path / "b", **kw)
    straight = Trainer(cfg_b, setup_runtime(cfg_b), tiny_model(tiny_data["tok"]), tiny_data["shards"])
    straight.fit()
    assert resumed.step == straight.step == 6
    for k, v in straight.student.state_dict().items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        Trainer(cfg_b, setup_runtime(cfg_b), tiny_model(tiny_data["tok"]), tiny_data["shards"]).fit()


@pytest.fixture(scope="module")
def teacher_and_student(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("kd")
    teacher = root / "teacher"
    run_train(train_cfg(tiny_data, teacher, max_steps=40, lr=3e-3, eval_every=0, layers=4))
    student = root / "student"
    build_student(build_config(StudentConfig, {"teacher": str(teacher), "out": str(student), "layers": 2}))
    return teacher, student


def distil_cfg(tiny_data: dict, pair: tuple[Path, Path], out: Path, **kw) -> DistilConfig:
    values = {**LOOP, "data": str(tiny_data["data"]), "teacher": str(pair[0]), "student": str(pair[1]), "out": str(out)}
    # these tests check the loss parts of DistilBERT's recipe (their tiny teachers carry no run.json of `train`)
    return build_config(DistilConfig, {**values, "max_steps": 5, "eval_every": 0, "recipe": "distilbert", **kw})


def test_frozen_teacher_is_unchanged(tiny_data: dict, teacher_and_student, tmp_path: Path) -> None:
    before = state(GPT2LMHeadModel.from_pretrained(teacher_and_student[0]))
    student_before = state(GPT2LMHeadModel.from_pretrained(teacher_and_student[1]))
    cfg = distil_cfg(tiny_data, teacher_and_student, tmp_path / "s", teacher_mode="frozen")
    from distil_codegpt.model.presets import load_model

    teacher, student = load_model(str(teacher_and_student[0])), load_model(str(teacher_and_student[1]))
    trainer = Trainer(cfg, setup_runtime(cfg), student, tiny_data["shards"], teacher=teacher)
    trainer.fit()
    for k, v in before.items():  # the trainer pads the head in memory: compare the real rows
        assert torch.equal(v, teacher.state_dict()[k][: v.size(0)]), k
    assert any(not torch.equal(v, student.state_dict()[k][: v.size(0)]) for k, v in student_before.items())


def test_in_training_teacher_changes_and_both_are_saved(tiny_data: dict, teacher_and_student, tmp_path: Path) -> None:
    before = state(GPT2LMHeadModel.from_pretrained(teacher_and_student[0]))
    metrics = run_distil(distil_cfg(tiny_data, teacher_and_student, tmp_path / "s", teacher_mode="train"))
    after = state(GPT2LMHeadModel.from_pretrained(tmp_path / "s" / "teacher"))
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    assert "teacher_dev_loss" in metrics and metrics["steps"] == 5
    log = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert {"start_dev_loss", "start_teacher_dev_loss"} <= set(log[0]) and log[0]["step"] == 0
    assert {"kd", "clm", "cos", "teacher_clm"} <= set(log[1])


def test_distillation_beats_untrained_student(tiny_data: dict, teacher_and_student, tmp_path: Path) -> None:
    cfg = distil_cfg(tiny_data, teacher_and_student, tmp_path / "s", max_steps=40, lr=3e-3)
    metrics = run_distil(cfg)
    random_student = tmp_path / "r"
    build_student(
        build_config(
            StudentConfig,
            {"teacher": str(teacher_and_student[0]), "out": str(random_student), "layers": 2, "random": True},
        )
    )
    from distil_codegpt.model.presets import load_model

    untrained = Trainer(cfg, setup_runtime(cfg), load_model(str(random_student)), tiny_data["shards"])
    assert metrics["dev_loss"] < untrained.evaluate(untrained.student)["dev_loss"] - 1.0


def test_in_training_kd_resumes_exactly(tiny_data: dict, teacher_and_student, tmp_path: Path) -> None:
    from distil_codegpt.model.presets import load_model

    def trainer(out: Path, **kw) -> Trainer:
        cfg = distil_cfg(tiny_data, teacher_and_student, out, teacher_mode="train", max_steps=4, **kw)
        t, s = load_model(str(teacher_and_student[0])), load_model(str(teacher_and_student[1]))
        return Trainer(cfg, setup_runtime(cfg), s, tiny_data["shards"], teacher=t)

    trainer(tmp_path / "a").fit(stop_at=2)
    resumed = trainer(tmp_path / "a", resume=True)
    resumed.fit()
    straight = trainer(tmp_path / "b")
    straight.fit()
    for mine, theirs in ((resumed.student, straight.student), (resumed.teacher, straight.teacher)):
        for k, v in theirs.state_dict().items():
            assert torch.equal(v, mine.state_dict()[k]), k


def test_config_errors_before_compute(tiny_data: dict, teacher_and_student, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one of alpha_ce"):
        distil_cfg(tiny_data, teacher_and_student, tmp_path / "x", alpha_ce=0, alpha_clm=0, alpha_cos=0, alpha_mse=0)
    other = tmp_path / "other"
    m = tiny_model(tiny_data["tok"])
    m.resize_token_embeddings(m.config.vocab_size + 8)
    m.save_pretrained(other)
    with pytest.raises(ConfigError, match="vocabulary 1208 differs from the teacher's 1200"):
        run_distil(distil_cfg(tiny_data, (teacher_and_student[0], other), tmp_path / "x"))
    with pytest.raises(ConfigError, match="batch_size: 8 does not divide|micro_batch_size: 3 does not divide"):
        cfg = train_cfg(tiny_data, tmp_path / "y", micro_batch_size=3)
        Trainer(cfg, setup_runtime(cfg), tiny_model(tiny_data["tok"]), tiny_data["shards"])
    with pytest.raises(ConfigError, match="seq_len: 512 exceeds"):
        run_train(train_cfg(tiny_data, tmp_path / "z", seq_len=512))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "distil_codegpt.cli",
            "distil",
            "--teacher",
            str(tmp_path / "missing"),
            "--student",
            str(teacher_and_student[1]),
            "--data",
            str(tiny_data["data"]),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "missing" in r.stderr


def test_micro_batches_match_one_big_batch(tiny_data: dict, tmp_path: Path) -> None:
    results = []
    for micro in (8, 2):
        cfg = train_cfg(tiny_data, tmp_path / f"m{micro}", micro_batch_size=micro, max_steps=3, eval_every=0)
        t = Trainer(cfg, setup_runtime(cfg), tiny_model(tiny_data["tok"], dropout=0.0), tiny_data["shards"])
        t.fit()
        results.append(state(t.student))
    for k, v in results[0].items():
        torch.testing.assert_close(v, results[1][k], rtol=1e-4, atol=1e-5)


def test_ddp_two_processes_match_one(tiny_data: dict, tmp_path: Path) -> None:
    """torchrun with 2 gloo processes gives the weights of 1 process on the same global batch."""
    start = tmp_path / "start"
    tiny_model(tiny_data["tok"], dropout=0.0).save_pretrained(start)
    load_tokenizer(tiny_data["tok"]).save_pretrained(start)
    args = [
        "train",
        "--model",
        str(start),
        "--data",
        str(tiny_data["data"]),
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--eval-every",
        "0",
        "--no-tensorboard",
        "--lr",
        "1e-3",
        "--threads",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "distil_codegpt.cli", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "distil_codegpt.cli",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = GPT2LMHeadModel.from_pretrained(tmp_path / "one").state_dict()
    b = GPT2LMHeadModel.from_pretrained(tmp_path / "two").state_dict()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=1e-4, atol=1e-5)
    metrics = json.loads((tmp_path / "two" / "run.json").read_text())["metrics"]
    assert metrics["processes"] == 2 and metrics["ranks_identical"] is True


def test_bf16_autocast_path_tracks_fp32(tiny_data: dict, tmp_path: Path) -> None:
    """The CUDA precision path (bf16 autocast), run on CPU at tiny size: same losses within bf16 tolerance."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = train_cfg(tiny_data, tmp_path / precision, precision=precision, max_steps=3, eval_every=0)
        t = Trainer(cfg, setup_runtime(cfg), tiny_model(tiny_data["tok"], dropout=0.0), tiny_data["shards"])
        losses[precision] = t.fit()["dev_loss"]
    assert setup_runtime(train_cfg(tiny_data, tmp_path / "x", precision="bf16")).dtype == torch.bfloat16
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
    with pytest.raises(ConfigError, match="precision: 'fp16' needs CUDA; use fp32 or bf16"):
        setup_runtime(train_cfg(tiny_data, tmp_path / "y", precision="fp16"))


def test_budgets_stop_and_save(tiny_data: dict, tmp_path: Path) -> None:
    by_tokens = run_train(train_cfg(tiny_data, tmp_path / "tok", max_tokens=3 * 8 * 64, eval_every=0))
    assert (by_tokens["stop_reason"], by_tokens["steps"]) == ("max_tokens", 3)
    by_time = run_train(train_cfg(tiny_data, tmp_path / "time", max_minutes=1e-9, eval_every=0))
    assert by_time["stop_reason"] == "max_minutes" and by_time["steps"] == 0
    assert (tmp_path / "time" / "model.safetensors").is_file()


def test_tensorboard_events_when_installed(tiny_data: dict, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run_train(train_cfg(tiny_data, tmp_path / "tb", max_steps=2, eval_every=0, tensorboard=True))
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_compile_path_matches_eager(tiny_data: dict, tmp_path: Path) -> None:
    results = []
    for compile_ in (False, True):
        cfg = train_cfg(tiny_data, tmp_path / str(compile_), compile=compile_, max_steps=2, eval_every=0)
        t = Trainer(cfg, setup_runtime(cfg), tiny_model(tiny_data["tok"], dropout=0.0), tiny_data["shards"])
        t.fit()
        results.append(state(t.student))
    for k, v in results[0].items():
        torch.testing.assert_close(v, results[1][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["frozen", "train"])
def test_lean_loss_and_padded_vocab_match_the_plain_path(tiny_data: dict, teacher_and_student, tmp_path: Path, mode):
    """The default path (chunked head loss, head padded to 64) against full logits with no padding, 3 steps."""
    from distil_codegpt.model.presets import load_model

    runs = {}
    for name, kw in {"plain": {"loss_chunk": 0, "pad_vocab": 1}, "lean": {"loss_chunk": 100, "pad_vocab": 64}}.items():
        cfg = distil_cfg(tiny_data, teacher_and_student, tmp_path / name, teacher_mode=mode, max_steps=3, **kw)
        teacher, student = load_model(str(teacher_and_student[0])), load_model(str(teacher_and_student[1]))
        for m in (teacher, student):  # no dropout: the two paths must see the same function
            m.config.resid_pdrop = m.config.embd_pdrop = m.config.attn_pdrop = 0.0
            for mod in m.modules():
                if isinstance(mod, torch.nn.Dropout):
                    mod.p = 0.0
        t = Trainer(cfg, setup_runtime(cfg), student, tiny_data["shards"], teacher=teacher)
        runs[name] = (t.fit(), state(t.student), t.n_vocab)
    (plain, plain_w, nv), (lean, lean_w, _) = runs["plain"], runs["lean"]
    assert lean_w["transformer.wte.weight"].size(0) % 64 == 0 and plain_w["transformer.wte.weight"].size(0) == nv
    assert lean["dev_loss"] == pytest.approx(plain["dev_loss"], rel=1e-4)
    assert lean["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)
    for k, v in plain_w.items():
        torch.testing.assert_close(lean_w[k][: v.size(0)], v, rtol=1e-3, atol=1e-5)


def test_padded_head_is_trimmed_on_save(tiny_data: dict, tmp_path: Path) -> None:
    run_train(train_cfg(tiny_data, tmp_path / "t", max_steps=2, eval_every=0, pad_vocab=64))
    n_vocab = len(load_tokenizer(tiny_data["tok"]))
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "t")
    assert n_vocab % 64 != 0  # else this test would not test the trimming
    assert saved.config.vocab_size == n_vocab and saved.transformer.wte.weight.size(0) == n_vocab


def test_distil_from_teacher_cache(
    tiny_data: dict, teacher_and_student, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """KD from the cache: no teacher in memory, step 1's KD term equals the sparse KL computed here by hand."""
    from distil_codegpt.config import CacheTeacherConfig
    from distil_codegpt.distill.losses import SparseTargets, sparse_kd_loss
    from distil_codegpt.distill.teacher_cache import TeacherCache, build_cache
    from distil_codegpt.model.presets import load_model

    teacher, student_dir = teacher_and_student
    cache_dir = tmp_path / "cache"
    values = {"teacher": str(teacher), "data": str(tiny_data["data"]), "out": str(cache_dir), "top_k": 8}
    build_cache(build_config(CacheTeacherConfig, {**values, "seq_len": 64, "max_windows": 40}))
    kw = {"teacher_cache": str(cache_dir), "max_steps": 1, "eval_every": 0, "batch_size": 4}  # alpha_cos: auto, 0
    cfg = distil_cfg(tiny_data, teacher_and_student, tmp_path / "s", **{**kw, "teacher": ""})
    student = load_model(str(student_dir)).eval()  # eval: no dropout, so the step is a plain function
    reference = load_model(str(student_dir)).eval()
    t = Trainer(cfg, setup_runtime(cfg), student, tiny_data["shards"], teacher_cache=TeacherCache(cache_dir))
    t.student.eval()
    b = t.cache.batch(
        torch.randint(40, (4,), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003)).numpy(), t.train_data
    )
    parts = t.train_step()
    with torch.no_grad():
        logits = reference(input_ids=b.x).logits
    expected = sparse_kd_loss(logits, SparseTargets(b.ids, b.logp, b.tail), b.y, t.cfg.temperature)
    assert parts["kd"] == pytest.approx(expected.item(), rel=1e-5)
    assert t.teacher is None

    metrics = run_distil(distil_cfg(tiny_data, teacher_and_student, tmp_path / "r", **{**kw, "max_steps": 20}))
    untrained = Trainer(cfg, setup_runtime(cfg), load_model(str(student_dir)), tiny_data["shards"]).evaluate(
        load_model(str(student_dir))
    )
    assert metrics["dev_loss"] < untrained["dev_loss"]
    capsys.readouterr()
    run_distil(distil_cfg(tiny_data, teacher_and_student, tmp_path / "t1", **{**kw, "temperature": 1.0}))
    assert "tail bucket" not in capsys.readouterr().err  # T = 1: the cache's buckets are exact
    run_distil(distil_cfg(tiny_data, teacher_and_student, tmp_path / "t8", **{**kw, "temperature": 8.0}))
    share = TeacherCache(cache_dir).tempered_tail_share(8.0)[1]
    assert "warning: at T = 8 the cache's tail bucket" in capsys.readouterr().err and share > 0.25
    for bad, match in [
        ({"alpha_cos": 1.0}, "alpha_cos: 1.0 is not available with --teacher-cache: the cache holds no hidden"),
        ({"teacher_mode": "train"}, "teacher_mode: 'train' is not available with --teacher-cache"),
        ({"seq_len": 32}, "seq_len: 32 differs from the teacher cache's windows of 64; pass --seq-len 64"),
    ]:
        with pytest.raises(ConfigError, match=match):
            run_distil(distil_cfg(tiny_data, teacher_and_student, tmp_path / "bad", **{**kw, **bad}))


def test_cpu_threads_use_every_core_shared_by_local_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from distil_codegpt.runtime import cpu_threads, pick_device

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads() == cores and cpu_threads(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))
    assert cpu_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    before = torch.get_num_threads()
    try:
        pick_device("cpu")
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- divergences, defaults, other model families


def test_alpha_cos_auto_is_on_with_a_teacher_and_off_with_a_cache() -> None:
    base = {"data": "d", "out": "o", "student": "s", "recipe": "distilbert"}
    assert build_config(DistilConfig, {**base, "teacher": "t"}).resolve(True).alpha_cos == 1.0
    assert build_config(DistilConfig, {**base, "teacher_cache": "c"}).resolve(True).alpha_cos == 0.0
    assert build_config(DistilConfig, {**base, "teacher_cache": "c", "alpha_cos": 0.5}).resolve(True).alpha_cos == 0.5
    with pytest.raises(ConfigError, match=r"alpha_cos: -2.0 is not allowed; use 0 or more, or -1 \(the recipe's\)"):
        build_config(DistilConfig, {**base, "teacher": "t", "alpha_cos": -2})
    with pytest.raises(ConfigError, match="divergence: 'kl' is not one of forward, reverse, jsd"):
        build_config(DistilConfig, {**base, "teacher": "t", "divergence": "kl"})


def test_recipe_auto_depends_on_where_the_teacher_comes_from(tmp_path: Path) -> None:
    from distil_codegpt.distill.trainer import pretrained_teacher

    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "run.json").write_text(json.dumps({"stage": "train"}))
    (tmp_path / "imported").mkdir()
    (tmp_path / "imported" / "run.json").write_text(json.dumps({"stage": "import"}))
    assert not pretrained_teacher(str(tmp_path / "trained"))
    assert pretrained_teacher(str(tmp_path / "imported")) and pretrained_teacher("HuggingFaceTB/SmolLM2-135M")
    cfg = build_config(DistilConfig, {"data": "d", "out": "o", "student": "s", "teacher": "t"})
    here, real = cfg.resolve(False), cfg.resolve(True)
    assert (here.recipe, here.temperature, here.alpha_ce, here.alpha_clm, here.alpha_cos) == ("distilbert", 2, 5, 2, 1)
    assert (real.recipe, real.temperature, real.alpha_ce, real.alpha_clm, real.alpha_cos) == ("logit", 1, 1, 0, 0)
    assert (cfg.lr, here.lr, real.lr) == (-1, 5e-4, 1e-3)  # the logit recipe's lr: the real study's search
    explicit = build_config(
        DistilConfig, {"data": "d", "out": "o", "student": "s", "teacher": "t", "temperature": 3, "lr": 2e-4}
    )
    assert explicit.resolve(True).temperature == 3 and explicit.resolve(True).alpha_clm == 0
    assert explicit.resolve(True).lr == explicit.resolve(False).lr == 2e-4
    with pytest.raises(ConfigError, match="lr: 0.0 is not allowed; use a positive learning rate"):
        build_config(DistilConfig, {"data": "d", "out": "o", "student": "s", "teacher": "t", "lr": 0})
    with pytest.raises(ConfigError, match="at least one of alpha_ce, alpha_clm, alpha_cos, alpha_mse must be positive"):
        build_config(DistilConfig, {"data": "d", "out": "o", "student": "s", "teacher": "t", "alpha_ce": 0}).resolve(
            True
        )


def test_distil_records_the_resolved_recipe(tiny_data: dict, teacher_and_student, tmp_path: Path) -> None:
    cfg = distil_cfg(tiny_data, teacher_and_student, tmp_path / "s", recipe="auto", max_steps=2)
    run_distil(cfg)
    recorded = json.loads((tmp_path / "s" / "run.json").read_text())["config"]
    # the fixture's teacher was trained by `train` (its run.json says so): DistilBERT's recipe
    got = (
        recorded["recipe"],
        recorded["temperature"],
        recorded["alpha_ce"],
        recorded["alpha_clm"],
        recorded["alpha_cos"],
        recorded["lr"],
    )
    assert got == ("distilbert", 2.0, 5.0, 2.0, 1.0, 5e-4)


@pytest.mark.parametrize("loss_chunk", [0, -1])
@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_kd_term_is_the_configured_divergence(
    tiny_data: dict, teacher_and_student, tmp_path: Path, divergence: str, loss_chunk: int
) -> None:
    """Step 1's KD term, on the plain and the lean path, equals kd_loss on the two models' logits."""
    from distil_codegpt.distill.losses import kd_loss
    from distil_codegpt.model.presets import load_model

    cfg = distil_cfg(
        tiny_data, teacher_and_student, tmp_path / "s", divergence=divergence, loss_chunk=loss_chunk, max_steps=1
    )
    teacher, student = load_model(str(teacher_and_student[0])), load_model(str(teacher_and_student[1]))
    t = Trainer(cfg, setup_runtime(cfg), student, tiny_data["shards"], teacher=teacher)
    t.student.eval()  # no dropout: the step is a plain function of the weights
    x, y = t._batch(0)
    with torch.no_grad():
        s_logits, t_logits = student(input_ids=x).logits, teacher(input_ids=x).logits
    expected = kd_loss(s_logits, t_logits, y, t.cfg.temperature, divergence)
    assert t.train_step()["kd"] == pytest.approx(expected.item(), rel=1e-5)


FAMILY_PRESETS = ["tiny-llama", "tiny-qwen2", "tiny-neox"]


def test_last_hidden_state_is_after_the_final_norm_in_every_family(tiny_data: dict) -> None:
    """What the lean loss relies on: logits == hidden_states[-1] @ head.T (transformers ties the last one to the
    normed output)."""
    from transformers import AutoModelForCausalLM

    n_vocab = len(load_tokenizer(tiny_data["tok"]))
    for preset in ["tiny", *FAMILY_PRESETS]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(preset_config(preset, n_vocab)).eval()
        with torch.no_grad():
            out = model(input_ids=torch.randint(n_vocab, (2, 9)), output_hidden_states=True)
        head = model.get_output_embeddings()
        assert head.bias is None, preset
        torch.testing.assert_close(out.hidden_states[-1] @ head.weight.T, out.logits, msg=preset)


def test_no_weight_decay_on_embeddings_and_auto_padding_only_for_tied_heads(tiny_data: dict) -> None:
    from transformers import AutoModelForCausalLM

    from distil_codegpt.distill.trainer import make_optimizer, pad_multiple

    n_vocab = len(load_tokenizer(tiny_data["tok"]))
    cfg = train_cfg(tiny_data, Path("unused"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for preset, tied in [("tiny", True), ("tiny-llama", True), ("tiny-neox", False)]:
        model = AutoModelForCausalLM.from_config(preset_config(preset, n_vocab))
        decay, no_decay = (set(map(id, g["params"])) for g in make_optimizer(model, 1e-3, cfg, cpu).param_groups)
        assert id(model.get_input_embeddings().weight) in no_decay, preset
        assert (id(model.get_output_embeddings().weight) in decay) is not tied, preset
        assert all(p.dim() >= 2 for p in model.parameters() if id(p) in decay)
        assert (pad_multiple(0, cuda, model), pad_multiple(0, cpu, model), pad_multiple(8, cpu, model)) == (
            64 if tied else 1,
            1,
            8,
        )


@pytest.fixture(scope="module", params=FAMILY_PRESETS)
def family_pair(request, tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 4-layer teacher trained from a family's preset by `train`, and a random 2-layer student of its shape."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(request.param)
    teacher, student = root / "teacher", root / "student"
    trained = run_train(
        train_cfg(tiny_data, teacher, model=request.param, layers=4, max_steps=30, lr=3e-3, eval_every=0)
    )
    tok = load_tokenizer(tiny_data["tok"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(preset_config(request.param, len(tok), layers=2)).save_pretrained(student)
    tok.save_pretrained(student)
    return {"preset": request.param, "teacher": teacher, "student": student, "trained": trained}


def _untrained_dev_loss(tiny_data: dict, tmp_path: Path, model_dir: Path) -> float:
    from distil_codegpt.model.presets import load_model

    cfg = train_cfg(tiny_data, tmp_path / "untrained")
    model = load_model(str(model_dir))
    return Trainer(cfg, setup_runtime(cfg), model, tiny_data["shards"]).evaluate(model)["dev_loss"]


def test_train_from_a_family_preset_lowers_dev_loss(tiny_data: dict, family_pair: dict, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from distil_codegpt.model import families
    from distil_codegpt.model.presets import PRESETS

    saved = AutoConfig.from_pretrained(family_pair["teacher"])
    assert saved.model_type == PRESETS[family_pair["preset"]]["family"] and families.depth(saved) == 4
    untrained = _untrained_dev_loss(tiny_data, tmp_path, family_pair["student"])
    assert family_pair["trained"]["dev_loss"] < untrained - 1.5, (family_pair["trained"], untrained)


@pytest.mark.parametrize("mode", ["frozen", "train", "cache"])
def test_distil_lowers_dev_loss_in_every_family(tiny_data: dict, family_pair: dict, tmp_path: Path, mode: str) -> None:
    """Frozen and in-training KD (with the default cosine term), and KD from a teacher cache through the CLI with
    no loss flag at all (the cosine term is off by default there)."""
    from distil_codegpt.cli import main
    from distil_codegpt.config import CacheTeacherConfig
    from distil_codegpt.distill.teacher_cache import build_cache

    teacher, student = family_pair["teacher"], family_pair["student"]
    untrained = _untrained_dev_loss(tiny_data, tmp_path, student)
    out = tmp_path / "s"
    if mode == "cache":
        values = {"teacher": str(teacher), "data": str(tiny_data["data"]), "out": str(tmp_path / "cache")}
        build_cache(build_config(CacheTeacherConfig, {**values, "top_k": 8, "seq_len": 64, "max_windows": 40}))
        flags = ["--seq-len", "64", "--batch-size", "8", "--eval-batches", "4", "--warmup-steps", "2"]
        flags += ["--max-steps", "15", "--lr", "3e-3", "--eval-every", "0", "--no-tensorboard"]
        code = main(
            ["distil", "--teacher-cache", str(tmp_path / "cache"), "--student", str(student)]
            + ["--data", str(tiny_data["data"]), "--out", str(out), *flags]
        )
        assert code == 0
        metrics = json.loads((out / "run.json").read_text())["metrics"]
    else:
        cfg = distil_cfg(tiny_data, (teacher, student), out, teacher_mode=mode, max_steps=15, lr=3e-3)
        metrics = run_distil(cfg)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]  # [0]: the start
    assert ("cos" in log[0]) is (mode != "cache") and "kd" in log[0]
    assert metrics["dev_loss"] < untrained - 0.8, (metrics, untrained)
    assert metrics["start_dev_loss"] == pytest.approx(untrained, rel=1e-5)  # the same student, the same windows
    if mode == "train":
        assert "teacher_dev_loss" in metrics and (out / "teacher" / "config.json").is_file()


def test_a_time_budget_sets_the_schedule_when_it_ends_first() -> None:
    cfg = build_config(
        TrainConfig,
        {"data": "d", "out": "o", "warmup_steps": 2, "max_steps": 1000, "max_minutes": 10, "min_lr_ratio": 0},
    )
    # half the minutes spent at step 10 of 1000: the cosine is halfway, 0.5 (1 + cos(pi / 2)) = 0.5
    assert lr_factor(10, cfg, time_done=0.5) == pytest.approx(0.5)
    assert lr_factor(10, cfg, time_done=1.0) == pytest.approx(0.0)
    assert lr_factor(10, cfg, time_done=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 998)))
    assert lr_factor(1, cfg, time_done=0.9) == 1.0  # warmup is counted in steps


def test_a_time_budget_counts_the_minutes_of_every_resumed_process(tiny_data: dict, tmp_path: Path) -> None:
    kw = {"max_steps": 100000, "max_minutes": 10, "eval_every": 0, "save_every": 0}
    cfg = train_cfg(tiny_data, tmp_path / "a", **kw)
    first = Trainer(cfg, setup_runtime(cfg), tiny_model(tiny_data["tok"]), tiny_data["shards"])
    first.fit(stop_at=3)
    path = tmp_path / "a" / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=False)
    assert 0 < state["train_seconds"] < 600
    state["train_seconds"] = 600.0  # as if the earlier processes had spent the whole budget
    torch.save(state, path)
    cfg = train_cfg(tiny_data, tmp_path / "a", resume=True, **kw)
    resumed = Trainer(cfg, setup_runtime(cfg), tiny_model(tiny_data["tok"]), tiny_data["shards"])
    metrics = resumed.fit()
    assert (metrics["stop_reason"], metrics["steps"]) == ("max_minutes", 3)  # no step past the budget
    assert metrics["train_seconds"] >= 600.0


def test_a_time_budget_ends_before_it_runs_out_and_dev_evaluation_is_not_counted(
    tiny_data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # steps of 0.1 s, dev evaluations of 0.3 s after every step, a budget of 1.2 s, on the trainer's clock (a fake
    # one that only these advance, so a busy machine cannot change the count): counting the evaluations would
    # leave room for 3 steps; not counting them, for 11 (the 12th would end past the budget)
    now = [0.0]
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    cfg = train_cfg(tiny_data, tmp_path / "b", max_steps=100000, max_minutes=1.2 / 60, eval_every=1, save_every=0)
    trainer = Trainer(cfg, setup_runtime(cfg), tiny_model(tiny_data["tok"]), tiny_data["shards"])
    real_step, real_eval = trainer.train_step, trainer.evaluate

    def slow_step() -> dict:
        now[0] += 0.1
        return real_step()

    def slow_eval(model: Any) -> dict:
        now[0] += 0.3
        return real_eval(model)

    trainer.train_step, trainer.evaluate = slow_step, slow_eval  # type: ignore[method-assign]
    metrics = trainer.fit()
    assert metrics["stop_reason"] == "max_minutes"
    assert metrics["steps"] == 11, metrics["steps"]
    saved = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=False)["train_seconds"]
    assert saved <= 1.2 + 0.3, saved  # the final save alone may pass the budget
    assert metrics["seconds"] > metrics["train_seconds"] + 0.3 * metrics["steps"] - 0.1  # evaluations outside


def test_snapshots_save_the_model_at_each_fraction_of_the_run(tiny_data: dict, tmp_path: Path) -> None:
    kw = {"max_steps": 8, "eval_every": 0, "save_every": 0}
    model, seen = tiny_model(tiny_data["tok"]), {}

    def snap(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        seen[path.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    cfg = train_cfg(tiny_data, tmp_path / "s", snapshots=4, **kw)
    Trainer(cfg, setup_runtime(cfg), model, tiny_data["shards"], on_snapshot=snap).fit()
    points = {p.name: json.loads((p / "snapshot.json").read_text()) for p in (tmp_path / "s" / "snapshots").iterdir()}
    assert {k: (v["step"], v["fraction"]) for k, v in points.items()} == {
        "1-of-4": (2, 0.25),
        "2-of-4": (4, 0.5),
        "3-of-4": (6, 0.75),
    }
    assert points["2-of-4"]["tokens"] == 4 * cfg.batch_size * cfg.seq_len
    # the same run stopped at its 4th step holds the weights of the 2-of-4 snapshot
    cfg = train_cfg(tiny_data, tmp_path / "t", **kw)
    other = tiny_model(tiny_data["tok"])
    Trainer(cfg, setup_runtime(cfg), other, tiny_data["shards"]).fit(stop_at=4)
    for k, v in other.state_dict().items():
        assert torch.equal(v, seen["2-of-4"][k]), k
    # through the verb: each snapshot is a model directory plain transformers loads
    run_train(train_cfg(tiny_data, tmp_path / "r", snapshots=2, **{**kw, "max_steps": 2}))
    snapshot = tmp_path / "r" / "snapshots" / "1-of-2"
    assert GPT2LMHeadModel.from_pretrained(snapshot).config.n_layer == 2
    assert (snapshot / "tokenizer.json").is_file()


def test_the_auto_head_loss_chunk_is_small_on_the_cpu_and_large_on_cuda() -> None:
    assert loss_chunk(-1, 50257) == (16 << 20) // (4 * 50257) == 83  # ~16 MB of fp32 logits: stays in the CPU cache
    assert loss_chunk(-1, 50257, torch.device("cuda")) == (1 << 30) // (4 * 50257) == 5341  # ~1 GiB: few launches
    assert loss_chunk(-1, 64, torch.device("cuda")) == 1 << 16 and loss_chunk(-1, 64) == 4096  # the caps
    assert loss_chunk(-1, 10**9, torch.device("cuda")) == 32 == loss_chunk(-1, 10**9)  # the floor
    assert loss_chunk(512, 50257, torch.device("cuda")) == 512 and loss_chunk(0, 50257) == 0  # a setting is kept
