"""bf16 autocast on the CPU: what `--precision auto` picks, and that distil, cache-teacher and evaluate run under it
with numbers close to fp32 (tiny Llama-family models). Also int8 at real width for the Llama family."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distil_codegpt import runtime
from distil_codegpt.compress.quantize import is_int8_linear, load_int8, quantize_int8, save_int8
from distil_codegpt.config import (
    CacheTeacherConfig,
    ConfigError,
    DistilConfig,
    EvaluateConfig,
    build_config,
)
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill.run import run_distil
from distil_codegpt.distill.teacher_cache import TeacherCache, build_cache
from distil_codegpt.evaluate.completion import complete
from distil_codegpt.evaluate.run import run_evaluate
from distil_codegpt.model.presets import preset_config

CPU = torch.device("cpu")


def save_llama(tok_dir: Path, out: Path, layers: int, seed: int) -> Path:
    tok = load_tokenizer(tok_dir)
    cfg = preset_config("tiny-llama", len(tok), layers=layers, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("precision")
    return save_llama(tiny_data["tok"], root / "teacher", 2, 0), save_llama(tiny_data["tok"], root / "student", 1, 1)


@pytest.fixture
def bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")


def test_auto_follows_the_cpu_capability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n")
    assert {"avx512_bf16", "avx512_vnni"} <= runtime.cpu_flags(info)
    assert runtime.cpu_flags(tmp_path / "missing") == set()
    for flags, expected in ((set(), None), ({"avx2", "avx512_vnni"}, None), ({"amx_bf16"}, torch.bfloat16)):
        monkeypatch.delenv(runtime.CPU_BF16_ENV, raising=False)
        monkeypatch.setattr(runtime, "cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        runtime.cpu_has_bf16.cache_clear()
        assert runtime.autocast_dtype("auto", CPU) is expected
        monkeypatch.setenv(runtime.CPU_BF16_ENV, "0")  # the override wins both ways
        assert runtime.autocast_dtype("auto", CPU) is None
        monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
        assert runtime.autocast_dtype("auto", CPU) is torch.bfloat16
    runtime.cpu_has_bf16.cache_clear()
    assert runtime.autocast_dtype("fp32", CPU) is None and runtime.autocast_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ConfigError, match="precision: 'fp16' needs CUDA; use fp32 or bf16"):
        runtime.autocast_dtype("fp16", CPU)


def distil(tiny_data: dict, pair: tuple[Path, Path], out: Path, **kw) -> dict:
    values = {"data": str(tiny_data["data"]), "teacher": str(pair[0]), "student": str(pair[1]), "out": str(out)}
    values |= {"seq_len": 32, "batch_size": 4, "max_steps": 2, "warmup_steps": 1, "eval_every": 0, "eval_batches": 2}
    run_distil(build_config(DistilConfig, {**values, "save_every": 0, "tensorboard": False, **kw}))
    return json.loads((out / "run.json").read_text())["metrics"]


def test_bf16_distil_step_on_cpu_tracks_fp32(tiny_data: dict, pair, tmp_path: Path, monkeypatch) -> None:
    fp32 = distil(tiny_data, pair, tmp_path / "fp32")  # auto, pinned to fp32 by conftest
    monkeypatch.setenv(runtime.CPU_BF16_ENV, "1")
    bf16 = distil(tiny_data, pair, tmp_path / "bf16")  # auto on a bf16 CPU
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    for key in ("start_dev_loss", "train_loss", "dev_loss"):
        assert bf16[key] == pytest.approx(fp32[key], rel=0.02), key
    assert bf16["train_loss"] != fp32["train_loss"]  # bf16 matmuls really ran


def test_bf16_teacher_cache_tracks_fp32(tiny_data: dict, pair, tmp_path: Path, bf16_cpu: None) -> None:
    values = {"teacher": str(pair[0]), "data": str(tiny_data["data"]), "seq_len": 32, "max_windows": 4, "top_k": 4}
    caches = {}
    for precision in ("fp32", "auto"):
        out = tmp_path / precision
        summary = build_cache(build_config(CacheTeacherConfig, {**values, "out": str(out), "precision": precision}))
        assert summary["precision"] == {"fp32": "fp32", "auto": "bf16"}[precision]
        caches[precision] = TeacherCache(out)
    la, lb = (torch.from_numpy(c._logp[:, :, 0].astype("float32")) for c in caches.values())  # each top log-prob
    assert torch.allclose(la, lb, atol=0.05) and not torch.equal(la, lb)


def test_evaluate_under_bf16_on_cpu(tiny_data: dict, pair, tmp_path: Path, bf16_cpu: None) -> None:
    test = tiny_data["data"] / "line_completion" / "test.json"
    values = {"model": str(pair[0]), "test": str(test), "limit": 6, "latency_samples": 1, "max_new_tokens": 8}
    metrics = run_evaluate(build_config(EvaluateConfig, {**values, "out": str(tmp_path / "e"), "device": "cpu"}))
    assert metrics["precision"] == "bf16" and metrics["n"] == 6
    assert len((tmp_path / "e" / "predictions.txt").read_text().splitlines()) == 6
    # the decoding itself runs in bf16: the head's output dtype under the evaluate path
    model, tok, seen = AutoModelForCausalLM.from_pretrained(pair[0]), load_tokenizer(pair[0]), []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    inputs = [json.loads(x)["input"] for x in test.read_text().splitlines()[:3]]
    bf16 = complete(model, tok, inputs, max_new_tokens=4, autocast_dtype=torch.bfloat16, progress=False)
    assert seen and set(seen) == {torch.bfloat16} and len(bf16) == 3
    seen.clear()
    complete(model, tok, inputs, max_new_tokens=4, progress=False)
    assert set(seen) == {torch.float32}


def test_int8_artifact_evaluates_in_fp32_under_auto(tiny_data: dict, pair, tmp_path: Path, bf16_cpu: None) -> None:
    q = quantize_int8(AutoModelForCausalLM.from_pretrained(pair[0]))
    save_int8(q, tmp_path / "int8")
    load_tokenizer(pair[0]).save_pretrained(tmp_path / "int8")
    test = tiny_data["data"] / "line_completion" / "test.json"
    values = {"model": str(tmp_path / "int8"), "test": str(test), "limit": 2, "latency_samples": 0, "max_new_tokens": 8}
    metrics = run_evaluate(build_config(EvaluateConfig, {**values, "out": str(tmp_path / "e"), "device": "cpu"}))
    assert metrics["precision"] == "fp32" and metrics["n"] == 2
    with pytest.raises(ConfigError, match="int8 artifact runs on the CPU in fp32"):
        run_evaluate(build_config(EvaluateConfig, {**values, "out": str(tmp_path / "f"), "precision": "bf16"}))


def test_int8_llama_at_real_width_head_quantized_close_and_smaller(tmp_path: Path) -> None:
    """SmolLM2-135M's width, heads and vocabulary (49,152, tied head), 1 block: the shape the head matters at."""
    torch.manual_seed(0)
    fp32 = AutoModelForCausalLM.from_config(preset_config("smollm2-135m", 49152, layers=1)).eval()
    q = quantize_int8(copy.deepcopy(fp32))
    assert is_int8_linear(q.lm_head) and q.lm_head.weight().shape == (49152, 576)
    assert all(is_int8_linear(getattr(q.model.layers[0].self_attn, n)) for n in ("q_proj", "k_proj", "v_proj"))
    x = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        ref, got = fp32(x).logits, q(x).logits
    # random weights leave near-ties among 49k logits, so compare the vectors, not their argmax
    assert torch.cosine_similarity(got, ref, dim=-1).min() > 0.99 and (got - ref).norm() < 0.1 * ref.norm()
    save_int8(q, tmp_path / "int8")
    fp32.save_pretrained(tmp_path / "fp32")
    size = {d: sum(f.stat().st_size for f in (tmp_path / d).iterdir()) for d in ("fp32", "int8")}
    assert size["int8"] < 0.3 * size["fp32"]  # one int8 matrix for embedding and head, int8 blocks
    with torch.no_grad():
        assert torch.equal(load_int8(tmp_path / "int8")(x).logits, got)
