"""Students cut in width (model/shape.py): units that contribute nothing are the ones dropped and the logits stay
as they were, the counts equal a hand count, and the cut model loads in plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distil_codegpt.config import ConfigError, StudentConfig
from distil_codegpt.model import families, shape
from distil_codegpt.model.presets import TINY_GQA, preset_config
from distil_codegpt.model.student import build_student

LLAMA_LIKE = ["tiny-llama", "tiny-qwen2", "tiny-mistral"]
VOCAB = 1200  # the tiny_data tokenizer's


def make_teacher(path: Path, preset: str, tok_dir: Path, layers: int = 2) -> AutoModelForCausalLM:
    torch.manual_seed(0)
    if preset == "tiny-mistral":
        config = families.model_config("mistral", VOCAB, dict(TINY_GQA))
    else:
        config = preset_config(preset, VOCAB, layers=layers)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF's tiny init leaves every block near the identity: spread the weights
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def save(model: AutoModelForCausalLM, path: Path, tok_dir: Path) -> Path:
    model.save_pretrained(path)
    for f in tok_dir.iterdir():
        if f.is_file():
            (path / f.name).write_bytes(f.read_bytes())
    return path


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # plain transformers, no code of ours
    with torch.no_grad():
        return model(input_ids=ids).logits


def cut(teacher: Path, out: Path, data: Path, **kw) -> dict:
    cfg = StudentConfig(teacher=str(teacher), out=str(out), data=str(data), layers=2, pick_windows=4, **kw)
    return build_student(cfg)


IDS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("preset", [*LLAMA_LIKE, "tiny", "tiny-neox"])
def test_ffn_cut_drops_the_silent_neurons_and_keeps_the_logits(preset, tiny_data, tmp_path):
    model = make_teacher(tmp_path, preset, tiny_data["tok"])
    fam, n = families.family(model), families.ffn_width(model)
    silent = list(range(0, n, 4))  # a quarter of the neurons write nothing to the residual stream
    with torch.no_grad():
        for block in families.blocks(model):
            down = block.get_submodule(fam.mlp[-1]).weight  # (e, ffn) or Conv1D (ffn, e)
            if fam.conv1d:
                down[silent] = 0
            else:
                down[:, silent] = 0
    teacher = save(model, tmp_path / "t", tiny_data["tok"])
    summary = cut(teacher, tmp_path / "s", tiny_data["data"], ffn=n - len(silent))
    kept = [i for i in range(n) if i not in silent]
    assert summary["kept"]["ffn"] == [kept, kept]
    assert summary["kept_importance_share"]["ffn"] == [1.0, 1.0]
    assert families.ffn_width(AutoModelForCausalLM.from_pretrained(tmp_path / "s")) == n - len(silent)
    torch.testing.assert_close(logits(tmp_path / "s", IDS), logits(teacher, IDS), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", LLAMA_LIKE)
def test_head_cut_drops_a_silent_kv_group_and_keeps_the_logits(preset, tiny_data, tmp_path):
    model = make_teacher(tmp_path, preset, tiny_data["tok"])
    fam, hd = families.family(model), families.head_dim(model)
    with torch.no_grad():  # KV group 0 (query heads 0 and 1) writes nothing through the output projection
        for block in families.blocks(model):
            block.get_submodule(fam.attn_out).weight[:, : 2 * hd] = 0
    teacher = save(model, tmp_path / "t", tiny_data["tok"])
    summary = cut(teacher, tmp_path / "s", tiny_data["data"], heads=2)
    assert summary["kept"]["units"] == [[1], [1]]
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    torch.testing.assert_close(logits(tmp_path / "s", IDS), logits(teacher, IDS), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", LLAMA_LIKE)
def test_hidden_cut_drops_silent_channels_and_keeps_the_logits(preset, tiny_data, tmp_path):
    model = make_teacher(tmp_path, preset, tiny_data["tok"])
    fam = families.family(model)
    silent = [3, 10, 17, 30, 41, 50, 60, 63]  # channels nothing ever writes: embedding, attention and MLP outputs
    with torch.no_grad():
        model.get_input_embeddings().weight[:, silent] = 0
        for block in families.blocks(model):
            for name in (fam.attn_out, fam.mlp[-1]):
                block.get_submodule(name).weight[silent] = 0
    teacher = save(model, tmp_path / "t", tiny_data["tok"])
    summary = cut(teacher, tmp_path / "s", tiny_data["data"], hidden=56)
    assert summary["kept"]["hidden"] == [c for c in range(64) if c not in silent]
    # every norm sees zeros in the cut channels: its weight grows by sqrt(64 / 56) to keep the root mean square
    scales = summary["norm_scale"]
    assert len(scales) == 5 and all(v == pytest.approx((64 / 56) ** 0.5, rel=1e-5) for v in scales.values())
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (config["hidden_size"], config["head_dim"]) == (56, 16)
    # equal up to the norms' epsilon, which the rescale cannot carry over exactly
    torch.testing.assert_close(logits(tmp_path / "s", IDS), logits(teacher, IDS), atol=2e-4, rtol=1e-4)


def test_counts_and_compute_share_equal_a_hand_count(tiny_data, tmp_path):
    teacher = save(make_teacher(tmp_path, "tiny-llama", tiny_data["tok"]), tmp_path / "t", tiny_data["tok"])
    summary = cut(teacher, tmp_path / "s", tiny_data["data"], ffn=64, heads=2, hidden=48)
    e, q, kv, hd, f, v = 48, 2, 1, 16, 64, VOCAB
    block_params = e * q * hd + 2 * e * kv * hd + q * hd * e + 3 * e * f + 2 * e  # q k v o, gate up down, 2 norms
    assert summary["params"] == 2 * block_params + v * e + e  # tied head: one embedding, the final norm
    macs = 2 * (e * (q + 2 * kv) * hd + q * hd * e + 3 * e * f) + e * v
    teacher_macs = 2 * (64 * 8 * 16 + 64 * 64 + 3 * 64 * 128) + 64 * v
    assert summary["macs_per_token"] == macs
    assert summary["compute_share"] == pytest.approx(macs / teacher_macs)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert shape.macs_per_token(student.config) == macs
    assert sum(p.numel() for p in student.parameters()) == summary["params"]


def test_depth_and_width_cuts_combine(tiny_data, tmp_path):
    model = make_teacher(tmp_path, "tiny-llama", tiny_data["tok"], layers=4)
    teacher = save(model, tmp_path / "t", tiny_data["tok"])
    cfg = StudentConfig(
        teacher=str(teacher), out=str(tmp_path / "s"), data=str(tiny_data["data"]), layers=2, pick="1,3", ffn=32
    )
    summary = build_student(cfg)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    down = families.family(model).mlp[-1]
    for i, t in enumerate([1, 3]):  # student block i holds teacher block t's kept neurons, in order
        kept = summary["kept"]["ffn"][i]
        expect = families.blocks(model)[t].get_submodule(down).weight[:, kept]
        assert torch.equal(families.blocks(student)[i].get_submodule(down).weight, expect)


@pytest.mark.parametrize(
    ("preset", "flags", "match"),
    [
        ("tiny", {"heads": 1}, r"^heads: a gpt2 model derives its head size"),
        ("tiny-neox", {"hidden": 32}, r"^hidden: a gpt_neox model derives its head size"),
        ("tiny-llama", {"heads": 3}, r"^heads: 3 is not allowed; 2 query heads share each KV head"),
        ("tiny-llama", {"ffn": 500}, r"^ffn: 500 is not allowed; the teacher has 128"),
    ],
)
def test_cuts_a_family_cannot_take_fail_with_one_line(preset, flags, match, tiny_data, tmp_path):
    teacher = save(make_teacher(tmp_path, preset, tiny_data["tok"]), tmp_path / "t", tiny_data["tok"])
    with pytest.raises(ConfigError, match=match):
        cut(teacher, tmp_path / "s", tiny_data["data"], **flags)
    assert not (tmp_path / "s").exists()


def test_width_cut_needs_calibration_data(tiny_data, tmp_path):
    teacher = save(make_teacher(tmp_path, "tiny-llama", tiny_data["tok"]), tmp_path / "t", tiny_data["tok"])
    with pytest.raises(ConfigError, match=r"^data: width importance .* pass --data DIR"):
        build_student(StudentConfig(teacher=str(teacher), out=str(tmp_path / "s"), layers=2, ffn=64))
