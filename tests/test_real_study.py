"""The real-teacher study's code paths on a tiny llama standing in for SmolLM2 (the fetch is replaced by one that
writes it: nothing is downloaded): fetch:NAME, budgets in tokens, the variants as data, one teacher cache, the
learning curve from stops of one run, a second seed, the cost columns, wall times, and the configs that launch
the real runs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SLICE, STDLIB
from safetensors.torch import load_file
from test_real_tokenizer import smollm_like_tokenizer
from transformers import AutoModelForCausalLM

from distil_codegpt.config import ConfigError, DistilConfig, SweepConfig, build_config
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill.run import run_distil
from distil_codegpt.evaluate.completion import encode_inputs
from distil_codegpt.experiment.sweep import Sweep, run_sweep
from distil_codegpt.model import families, gguf
from distil_codegpt.model.presets import preset_config

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["in-training", "pick-angular", "high-temperature", "reverse-kl", "cosine", "online", "longer",
            "random-init", "ce-only"]  # fmt: skip
STUDY = {
    "format": "raw",
    "teacher_model": "fetch:smollm2",
    "teacher_steps": 0,
    "students": [1, 2],
    "teacher_mode": "frozen",
    "student_tokens": 512,  # 4 steps of 4 x 32
    "student_lr": 3e-3,
    "temperature": 1.0,
    "alpha_ce": 1.0,
    "alpha_clm": 0.0,
    "alpha_cos": 0.0,
    "teacher_cache": True,
    "cache_top_k": 8,
    "cache_windows": 16,
    "variant_layers": 2,
    "variants": VARIANTS,
    "high_temperature": 2.0,
    "correction_lr": 3e-4,
    "curve": [0.5],
    "seeds": [43],
    "depth_variants": ["pick-influence", "pick-angular"],  # angular is among the variants: depth 1 only
    "untrained": False,
    "seq_len": 32,
    "batch_size": 4,
    "warmup_steps": 1,
    "line_examples": 20,
    "eval_limit": 6,
    "eval_batch_size": 6,
    "eval_context": 64,
    "eval_max_new_tokens": 6,
    "perplexity_files": 2,
    "latency_samples": 1,
    "threads": 1,
}


def fake_fetch(calls: list[str], layers: int):  # noqa: ANN201
    """What fetch_teacher leaves in `out`, at test size: a llama with a SmolLM2-like tokenizer."""

    def fetch(name: str, out: str | Path, dtype: str = "fp32") -> dict:
        calls.append(name)
        tok = smollm_like_tokenizer(Path(out))
        torch.manual_seed(0)
        config = preset_config("tiny-llama", len(tok), layers=layers, eos_token_id=tok.eos_token_id)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        return {}

    return fetch


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SweepConfig, list[str]]:
    root = tmp_path_factory.mktemp("real-study")
    src = root / "src"
    src.mkdir()
    for name in SLICE[:4]:
        shutil.copy(STDLIB / name, src / name)
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTIL_CODEGPT_CACHE", str(root / "cache"))
        mp.setattr(gguf, "fetch_teacher", fake_fetch(calls, layers=4))
        cfg = build_config(SweepConfig, {**STUDY, "out": str(root / "out"), "src": [str(src)]})
        run_sweep(cfg)
        yield root / "out", cfg, calls


def _config(out: Path, name: str) -> dict:
    return json.loads((out / name / "run.json").read_text())["config"]


def _metrics(out: Path, name: str) -> dict:
    return json.loads((out / name / "run.json").read_text())["metrics"]


def test_every_variant_applies_its_overrides(study) -> None:
    out, _, calls = study
    sweep = json.loads((out / "sweep.json").read_text())
    names = [m["name"] for m in sweep["models"]]
    students = ["students/kd-1", "students/kd-2-at-256", "students/kd-2"]
    variants = [f"students/2-{v}" for v in VARIANTS]
    depth = ["students/1-pick-influence", "students/2-pick-influence", "students/1-pick-angular"]
    assert names == ["teacher", *students, *variants, "students/kd-2-seed43", *depth]
    teacher = out.parent / "cache" / "teachers" / "smollm2-fp32"
    assert calls == ["smollm2"] and sweep["teacher"]["model"] == "fetch:smollm2" and sweep["teacher"]["layers"] == 4
    cache = str(out / "teacher-cache")
    main = _config(out, "students/kd-2")
    assert (main["teacher"], main["teacher_cache"], main["teacher_mode"]) == ("", cache, "frozen")
    assert (main["divergence"], main["temperature"], main["alpha_cos"], main["max_steps"]) == ("forward", 1.0, 0.0, 4)
    assert json.loads((out / "teacher-cache" / "cache.json").read_text())["n_windows"] == 16
    trains = _config(out, "students/2-in-training")
    assert (trains["teacher_mode"], trains["teacher_cache"], trains["teacher"]) == ("train", "", str(teacher))
    assert (trains["teacher_lr"], trains["lr"]) == (3e-4, 3e-3)  # correction_lr, student_lr
    assert _config(out, "students/2-reverse-kl")["divergence"] == "reverse"
    assert _config(out, "students/2-reverse-kl")["teacher_cache"] == cache
    assert _config(out, "students/2-high-temperature")["temperature"] == 2.0
    cosine, online = _config(out, "students/2-cosine"), _config(out, "students/2-online")
    assert (cosine["alpha_cos"], cosine["teacher_cache"], cosine["teacher"]) == (1.0, "", str(teacher))
    assert (online["alpha_cos"], online["teacher_cache"], online["teacher"]) == (0.0, "", str(teacher))
    angular = json.loads((out / "students" / "init-2-angular" / "config.json").read_text())
    assert angular["distil_pick"] == "angular" and _config(out, "students/2-pick-angular")["student"].endswith(
        "angular"
    )
    influence = json.loads((out / "students" / "init-1-influence" / "config.json").read_text())
    assert (influence["distil_pick"], influence["num_hidden_layers"]) == ("influence", 1)
    assert _config(out, "students/1-pick-influence")["student"] == str(out / "students" / "init-1-influence")
    random_init = json.loads((out / "students" / "init-2-random" / "config.json").read_text())
    assert random_init["distil_init"] == "random" and random_init["num_hidden_layers"] == 2
    assert json.loads((out / "students/2-ce-only/run.json").read_text())["stage"] == "train"
    assert _metrics(out, "students/kd-1")["tokens"] == 512 and _metrics(out, "students/2-longer")["tokens"] == 1024
    assert _config(out, "students/kd-2-seed43")["seed"] == 43 and _metrics(out, "students/kd-2-seed43")["tokens"] == 512
    for name in names:
        assert json.loads((out / name / "eval" / "metrics.json").read_text())["n"] == 6


def test_learning_curve_stops_one_run_and_resumes_it(study, tmp_path: Path) -> None:
    out, _, _ = study
    point, final = out / "students" / "kd-2-at-256", out / "students" / "kd-2"
    assert (_metrics(out, "students/kd-2-at-256")["tokens"], _metrics(out, "students/kd-2")["tokens"]) == (256, 512)
    assert not (point / "checkpoints").exists() and (point / "model.safetensors").is_file()
    # stopped at 256 tokens and resumed to 512 = one run straight to 512
    straight = {**_config(out, "students/kd-2"), "out": str(tmp_path / "straight"), "resume": False}
    run_distil(build_config(DistilConfig, straight))
    resumed, direct = load_file(final / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.allclose(resumed[k], direct[k], atol=1e-6) for k in direct)
    stopped = load_file(point / "model.safetensors")
    assert any(not torch.equal(stopped[k], resumed[k]) for k in direct)
    with open(out / "results.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert (rows["students/kd-2-at-256"]["kind"], rows["students/kd-2-at-256"]["tokens"]) == ("curve", "256")
    assert (out / "plots" / "learning_curve.png").is_file() and (out / "plots" / "es_vs_latency.png").is_file()
    assert "![learning_curve](plots/learning_curve.png)" in (out / "results.md").read_text()
    # the longer variant (its own run at 2x the tokens) joins the curve as a point of its own
    from distil_codegpt.config import ReportConfig
    from distil_codegpt.experiment import report

    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "_plot_curve", lambda points, longer, *a: seen.append((points, longer)))
        report.build_report(build_config(ReportConfig, {"dir": str(out), "out": str(tmp_path / "report")}))
    ((points, longer),) = seen
    assert [(r["name"], r["tokens"]) for r in points] == [("students/kd-2-at-256", 256), ("students/kd-2", 512)]
    assert [(r["name"], r["tokens"]) for r in longer] == [("students/2-longer", 1024)]


def test_cost_columns_and_wall_times(study) -> None:
    out, _, _ = study
    with open(out / "results.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    teacher = AutoModelForCausalLM.from_pretrained(out.parent / "cache" / "teachers" / "smollm2-fp32")
    linear = sum(m.weight.numel() for m in teacher.modules() if isinstance(m, torch.nn.Linear))  # blocks + head
    assert int(rows["teacher"]["macs_per_token"]) == linear
    assert float(rows["teacher"]["compute_share_pct"]) == 100.0 and float(rows["teacher"]["latency_speedup"]) == 1.0
    shares = [float(rows[n]["compute_share_pct"]) for n in ("students/kd-1", "students/kd-2")]
    assert 0 < shares[0] < shares[1] < 100
    # warm: the prompt but its last token in the KV cache; its cached share is what the prompt's ids say
    ev = json.loads((out / "teacher" / "eval" / "run.json").read_text())["config"]
    first = json.loads((out / "data" / "line_completion" / "test.json").read_text().splitlines()[0])["input"]
    tok = load_tokenizer(out.parent / "cache" / "teachers" / "smollm2-fp32")
    n = len(encode_inputs(tok, [first], ev["context"] - ev["max_new_tokens"])[0])
    metrics = json.loads((out / "teacher" / "eval" / "metrics.json").read_text())
    assert metrics["warm_cached"] == pytest.approx((n - 1) / n) and float(rows["teacher"]["latency_warm_ms_p50"]) > 0
    assert metrics["warm_latency_ms_p50"] == float(rows["teacher"]["latency_warm_ms_p50"])
    md = (out / "results.md").read_text()
    assert "## Against the teacher" in md and "| Compute share |" in md and "Warm p50" in md
    timings = json.loads((out / "timings.json").read_text())
    assert "students/kd-2: distil" in timings and "cache teacher" in " ".join(timings)
    assert all(s >= 0 for s in timings.values()) and "## Wall time of each step" in md


def test_rerun_resumes_a_cut_short_distil_and_skips_the_rest(study, capsys: pytest.CaptureFixture) -> None:
    out, cfg, calls = study
    (out / "students/kd-1/run.json").unlink()  # as if cut short after its last checkpoint
    shutil.rmtree(out / "students/kd-1/eval")
    again = run_sweep(cfg)
    assert again["skipped"] == again["steps"] - 2 and calls == ["smollm2"]
    kd1 = json.loads((out / "students/kd-1/run.json").read_text())
    assert kd1["config"]["resume"] is True and kd1["metrics"]["tokens"] == 512
    capsys.readouterr()
    again = run_sweep(cfg)
    assert again["skipped"] == again["steps"] and "done already, skipped" in capsys.readouterr().out


def test_rerun_adds_warm_latency_to_an_older_evaluation(study, capsys: pytest.CaptureFixture) -> None:
    out, cfg, calls = study
    path = out / "students/kd-2/eval/metrics.json"
    before = json.loads(path.read_text())
    older = {k: v for k, v in before.items() if not k.startswith("warm_")}
    path.write_text(json.dumps(older))  # as `evaluate` wrote it before it measured warm latency
    capsys.readouterr()
    again = run_sweep(cfg)
    assert again["skipped"] == again["steps"] - 1 and "students/kd-2: warm latency  (sweep" in capsys.readouterr().out
    after = json.loads(path.read_text())
    assert {k: after[k] for k in older} == older  # nothing else measured again
    assert after["warm_cached"] == before["warm_cached"] and after["warm_latency_ms_p50"] > 0
    assert json.loads(path.with_name("warm.json").read_text())["warm_latency_ms_p50"] == after["warm_latency_ms_p50"]


def test_configs_of_the_real_runs_plan_the_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTIL_CODEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "fetch_teacher", fake_fetch([], layers=30))
    real = Sweep(build_config(SweepConfig, {"out": str(tmp_path / "real")}, yaml_path=ROOT / "configs" / "real.yaml"))
    models = real.models()
    names = [m.name for m in models]
    variants = "in-training ce-only high-temperature reverse-kl online cosine longer pick-influence pick-angular"
    assert names == ["teacher", "students/kd-6", "students/kd-10-at-14336", "students/kd-10-at-28672",
                     "students/kd-10", "students/kd-15", "students/kd-20",
                     *[f"students/10-{v}" for v in [*variants.split(), "random-init"]],
                     "students/kd-10-seed43", "students/10-in-training-seed43",
                     *[f"students/{k}-pick-influence" for k in (6, 15, 20)]]  # fmt: skip
    tokens = {m.name: m.tokens for m in models if m.tokens}
    assert tokens["students/kd-6"] == tokens["students/10-ce-only"] == 57_344
    assert tokens["students/10-longer"] == 114_688 and tokens["students/kd-10-at-14336"] == 14_336
    for m in models:  # every KD run's settings are a valid distil config
        if m.distil:
            assert build_config(DistilConfig, m.distil).max_steps == m.tokens // 1024
    plan = real.plan(models)
    assert [s.name for s in plan].count("students/kd-6: cache teacher") == 1
    assert sum(s.name.endswith("cache teacher") for s in plan) == 1 and len(plan) == len(set(s.marker for s in plan))
    demo = Sweep(
        build_config(SweepConfig, {"out": str(tmp_path / "demo")}, yaml_path=ROOT / "configs" / "demo-real.yaml")
    )
    (teacher, student) = demo.models()
    assert (teacher.name, student.name) == ("teacher", "students/kd-30-ffn384-heads6")
    steps = [s.name for s in student.steps]
    assert steps == ["init", "local stage", "distil"]
    assert demo.cfg.student_minutes == 60 and demo.cfg.local_share == 0.25 and demo.cfg.pick == "uniform"
    assert (demo.cfg.student_ffn, demo.cfg.student_heads, demo.cfg.student_hidden) == (384, 6, 0)
    d = build_config(DistilConfig, student.distil)
    assert (d.temperature, d.alpha_ce, d.alpha_clm, d.alpha_cos, d.divergence) == (1.0, 1.0, 0.0, 0.0, "forward")
    assert (d.lr, d.batch_size, d.seq_len, d.teacher_mode, d.teacher_cache) == (1e-3, 4, 256, "frozen", "")
    assert d.student.endswith("students/kd-30-ffn384-heads6-local")


def test_search_picks_lr_then_batch_then_window_and_the_study_uses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in SLICE[:4]:
        shutil.copy(STDLIB / name, src / name)
    monkeypatch.setenv("DISTIL_CODEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "fetch_teacher", fake_fetch([], layers=4))
    search = {"search_lr": [1e-4, 3e-2], "search_batch": [2], "search_seq_len": [16], "search_tokens": 256,
              "search_dev_tokens": 200}  # fmt: skip
    values = {**STUDY, "students": [2], "variants": [], "curve": [], "seeds": [], "teacher_cache": False, **search}
    cfg = build_config(SweepConfig, {**values, "out": str(tmp_path / "out"), "src": [str(src)]})
    run_sweep(cfg)
    out = tmp_path / "out"
    info = json.loads((out / "search" / "search.json").read_text())
    trials = {t["name"]: t for t in info["trials"]}
    lrs = ["lr0.0001-b4-s32", "lr0.03-b4-s32", "lr0.003-b4-s32"]  # the config's batch and window; its lr last
    assert list(trials)[:3] == lrs
    best = min(lrs, key=lambda n: trials[n]["dev_loss"])
    lr = trials[best]["lr"]
    assert list(trials)[3] == f"lr{lr:g}-b2-s32"
    best = min([f"lr{lr:g}-b2-s32", best], key=lambda n: trials[n]["dev_loss"])
    assert list(trials)[4:] == [f"lr{lr:g}-b{trials[best]['batch_size']}-s16"]
    win = min([list(trials)[4], best], key=lambda n: trials[n]["dev_loss"])
    assert info["chosen"]["name"] == win
    assert trials["lr0.0001-b4-s32"]["dev_loss"] != trials["lr0.03-b4-s32"]["dev_loss"]
    for name, t in trials.items():  # every trial saw the same KD tokens (whole steps), scored on the same windows
        assert t["kd_tokens"] == t["steps"] * t["batch_size"] * t["seq_len"] >= 256
        assert t["dev_tokens"] == 200 - 200 // 32 - 1  # 6 windows of 32 and one of 8, each predicting all but one
        assert (
            not list((out / "search" / name).glob("*.safetensors"))
            and not (out / "search" / name / "checkpoints").exists()
        )
    main = _config(out, "students/kd-2")
    chosen = info["chosen"]
    assert (main["lr"], main["batch_size"], main["seq_len"]) == (chosen["lr"], chosen["batch_size"], chosen["seq_len"])
    assert main["max_steps"] == -(-512 // (chosen["batch_size"] * chosen["seq_len"]))
    assert json.loads((out / "sweep.json").read_text())["search"]["chosen"]["name"] == win
    md = (out / "results.md").read_text()
    assert "## Learning rate, batch and window: the search" in md and f"| {win} |" in md and "| chosen |" in md
    timings = json.loads((out / "timings.json").read_text())
    assert f"search {win}: distil" in timings and f"search {win}: score" in timings
    capsys.readouterr()
    again = run_sweep(cfg)  # resumed: every trial and step is found done
    assert (
        again["skipped"] == again["steps"]
        and "[search 2/3] search lr0.0001-b4-s32: distil: done already" in capsys.readouterr().out
    )


def test_unknown_fetch_name_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="teacher_model: 'fetch:gpt5' names no known teacher; use one of smollm2"):
        Sweep(build_config(SweepConfig, {"out": str(tmp_path), "teacher_model": "fetch:gpt5"}))


def test_a_curve_point_past_the_run_is_refused(study) -> None:
    """Last: it removes a point of the module's sweep. The run is past 256 tokens, so that copy cannot be made again."""
    out, cfg, _ = study
    shutil.rmtree(out / "students" / "kd-2-at-256")
    with pytest.raises(ConfigError, match="curve: .*kd-2 has trained past 256 tokens"):
        run_sweep(cfg)


def test_warm_latency_classifies_the_vocabulary_once(study, monkeypatch: pytest.MonkeyPatch) -> None:
    from distil_codegpt.evaluate import completion
    from distil_codegpt.evaluate.perf import warm_latency

    out, _, _ = study
    teacher = out.parent / "cache" / "teachers" / "smollm2-fp32"
    model, tok = AutoModelForCausalLM.from_pretrained(teacher), load_tokenizer(teacher)
    inputs = [json.loads(x)["input"] for x in (out / "data/line_completion/test.json").read_text().splitlines()[:3]]
    calls, of = [], completion.StopIds.of.__func__
    monkeypatch.setattr(completion.StopIds, "of", classmethod(lambda cls, t: calls.append(1) or of(cls, t)))
    warm = warm_latency(model, tok, inputs, 3, max_new_tokens=4)
    assert len(calls) == 1 and warm["p50"] > 0  # not once per timed line: that pass alone takes 0.6 s at 49k ids
    lengths = [len(encode_inputs(tok, [x], families.context(model) - 4)[0]) for x in inputs]
    assert warm["cached"] == pytest.approx(sum((n - 1) / n for n in lengths) / 3)


def test_width_cut_students_with_a_local_stage_inside_a_minutes_budget(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in SLICE[:4]:
        shutil.copy(STDLIB / name, src / name)
    values = {**STUDY, "out": str(tmp_path / "out"), "src": [str(src)], "students": [2], "variants": [],
              "curve": [], "seeds": [], "depth_variants": [], "teacher_cache": False, "student_ffn": 64,
              "student_heads": 2, "student_minutes": 0.2, "local_share": 0.25}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTIL_CODEGPT_CACHE", str(tmp_path / "cache"))
        mp.setattr(gguf, "fetch_teacher", fake_fetch([], layers=4))
        run_sweep(build_config(SweepConfig, values))
    out = tmp_path / "out" / "students"
    init = json.loads((out / "init-2-ffn64-heads2" / "config.json").read_text())
    assert (init["intermediate_size"], init["num_attention_heads"], init["num_key_value_heads"]) == (64, 2, 1)
    scoring = json.loads((out / "init-2-ffn64-heads2" / "run.json").read_text())["seconds"] / 60
    local = json.loads((out / "kd-2-ffn64-heads2-local" / "run.json").read_text())
    assert local["config"]["stage"] == "local" and local["config"]["student"] == str(out / "init-2-ffn64-heads2")
    assert local["config"]["max_minutes"] == pytest.approx(0.25 * (0.2 - scoring), rel=1e-3)
    kd = json.loads((out / "kd-2-ffn64-heads2" / "run.json").read_text())
    assert kd["config"]["stage"] == "global" and kd["config"]["student"] == str(out / "kd-2-ffn64-heads2-local")
    spent = local["metrics"]["train_seconds"] / 60
    assert kd["config"]["max_minutes"] == pytest.approx(0.2 - scoring - spent, rel=1e-3)
    assert kd["metrics"]["stop_reason"] == "max_minutes"
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [r["label"] for r in rows if r["label"].startswith("2 layers")] == ["2 layers, ffn 64, heads 2"]
    trained = local["metrics"]["tokens"] + kd["metrics"]["tokens"]  # what ran in the minutes, not the token budget
    assert [int(r["tokens"]) for r in rows if r["label"].startswith("2 layers")] == [trained]
