"""Compression: exact Conv1D conversion, int8 fidelity and artifacts, magnitude and head pruning, healing, fp16."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from distil_codegpt.compress.prune import (
    HEADS_KEY,
    apply_pruned_heads,
    block_matrices,
    choose_heads,
    dev_batches,
    head_importance,
    magnitude_prune,
    mask_heads,
)
from distil_codegpt.compress.quantize import (
    QuantizedTorchEngine,
    conv1d_to_linear,
    count_all_params,
    is_int8_linear,
    load_for_evaluation,
    quantize_int8,
)
from distil_codegpt.compress.run import run_compress
from distil_codegpt.config import CompressConfig, ConfigError, TrainConfig, UserError, build_config
from distil_codegpt.distill.run import run_train
from distil_codegpt.model.presets import count_params, preset_config
from distil_codegpt.serve.engine import load_engine

LOOP = {"seq_len": 64, "batch_size": 8, "eval_batches": 2, "eval_every": 0, "warmup_steps": 2, "tensorboard": False}


@pytest.fixture(scope="module")
def trained(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model (2 layers x 2 heads, width 64) trained for 40 steps, saved with its tokenizer."""
    out = tmp_path_factory.mktemp("compress") / "model"
    cfg = {**LOOP, "data": str(tiny_data["data"]), "tokenizer": str(tiny_data["tok"]), "out": str(out)}
    run_train(build_config(TrainConfig, {**cfg, "max_steps": 40, "lr": 3e-3}))
    return out


def compress(tmp_path: Path, model: Path, name: str = "out", **kw: object) -> dict:
    return run_compress(build_config(CompressConfig, {"model": str(model), "out": str(tmp_path / name), **kw}))


def random_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(preset_config("tiny", 300)).eval()


def ids(n: int = 24, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_conv1d_to_linear_gives_identical_outputs() -> None:
    model = random_model()
    ref = copy.deepcopy(model)
    assert conv1d_to_linear(model) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 layers
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    torch.testing.assert_close(model(ids()).logits, ref(ids()).logits, atol=1e-6, rtol=0)


@torch.no_grad()
def test_int8_logits_close_to_fp32_and_every_linear_quantized(trained: Path) -> None:
    fp32 = AutoModelForCausalLM.from_pretrained(trained).eval()
    q = quantize_int8(copy.deepcopy(fp32))
    assert is_int8_linear(q.lm_head)
    assert not any(type(m) in (nn.Linear, Conv1D) for m in q.modules())  # every linear layer is int8
    assert q.transformer.wte.weight.dtype == torch.float32 and not q.config.tie_word_embeddings
    assert count_all_params(q) == count_params(fp32)
    x = ids(64, fp32.config.vocab_size)
    a, b = fp32(x).logits, q(x).logits  # (B, T, V)
    assert torch.cosine_similarity(a, b, dim=-1).min() > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_int8_artifact_loads_generates_and_is_smaller(trained: Path, tmp_path: Path) -> None:
    summary = compress(tmp_path, trained, quantize="int8")
    out = tmp_path / "out"
    assert json.loads((out / "engine.json").read_text())["engine"] == "torch-int8"
    assert summary["disk_mb_after"] < 0.75 * summary["disk_mb_before"]
    engine = load_engine(out)
    assert isinstance(engine, QuantizedTorchEngine) and is_int8_linear(engine.model.lm_head)
    prompt = engine.tokenizer("<s> import os <EOL> def").input_ids
    new = engine.generate(prompt, 8, set())
    model, tok = load_for_evaluation(str(out))
    x = torch.tensor([prompt])
    hf = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False)
    assert len(new) == 8 and hf[0, len(prompt) :].tolist() == new  # KV-cache stream == HF generate
    assert json.loads((out / "run.json").read_text())["metrics"]["library"].startswith("torch.ao")
    with pytest.raises(UserError, match="--device cpu"):
        QuantizedTorchEngine.load(out, "cuda")


def test_compress_refuses_a_non_empty_out(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        compress(tmp_path, trained, quantize="int8")


def test_magnitude_pruning_zeroes_exactly_the_smallest_fraction() -> None:
    model = random_model()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.fill_(0.01)  # 16k equal magnitudes: the threshold falls in a tie
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mats = block_matrices(model)
    n = sum(w.numel() for w in mats.values())
    magnitude_prune(model, 0.3)
    assert sum(int((w == 0).sum()) for w in mats.values()) == round(0.3 * n)
    pruned = torch.cat([before[k][w == 0].abs() for k, w in mats.items()])
    kept = torch.cat([before[k][w != 0].abs() for k, w in mats.items()])
    assert pruned.max() <= kept.min()
    for k, v in model.state_dict().items():  # embeddings, layer norms, biases and the (tied) head untouched
        if k not in mats:
            assert torch.equal(v, before[k]), k


def test_fp16_save_with_magnitude_pruning(trained: Path, tmp_path: Path) -> None:
    summary = compress(tmp_path, trained, dtype="fp16", prune="magnitude:0.5")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-5)
    assert summary["disk_mb_after"] < 0.6 * summary["disk_mb_before"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    mats = block_matrices(reloaded).values()
    assert sum(int((w == 0).sum()) for w in mats) >= 0.5 * sum(w.numel() for w in mats)


def test_choose_heads_takes_the_least_important_and_never_a_whole_layer() -> None:
    scores = torch.tensor([[0.1, 0.2, 5.0], [0.05, 3.0, 4.0]])
    assert choose_heads(scores, 3) == {0: [0, 1], 1: [0]}
    assert choose_heads(torch.tensor([[0.1, 0.2], [5.0, 6.0]]), 2) == {0: [0], 1: [0]}
    with pytest.raises(ConfigError, match="heads:2 at most"):
        choose_heads(torch.rand(2, 2), 3)


@torch.no_grad()
def test_head_pruning_removes_exactly_the_chosen_heads(trained: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    ref = copy.deepcopy(model)
    mask_heads(model, {0: [1]})
    assert model.config.to_dict()[HEADS_KEY] == {"0": [1]}
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # no code of ours
    sliced = apply_pruned_heads(copy.deepcopy(model))
    attn0, attn1 = sliced.transformer.h[0].attn, sliced.transformer.h[1].attn
    assert attn0.c_attn.weight.shape == (64, 3 * 32) and attn0.c_proj.weight.shape == (32, 64)
    assert attn1.c_attn.weight.shape == (64, 192) and attn1.c_proj.weight.shape == (64, 64)
    keep = torch.cat([torch.arange(32) + s * 64 for s in range(3)])  # head 0's q, k, v columns
    assert torch.equal(attn0.c_attn.weight, ref.transformer.h[0].attn.c_attn.weight[:, keep])
    assert torch.equal(attn0.c_proj.weight, ref.transformer.h[0].attn.c_proj.weight[:32])
    x = ids(32, model.config.vocab_size)
    torch.testing.assert_close(reloaded(x).logits, sliced(x).logits, atol=1e-5, rtol=0)
    assert (reloaded(x).logits - ref(x).logits).abs().max() > 1e-3  # the head really is gone
    with pytest.raises(ConfigError, match="keep at least one"):
        mask_heads(model, {0: [0]})  # head 1 is already gone: layer 0 would be empty


@torch.no_grad()
def test_head_importance_of_a_removed_head_is_zero(trained: Path, tiny_data: dict) -> None:
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    mask_heads(model, {1: [0]})
    for batches in (dev_batches(str(tiny_data["data"]), trained, 32, n=2, batch=2), None):
        scores = head_importance(model, batches)
        assert scores.shape == (2, 2) and scores[1, 0] == 0 and (scores[[0, 0, 1], [0, 1, 1]] > 0).all()


def test_heads_then_int8_artifact(trained: Path, tiny_data: dict, tmp_path: Path) -> None:
    summary = compress(tmp_path, trained, prune="heads:2", data=str(tiny_data["data"]), quantize="int8")
    assert sorted(len(v) for v in summary["pruned_heads"].values()) == [1, 1]  # one per layer: never a whole layer
    assert summary["params_after"] == summary["params_before"] - 2 * (4 * 64 * 32 + 3 * 32)
    engine = load_engine(tmp_path / "out")
    assert engine.model.transformer.h[0].attn.c_attn.weight().shape == (96, 64)  # int8 Linear: (out, in)
    assert len(engine.generate(engine.tokenizer("<s> x =").input_ids, 8, set())) == 8


def test_healing_keeps_pruned_weights_at_zero(trained: Path, tiny_data: dict, tmp_path: Path) -> None:
    kw = {"prune": "magnitude:0.3", "data": str(tiny_data["data"])}
    summary = compress(tmp_path, trained, "healed", heal_steps=3, **kw)
    plain = AutoModelForCausalLM.from_pretrained(compress(tmp_path, trained, "plain", **kw)["out"])
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed")
    assert summary["prune"]["heal"]["steps"] == 3
    mats = block_matrices(healed)
    assert sum(int((w == 0).sum()) for w in mats.values()) == round(0.3 * sum(w.numel() for w in mats.values()))
    for (name, w), v in zip(mats.items(), block_matrices(plain).values()):
        assert torch.equal(w == 0, v == 0), name  # the same weights are zero after healing
    assert not torch.equal(healed.transformer.h[0].mlp.c_fc.weight, plain.transformer.h[0].mlp.c_fc.weight)
    assert (tmp_path / "healed" / "heal_metrics.jsonl").is_file()
