"""Compression: exact Conv1D conversion, int8 fidelity and artifacts, magnitude and head pruning, healing, fp16.

The GPT-2 tests run on a trained tiny model; the family tests on random tiny models of every family (gpt2, llama and
qwen2 with 2 KV heads per 4 query heads, gpt_neox with an untied head).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from distil_codegpt.compress.prune import (
    block_matrices,
    choose_heads,
    dev_batches,
    head_importance,
    magnitude_prune,
    mask_heads,
)
from distil_codegpt.compress.quantize import (
    conv1d_to_linear,
    count_all_params,
    is_int8_linear,
    load_int8,
    quantize_int8,
    save_int8,
)
from distil_codegpt.compress.run import run_compress
from distil_codegpt.config import (
    CompleteConfig,
    CompressConfig,
    ConfigError,
    ServeConfig,
    TrainConfig,
    UserError,
    build_config,
)
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill.run import run_train
from distil_codegpt.engines.base import QuantizedTorchEngine, TorchEngine
from distil_codegpt.engines.load import load_engine, load_for_evaluation
from distil_codegpt.model import families
from distil_codegpt.model.families import count_params
from distil_codegpt.model.presets import preset_config
from distil_codegpt.model.shape import HEADS_KEY, apply_pruned_heads, unit_name

FAMILIES = ["tiny", "tiny-llama", "tiny-qwen2", "tiny-neox"]
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


def family_model(preset: str, init: float = 0.02, vocab: int = 300) -> nn.Module:
    """A random tiny model of a preset's family; init 0.2 makes every head matter (0.02: near-uniform logits)."""
    torch.manual_seed(0)
    config = preset_config(preset, vocab)
    config.initializer_range = init
    return AutoModelForCausalLM.from_config(config).eval()


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


@torch.no_grad()
def test_quantize_auto_runs_a_student_as_its_int8_artifact_and_other_models_as_they_are(
    trained: Path, tmp_path: Path
) -> None:
    compress(tmp_path, trained, quantize="int8")
    artifact = load_engine(tmp_path / "out")
    student = tmp_path / "student"
    shutil.copytree(trained, student)
    info = json.loads((student / "run.json").read_text())
    (student / "run.json").write_text(json.dumps({**info, "stage": "distil"}))
    auto = load_engine(student, cache_slots=2, quantize="auto")
    assert type(auto) is QuantizedTorchEngine and auto.cache_slots == 2 and is_int8_linear(auto.model.lm_head)
    x = ids(32, auto.model.config.vocab_size)
    assert torch.equal(auto.model(x).logits, artifact.model(x).logits)  # in memory == `compress --quantize int8`
    prompt = auto.tokenizer("<s> import os <EOL> def").input_ids
    assert auto.generate(prompt, 8, set()) == artifact.generate(prompt, 8, set())
    assert type(load_engine(student, quantize="none")) is TorchEngine
    assert type(load_engine(trained, quantize="auto")) is TorchEngine  # a trained teacher (stage "train") stays fp32
    assert type(load_engine(trained, quantize="int8")) is QuantizedTorchEngine
    assert type(load_engine(tmp_path / "out", quantize="auto")) is QuantizedTorchEngine  # an artifact as it is
    with pytest.raises(UserError, match="int8 runs on CPU only"):
        load_engine(student, "cuda", quantize="int8")
    assert (
        build_config(ServeConfig, {"model": "m"}).quantize,
        build_config(CompleteConfig, {"model": "m"}).quantize,
    ) == ("auto", "none")  # serve amortises the quantization over its requests; one completion does not


def test_compress_refuses_a_non_empty_out(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        compress(tmp_path, trained, quantize="int8")


@pytest.mark.parametrize("preset", FAMILIES)
def test_magnitude_pruning_zeroes_exactly_the_smallest_fraction(preset: str) -> None:
    model = family_model(preset)
    mats = block_matrices(model)
    assert len(mats) == 2 * len(families.family(model).matrices())  # every matrix of both blocks
    with torch.no_grad():
        list(mats.values())[-3].fill_(0.01)  # thousands of equal magnitudes: the threshold falls in a tie
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = sum(w.numel() for w in mats.values())
    magnitude_prune(model, 0.3)
    assert sum(int((w == 0).sum()) for w in mats.values()) == round(0.3 * n)
    pruned = torch.cat([before[k][w == 0].abs() for k, w in mats.items()])
    kept = torch.cat([before[k][w != 0].abs() for k, w in mats.items()])
    assert pruned.max() <= kept.min()
    for k, v in model.state_dict().items():  # embeddings, norms, biases and the head (tied or not) untouched
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


def _outputs_zeroed(model: nn.Module, heads: dict[int, list[int]]) -> nn.Module:
    """By hand: a unit only reaches the residual stream through its inputs of the output projection; zero those."""
    fam, hd = families.family(model), families.head_dim(model)
    _, per = families.head_units(model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, units in heads.items():
            w = families.blocks(ref)[layer].get_submodule(fam.attn_out).weight  # Conv1D (in, out), Linear (out, in)
            for u in units:
                cols = slice(u * per * hd, (u + 1) * per * hd)
                (w[cols] if fam.conv1d else w[:, cols]).zero_()
    return ref


@pytest.mark.parametrize("preset", FAMILIES)
@torch.no_grad()
def test_masked_units_compute_the_cut_model_and_the_hand_reference(preset: str, tmp_path: Path) -> None:
    model = family_model(preset, init=0.2)
    orig = copy.deepcopy(model)
    heads = {0: [1], 1: [0]}
    mask_heads(model, heads)
    assert model.config.to_dict()[HEADS_KEY] == {"0": [1], "1": [0]}
    x = ids(32)
    masked = model(x).logits
    torch.testing.assert_close(masked, _outputs_zeroed(orig, heads)(x).logits, atol=1e-5, rtol=0)
    cut = apply_pruned_heads(copy.deepcopy(model))
    torch.testing.assert_close(cut(x).logits, masked, atol=1e-5, rtol=0)
    assert (masked - orig(x).logits).abs().max() > 1e-2  # the units really are gone
    _, per = families.head_units(model)
    hd, e, fam = families.head_dim(model), families.width(model), families.family(model)
    has_bias = families.blocks(orig)[0].get_submodule(fam.attn_in[0]).bias is not None
    per_unit = (per + 2) * hd * (e + has_bias) + per * hd * e  # q, k, v rows (and biases), output-projection inputs
    assert count_params(orig) - count_params(cut) == 2 * per_unit
    model.save_pretrained(tmp_path / "pruned")  # full shape, units zeroed: loads with no code of ours
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(plain(x).logits, masked, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_pruned_heads(plain)(x).logits, masked, atol=1e-5, rtol=0)
    assert apply_pruned_heads(plain) is plain  # a second call finds the layers cut and leaves them


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
@torch.no_grad()
def test_kv_group_pruning_removes_the_kv_head_and_its_query_heads(preset: str) -> None:
    """4 query heads share 2 KV heads (16 wide): unit 1 is KV head 1 (k/v rows 16:32) and query heads 2, 3 (32:64)."""
    model = family_model(preset)
    orig = copy.deepcopy(model)
    assert families.head_units(model) == (2, 2) and unit_name(model) == "KV groups"
    mask_heads(model, {0: [1]})
    attn, ref = model.model.layers[0].self_attn, orig.model.layers[0].self_attn
    kept = {"q_proj": 32, "k_proj": 16, "v_proj": 16}  # rows of unit 0: query heads 0, 1 and KV head 0
    for name, n in kept.items():
        for kind in ("weight", "bias"):  # qwen2 has q/k/v biases, llama none
            t, t0 = getattr(getattr(attn, name), kind), getattr(getattr(ref, name), kind)
            if t is not None:
                assert (t[n:] == 0).all() and torch.equal(t[:n], t0[:n]), (name, kind)
    o, o0 = attn.o_proj.weight, ref.o_proj.weight
    assert (o[:, 32:] == 0).all() and torch.equal(o[:, :32], o0[:, :32])
    cut = apply_pruned_heads(model).model.layers[0].self_attn
    for name, n in kept.items():
        assert torch.equal(getattr(cut, name).weight, getattr(ref, name).weight[:n]), name
    assert torch.equal(cut.o_proj.weight, o0[:, :32])
    assert model.model.layers[1].self_attn.q_proj.weight.shape == (64, 64)  # the other layer keeps both groups


@pytest.mark.parametrize("preset", FAMILIES)
@torch.no_grad()
def test_head_importance_of_a_removed_unit_is_zero(preset: str) -> None:
    model = family_model(preset, init=0.2)
    mask_heads(model, {1: [0]})
    n_unit, _ = families.head_units(model)
    for batches in ([ids(16), ids(8)], None):  # dev contribution, weight norm
        scores = head_importance(model, batches)
        assert scores.shape == (2, n_unit) and scores[1, 0] == 0
        assert (scores[0] > 0).all() and (scores[1, 1:] > 0).all()


@pytest.mark.parametrize(
    ("preset", "unit", "most"), [("tiny", "heads", 2), ("tiny-llama", "KV groups", 2), ("tiny-neox", "heads", 6)]
)
def test_unit_errors_name_heads_or_kv_groups(preset: str, unit: str, most: int) -> None:
    model = family_model(preset)
    scores = head_importance(model)
    assert choose_heads(scores, most, unit_name(model)).keys() == {0, 1}  # at most all but one per layer
    with pytest.raises(
        ConfigError, match=f"of {scores.numel()} {unit}, but every layer keeps one; use heads:{most} at"
    ):
        choose_heads(scores, most + 1, unit_name(model))
    with pytest.raises(ConfigError, match=f"layer 0 would lose all its {scores.shape[1]} {unit}; keep at least one"):
        mask_heads(model, {0: list(range(scores.shape[1]))})
    with pytest.raises(ConfigError, match=f"{unit} 0:\\[9\\] is outside 2 layers"):
        mask_heads(model, {0: [9]})
    assert HEADS_KEY not in model.config.to_dict()  # a refused request changes nothing


@pytest.mark.parametrize("preset", FAMILIES)
@torch.no_grad()
def test_int8_every_family_close_to_fp32_and_reloads_exactly(preset: str, tmp_path: Path) -> None:
    fp32 = family_model(preset)
    q = quantize_int8(copy.deepcopy(fp32))
    assert not any(type(m) in (nn.Linear, Conv1D) for m in q.modules())  # every linear layer is int8, the head too
    assert is_int8_linear(q.get_output_embeddings()) and count_all_params(q) == count_params(fp32)
    emb = q.get_input_embeddings().weight
    if families.tied_head(fp32):  # one matrix: the embedding holds the int8 head's values
        assert torch.equal(emb, q.get_output_embeddings().weight().dequantize())
    else:  # gpt_neox: its own embedding, untouched
        assert torch.equal(emb, fp32.get_input_embeddings().weight)
    x = ids(32)
    a, b = fp32(x).logits, q(x).logits  # (B, T, V)
    assert torch.cosine_similarity(a, b, dim=-1).min() > 0.995
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    save_int8(q, tmp_path / "int8")
    stored = torch.load(tmp_path / "int8" / "model_int8.bin", weights_only=True)
    assert (families.embedding_key(fp32) in stored) != families.tied_head(fp32)  # a tied embedding is stored once
    reloaded = load_int8(tmp_path / "int8")
    assert type(reloaded) is type(fp32) and torch.equal(reloaded(x).logits, b)


@pytest.mark.parametrize("preset", FAMILIES)
@torch.no_grad()
def test_pruned_then_int8_artifact_loads(preset: str, tmp_path: Path) -> None:
    family_model(preset).save_pretrained(tmp_path / "src")
    summary = compress(tmp_path, tmp_path / "src", prune="heads:2", quantize="int8")
    pruned = {int(k): v for k, v in summary["pruned_heads"].items()}
    model = load_int8(tmp_path / "out")
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    assert sum(len(v) for v in pruned.values()) == 2 and summary["head_unit"] == unit_name(expected)
    mask_heads(expected, pruned)
    fp32_cut = apply_pruned_heads(expected)
    x = ids(32)
    cut_logits = fp32_cut(x).logits
    assert torch.equal(model(x).logits, quantize_int8(fp32_cut)(x).logits)  # the artifact is this model, exactly
    assert torch.cosine_similarity(model(x).logits, cut_logits, dim=-1).min() > 0.99
    assert summary["params_after"] < summary["params_before"]


@pytest.mark.parametrize("preset", FAMILIES[1:])
def test_head_pruning_and_healing_every_family(preset: str, tiny_data: dict, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_data["tok"])
    family_model(preset, vocab=len(tok)).save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    summary = compress(tmp_path, tmp_path / "src", prune="heads:2", data=str(tiny_data["data"]), heal_steps=2)
    heal = summary["prune"]["heal"]
    assert summary["prune"]["importance"] == "dev contribution" and heal["steps"] == 2
    assert heal["dev_loss_healed"] != heal["dev_loss_pruned"]  # the kept weights did train
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    pruned = {int(k): v for k, v in healed.config.to_dict()[HEADS_KEY].items()}
    assert sum(len(v) for v in pruned.values()) == 2
    blocks = families.blocks(healed)
    for layer, units in pruned.items():
        for name, kind, dim, idx in families.unit_slices(healed, units):
            tensor = getattr(blocks[layer].get_submodule(name), kind)
            if tensor is not None:
                assert (tensor.index_select(dim, idx) == 0).all(), (layer, name, kind)  # still zero after healing
    loaded, _ = load_for_evaluation(str(tmp_path / "out"))
    assert count_params(loaded) == summary["params_after"] < summary["params_before"]
