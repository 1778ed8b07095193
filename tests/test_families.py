"""Every supported family behind model/families.py: students copy the picked blocks exactly, the data-driven picks
equal a hand computation, and an unsupported family stops with one line naming the supported ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from distil_codegpt.config import ConfigError, StudentConfig
from distil_codegpt.model import families, layer_scores
from distil_codegpt.model.presets import load_model, preset_config
from distil_codegpt.model.student import build_student

FAMILY_PRESETS = ["tiny", "tiny-llama", "tiny-qwen2", "tiny-neox"]


def save_family(path: Path, preset: str, layers: int, tok_dir: Path | None = None, vocab: int = 300) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(preset, vocab, layers=layers))
    with torch.no_grad():  # HF's tiny init (std 0.02) makes every block nearly the identity: spread the weights
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    if tok_dir is not None:
        for f in tok_dir.iterdir():
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_student_copies_the_picked_blocks_of_every_family(preset, tmp_path):
    teacher_dir = save_family(tmp_path / "t", preset, 6)
    summary = build_student(StudentConfig(teacher=str(teacher_dir), out=str(tmp_path / "s"), layers=3, pick="0,2,5"))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")  # no code of ours
    assert type(student) is type(teacher) and families.depth(student) == 3
    assert summary["family"] == families.family(teacher).name and summary["layer_map"] == [0, 2, 5]
    t_state, prefix = teacher.state_dict(), families.block_prefix(teacher)
    for key, value in student.state_dict().items():
        if key.startswith(prefix):
            i, rest = key[len(prefix) :].split(".", 1)
            key = f"{prefix}{[0, 2, 5][int(i)]}.{rest}"
        assert torch.equal(value, t_state[key]), key
    assert families.tied_head(student) == families.tied_head(teacher)


def test_llama_student_keeps_grouped_kv_heads(tmp_path):
    teacher = save_family(tmp_path / "t", "tiny-llama", 4)
    build_student(StudentConfig(teacher=str(teacher), out=str(tmp_path / "s"), layers=2))
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (4, 2, 2)


def test_qwen2_student_keeps_the_picked_layer_types(tmp_path):
    config = preset_config("tiny-qwen2", 300, layers=4)
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    sub = families.with_depth(config, [1, 2])
    assert sub.layer_types == ["sliding_attention", "full_attention"] and sub.num_hidden_layers == 2


def test_unsupported_family_names_the_supported_ones(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"model_type 'bert' is not supported; supported families: gpt2, llama") as e:
        load_model(str(tmp_path / "bert"), role="teacher")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- data-driven picks


def _hand_residuals(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """x^0 .. x^N with the final norm replaced by the identity, so output_hidden_states ends at x^N itself."""
    norm_owner = model.get_submodule(families.family(model).blocks.rpartition(".")[0])
    name = next(n for n in ("norm", "ln_f", "final_layer_norm") if hasattr(norm_owner, n))
    saved = getattr(norm_owner, name)
    setattr(norm_owner, name, nn.Identity())
    try:
        with torch.no_grad():
            hs = model(input_ids=x, output_hidden_states=True).hidden_states
    finally:
        setattr(norm_owner, name, saved)
    return [h.reshape(-1, h.size(-1)).double() for h in hs]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny"])
def test_influence_and_angular_scores_equal_a_hand_computation(preset, tmp_path):
    model = load_model(str(save_family(tmp_path / "t", preset, 6))).eval()
    batches = [torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    hs = [_hand_residuals(model, x) for x in batches]
    n = 6
    bi = [1 - torch.cat([_cos(h[i], h[i + 1]) for h in hs]).mean().item() for i in range(n)]
    keep, scores = layer_scores.influence_pick(model, batches, 3)
    assert scores == pytest.approx(bi, abs=1e-5)
    assert keep == sorted(sorted(range(n), key=lambda i: -bi[i])[:3])
    drop = 2
    dist = [
        torch.cat([torch.arccos(_cos(h[lo], h[lo + drop]).clamp(-1, 1)) / math.pi for h in hs]).mean().item()
        for lo in range(n - drop)
    ]  # starts 0..3: the run never takes block 5
    keep, scores = layer_scores.angular_pick(model, batches, n - drop)
    assert scores == pytest.approx(dist, abs=1e-5)
    lo = min(range(len(dist)), key=dist.__getitem__)
    assert keep == [i for i in range(n) if not lo <= i < lo + drop] and 5 in keep


def test_angular_spares_the_last_block_and_influence_keeps_the_top(monkeypatch):
    model = AutoModelForCausalLM.from_config(preset_config("tiny-llama", 300, layers=6))
    # adjacent cosines -> BI = 0.9, 0.1, 0.5, 0.2, 0.3, 0.8; gap-2 distances lowest at start 4 (blocks 4, 5),
    # which would drop the last block, so the allowed minimum is start 1
    fake = {
        "adjacent": 1 - torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.8], dtype=torch.float64),
        "gap": torch.tensor([0.5, 0.2, 0.4, 0.3, 0.01], dtype=torch.float64),
    }
    monkeypatch.setattr(layer_scores, "residual_cosines", lambda m, b, n: fake)
    assert layer_scores.influence_pick(model, [], 3)[0] == [0, 2, 5]
    assert layer_scores.angular_pick(model, [], 4)[0] == [0, 3, 4, 5]


@pytest.mark.parametrize("pick", ["influence", "angular"])
def test_student_records_the_data_pick(pick, tiny_data, tmp_path):
    teacher = save_family(tmp_path / "t", "tiny-llama", 6, tiny_data["tok"], vocab=1200)
    cfg = StudentConfig(
        teacher=str(teacher),
        out=str(tmp_path / "s"),
        layers=3,
        pick=pick,
        data=str(tiny_data["data"]),
        pick_windows=4,
        pick_seq_len=32,
    )
    summary = build_student(cfg)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["distil_pick"] == pick and config["distil_layer_map"] == summary["layer_map"]
    assert len(summary["layer_map"]) == 3 and config["distil_pick_scores"] == summary["pick_scores"]
    assert len(summary["pick_scores"]) == (6 if pick == "influence" else 6 - 3)


def test_data_pick_without_data_says_so(tmp_path):
    teacher = save_family(tmp_path / "t", "tiny-llama", 4)
    with pytest.raises(ConfigError, match=r"^data: --pick influence is measured on code; pass --data DIR"):
        build_student(StudentConfig(teacher=str(teacher), out=str(tmp_path / "s"), layers=2, pick="influence"))
