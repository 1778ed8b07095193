"""Presets, model loading and student initialisation, on tiny GPT-2s (width 64) on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast

from distil_codegpt.config import ConfigError, StudentConfig, UserError
from distil_codegpt.model import families
from distil_codegpt.model.families import count_params, model_size_mb
from distil_codegpt.model.presets import PRESETS, load_model, preset_config
from distil_codegpt.model.student import build_student, layer_map, pick_layers

VOCAB = 300
IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 250, 3], [9, 8, 7, 6, 5, 4, 3, 2]])  # (B=2, T=8)


def save_tiny(path: Path, layers: int, *, width: int = 64, seed: int = 0, tied: bool = True) -> Path:
    config = preset_config("tiny", VOCAB, layers=layers)
    config.n_embd = width
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def save_tokenizer(path: Path) -> None:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>", "<unk>"])
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12-layer teacher (CodeGPT-small's depth, tiny width) with its tokenizer."""
    path = save_tiny(tmp_path_factory.mktemp("teacher"), 12)
    save_tokenizer(path)
    return path


def student(teacher: Path, out: Path, **kw) -> dict:
    return build_student(StudentConfig(teacher=str(teacher), out=str(out), **kw))


def one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- pick_layers


def test_uniform_pick_gives_distilgpt2_layers():
    assert pick_layers(12, 6, "uniform") == [0, 2, 4, 7, 9, 11]


@pytest.mark.parametrize(
    "k, expected",
    [
        (1, [0]),
        (2, [0, 11]),
        (3, [0, 6, 11]),  # 5.5 rounds up
        (4, [0, 4, 7, 11]),
        (8, [0, 2, 3, 5, 6, 8, 9, 11]),
        (10, [0, 1, 2, 4, 5, 6, 7, 9, 10, 11]),
        (12, list(range(12))),
    ],
)
def test_uniform_pick_spreads_over_depth(k, expected):
    assert pick_layers(12, k) == expected


def test_uniform_pick_is_strictly_increasing_and_spans_depth():
    for n in range(1, 25):
        for k in range(2, n + 1):
            got = pick_layers(n, k)
            assert got[0] == 0 and got[-1] == n - 1 and all(a < b for a, b in zip(got, got[1:]))


def test_first_last_and_explicit_picks():
    assert pick_layers(12, 3, "first") == [0, 1, 2]
    assert pick_layers(12, 3, "last") == [9, 10, 11]
    assert pick_layers(12, 3, "0,5,11") == [0, 5, 11]


@pytest.mark.parametrize(
    "n, k, pick, match",
    [
        (12, 13, "uniform", r"^layers: 13 is more than the 12 layers of the teacher"),
        (12, 0, "uniform", r"^layers: 0 is not allowed"),
        (12, 2, "0,12", r"^pick: '0,12' names layer 12; the teacher has layers 0..11"),
        (12, 2, "4,2", r"^pick: '4,2' is not allowed; list each layer once, in ascending order"),
        (12, 2, "3,3", r"ascending order"),
        (12, 3, "0,1", r"^pick: '0,1' lists 2 layers; list exactly --layers 3"),
        (12, 2, "middle", r"^pick: 'middle' is not allowed; use uniform, first, last"),
    ],
)
def test_pick_errors_name_the_field(n, k, pick, match):
    with pytest.raises(ConfigError, match=match) as e:
        pick_layers(n, k, pick)
    one_line(e)


# ---------------------------------------------------------------- presets


def test_codegpt_small_preset_is_gpt2_124m():
    config = preset_config("codegpt-small", 50257)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_positions) == (12, 768, 12, 1024)
    assert config.n_inner is None and config.activation_function == "gelu_new" and config.tie_word_embeddings
    with torch.device("meta"):  # shapes only: no 500 MB allocation
        model = GPT2LMHeadModel(config)
    assert count_params(model) == 124_439_808
    assert model_size_mb(model) == pytest.approx(497.759232)


def test_presets_build_and_run():
    for name in PRESETS:
        config = preset_config(name, 1000, layers=1, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        assert (config.vocab_size, families.depth(config), config.pad_token_id) == (1000, 1, 2)
        assert config.model_type == PRESETS[name]["family"]
    for name in ("tiny", "tiny-llama", "tiny-qwen2", "tiny-neox"):
        logits = AutoModelForCausalLM.from_config(preset_config(name, VOCAB)).eval()(IDS).logits
        assert logits.shape == (2, 8, VOCAB)


def test_smollm2_preset_is_smollm2_135m():
    config = preset_config("smollm2-135m", 49152)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.intermediate_size, families.head_dim(config)) == (3, 1536, 64)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_params(model) == 134_515_008  # SmolLM2-135M, tied head counted once


def test_unknown_preset_lists_the_choices():
    with pytest.raises(
        ConfigError, match=r"^model: 'huge' is not a supported preset; choose from tiny, small-cpu"
    ) as e:
        preset_config("huge", 100)
    one_line(e)


def test_tied_head_counts_once(tmp_path):
    tied = load_model(str(save_tiny(tmp_path / "tied", 2)))
    untied = load_model(str(save_tiny(tmp_path / "untied", 2, tied=False)))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert count_params(untied) - count_params(tied) == VOCAB * 64


# ---------------------------------------------------------------- student from teacher layers


def test_student_copies_picked_layers_exactly(teacher, tmp_path):
    summary = student(teacher, tmp_path / "s", layers=6)
    assert summary["layer_map"] == [0, 2, 4, 7, 9, 11] and summary["init"] == "teacher"
    t = load_model(str(teacher))
    s = AutoModelForCausalLM.from_pretrained(tmp_path / "s")  # no code of ours
    assert s.config.n_layer == 6 and layer_map(s) == [0, 2, 4, 7, 9, 11] and s.config.distil_init == "teacher"
    assert s.config.distil_teacher == str(teacher)
    t_sd, s_sd = t.state_dict(), s.state_dict()
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert torch.equal(s_sd[key], t_sd[key]), key
    for i, j in enumerate(layer_map(s)):
        for name, tensor in s.transformer.h[i].state_dict().items():
            assert torch.equal(tensor, t.transformer.h[j].state_dict()[name]), (i, j, name)
    assert s.lm_head.weight is s.transformer.wte.weight
    assert summary["params"] == count_params(s) < summary["teacher_params"] == count_params(t)


def test_full_depth_student_has_the_teachers_logits(teacher, tmp_path):
    student(teacher, tmp_path / "s", layers=12)
    t = AutoModelForCausalLM.from_pretrained(teacher).eval()
    s = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        assert torch.equal(s(IDS).logits, t(IDS).logits)


def test_untied_head_is_copied(tmp_path):
    teacher = save_tiny(tmp_path / "t", 4, tied=False)
    student(teacher, tmp_path / "s", layers=2)
    t, s = load_model(str(teacher)), load_model(str(tmp_path / "s"))
    assert s.lm_head.weight is not s.transformer.wte.weight
    assert torch.equal(s.lm_head.weight, t.lm_head.weight) and torch.equal(
        s.transformer.wte.weight, t.transformer.wte.weight
    )


def test_student_dir_is_self_contained(teacher, tmp_path):
    summary = student(teacher, tmp_path / "s", layers=2, pick="first")
    out = tmp_path / "s"
    assert {"model.safetensors", "config.json", "tokenizer.json", "run.json"} <= {p.name for p in out.iterdir()}
    assert "tokenizer.json" in summary["tokenizer_files"]
    assert (
        AutoTokenizer.from_pretrained(out)("def f(x):").input_ids
        == AutoTokenizer.from_pretrained(teacher)("def f(x):").input_ids
    )
    run = json.loads((out / "run.json").read_text())
    assert run["stage"] == "student" and run["config"]["pick"] == "first" and run["metrics"]["layer_map"] == [0, 1]


# ---------------------------------------------------------------- init_from and random


def test_init_from_takes_the_other_models_weights(teacher, tmp_path):
    other = save_tiny(tmp_path / "other", 4, seed=7)
    summary = student(teacher, tmp_path / "s", layers=2, init_from=str(other))
    assert summary["init"] == "pretrained" and summary["source_layers"] == [0, 3] and summary["layer_map"] is None
    o, s = load_model(str(other)), load_model(str(tmp_path / "s"))
    assert s.config.distil_source_layers == [0, 3] and layer_map(s) is None and s.config.distil_init == "pretrained"
    assert torch.equal(s.transformer.wte.weight, o.transformer.wte.weight)
    for i, j in enumerate([0, 3]):
        for name, tensor in s.transformer.h[i].state_dict().items():
            assert torch.equal(tensor, o.transformer.h[j].state_dict()[name])


def test_random_student_is_fresh_and_seeded(teacher, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        summary = student(teacher, tmp_path / name, layers=3, random=True, seed=seed)
    assert summary["init"] == "random" and summary["layer_map"] is None
    a, b, c = (load_model(str(tmp_path / n)) for n in "abc")
    t = load_model(str(teacher))
    assert a.config.distil_init == "random" and layer_map(a) is None
    assert not torch.equal(a.transformer.wte.weight, t.transformer.wte.weight)
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, t.transformer.h[0].attn.c_attn.weight)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)


def test_student_of_a_student_gets_fresh_provenance(teacher, tmp_path):
    student(teacher, tmp_path / "s6", layers=6)
    student(tmp_path / "s6", tmp_path / "s3", layers=3)
    assert layer_map(load_model(str(tmp_path / "s3"))) == [0, 3, 5]  # of s6, its teacher


# ---------------------------------------------------------------- errors


def test_missing_teacher_dir(tmp_path):
    with pytest.raises(UserError, match=r"^teacher: '.*nope': no such directory") as e:
        student(tmp_path / "nope", tmp_path / "s")
    one_line(e)


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"not a model directory \(no config\.json\); pass a directory written by") as e:
        load_model(str(tmp_path / "empty"), role="teacher")
    one_line(e)


def test_more_layers_than_the_teacher(teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"^layers: 13 is more than the 12 layers of the teacher") as e:
        student(teacher, tmp_path / "s", layers=13, pick="uniform")
    one_line(e)
    assert not (tmp_path / "s").exists()


def test_init_from_with_another_width(teacher, tmp_path):
    other = save_tiny(tmp_path / "narrow", 2, width=32)
    with pytest.raises(ConfigError, match=r"^init_from: '.*narrow' has vocab 300 and width 32, the teacher has") as e:
        student(teacher, tmp_path / "s", layers=2, init_from=str(other))
    one_line(e)


def test_out_must_not_be_the_teacher(teacher):
    with pytest.raises(ConfigError, match=r"^out: .* is the teacher's directory") as e:
        student(teacher, teacher, layers=2)
    one_line(e)


def test_models_use_sdpa_attention_equal_to_eager(tmp_path):
    """SDPA (fused attention on CUDA) is what our models run; it computes what the eager attention does."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(preset_config("tiny", 300)).eval()
    assert model.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).config._attn_implementation == "sdpa"
    eager = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, eager(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_pad_vocab_pads_tied_head_and_keeps_logits():
    from distil_codegpt.model.presets import pad_vocab

    torch.manual_seed(0)
    model = GPT2LMHeadModel(preset_config("tiny", 300)).eval()
    x = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        before = model(input_ids=x).logits
        assert pad_vocab(model, 64) == 300 and pad_vocab(model, 64) == 300  # idempotent
        after = model(input_ids=x).logits
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.size(0) == 320
    assert torch.equal(after[..., :300], before) and torch.count_nonzero(model.lm_head.weight[300:]) == 0
