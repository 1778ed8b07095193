"""The trimmed output head: logits of the kept ids equal the full model's and the others are -inf, greedy output is
unchanged where the full model's choices are kept, KD renormalises over the kept ids (hand computation), and
`compress --trim-vocab` writes an artifact every verb loads (fp32 and int8), with its held-out coverage."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from distil_codegpt.compress.quantize import is_int8_linear, load_int8, quantize_int8
from distil_codegpt.compress.run import run_compress
from distil_codegpt.config import CompressConfig, DistilConfig, EvaluateConfig, UserError, build_config
from distil_codegpt.data.shards import TokenShard
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill.losses import LossWeights, clm_loss, distillation_loss, head_loss, kd_loss
from distil_codegpt.distill.run import run_distil
from distil_codegpt.evaluate.completion import complete
from distil_codegpt.evaluate.run import run_evaluate
from distil_codegpt.model.presets import load_model, preset_config
from distil_codegpt.model.vocab_trim import KEPT_FILE, TrimmedHead, kept_ids, kept_mask, trim_head

V = 300


def model_of(preset: str, vocab: int = V, seed: int = 0, init: float = 0.2, **kw) -> torch.nn.Module:
    config = preset_config(preset, vocab, **kw)
    config.initializer_range = init  # spread logits: argmax margins well above float noise
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama", "tiny-neox"])
@torch.no_grad()
def test_kept_logits_equal_the_full_model_and_the_others_are_minus_inf(preset: str) -> None:
    full = model_of(preset)
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = full(x).logits  # (B, T, V)
    kept = torch.tensor(sorted({0, 7, 299, *range(10, 300, 4)}))
    trimmed = trim_head(copy.deepcopy(full), kept.tolist()[::-1] + [7])  # any order, repeats: kept once, sorted
    assert isinstance(trimmed.get_output_embeddings(), TrimmedHead) and torch.equal(kept_ids(trimmed), kept)
    got = trimmed(x).logits
    out = torch.ones(V, dtype=torch.bool)
    out[kept] = False
    assert got.shape == ref.shape and torch.allclose(got[..., kept], ref[..., kept], atol=1e-5)
    assert torch.isneginf(got[..., out]).all()
    assert torch.equal(kept_mask(trimmed), ~out)


@torch.no_grad()
def test_greedy_output_unchanged_when_the_full_models_choices_are_kept(tiny_data: dict) -> None:
    tok = load_tokenizer(tiny_data["tok"])
    full = model_of("tiny-llama", len(tok), eos_token_id=tok.eos_token_id)
    lines = (tiny_data["data"] / "line_completion" / "test.json").read_text().splitlines()[:6]
    inputs = [json.loads(x)["input"] for x in lines]
    chosen: set[int] = set()  # every position's argmax in every forward of the full model's decoding
    hook = full.lm_head.register_forward_hook(lambda m, i, out: chosen.update(out.argmax(-1).flatten().tolist()))
    ref = complete(full, tok, inputs, max_new_tokens=12, progress=False)
    hook.remove()
    kept = sorted(chosen | set(range(0, len(tok), 7)) | set(tok.all_special_ids))
    assert len(kept) < 0.5 * len(tok)
    trimmed = trim_head(copy.deepcopy(full), kept)
    assert complete(trimmed, tok, inputs, max_new_tokens=12, progress=False) == ref
    assert any(ref)  # not a vacuous match of empty lines


def test_kd_renormalises_the_teacher_over_the_kept_ids_by_hand() -> None:
    t = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])  # (B=1, T=1, V=4) teacher
    s = torch.tensor([[[0.5, 0.0, 3.0, 1.0]]])  # student; id 2 is cut, so its large logit must not matter
    kept = torch.tensor([True, True, False, True])
    labels = torch.tensor([[1]])
    # by hand at T = 1: p' = softmax of the teacher over {0, 1, 3}, q' the student's over the same ids
    zt, zs = math.exp(2) + math.exp(1) + math.exp(-1), math.exp(0.5) + math.exp(0) + math.exp(1)
    p = [math.exp(2) / zt, math.exp(1) / zt, math.exp(-1) / zt]
    q = [math.exp(0.5) / zs, math.exp(0) / zs, math.exp(1) / zs]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kd_loss(s, t, labels, temperature=1.0, kept=kept).item() == pytest.approx(kl, rel=1e-6)
    # at T = 2: both tempered, then renormalised over the kept ids, times T^2
    zt2, zs2 = (sum(math.exp(v / 2) for v in row) for row in ([2, 1, -1], [0.5, 0, 1]))
    p2 = [math.exp(v / 2) / zt2 for v in (2, 1, -1)]
    q2 = [math.exp(v / 2) / zs2 for v in (0.5, 0, 1)]
    kl2 = 4 * sum(pi * math.log(pi / qi) for pi, qi in zip(p2, q2))
    assert kd_loss(s, t, labels, temperature=2.0, kept=kept).item() == pytest.approx(kl2, rel=1e-6)
    # a trimmed model's own logits (-inf at the cut id) give the same number
    s_cut = s.masked_fill(~kept, float("-inf"))
    assert kd_loss(s_cut, t, labels, temperature=1.0, kept=kept).item() == pytest.approx(kl, rel=1e-6)
    assert kd_loss(s, t, labels, temperature=1.0).item() != pytest.approx(kl, rel=1e-3)  # unmasked differs
    # CE over the kept ids: -log q'(1); a next token that is cut adds 0 (it cannot be predicted)
    assert clm_loss(s, labels, kept).item() == pytest.approx(-math.log(q[1]), rel=1e-6)
    assert clm_loss(s, torch.tensor([[2]]), kept).item() == 0.0
    for divergence in ("reverse", "jsd"):
        assert math.isfinite(kd_loss(s_cut, t, labels, 1.0, divergence, kept=kept).item())


def test_chunked_head_loss_with_kept_ids_equals_the_plain_loss() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(2, 5, 8, generator=g, requires_grad=True), torch.randn(11, 8, generator=g)
    t_hidden, t_head = torch.randn(2, 5, 8, generator=g), torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    kept = torch.zeros(11, dtype=torch.bool)
    kept[[0, 2, 3, 5, 8, 9]] = True
    w = LossWeights(alpha_ce=1.0, alpha_clm=0.5, alpha_cos=0.0, alpha_mse=0.1, temperature=2.0)
    plain, parts = distillation_loss(hidden @ head.T, t_hidden @ t_head.T, labels, w, kept=kept)
    (g_plain,) = torch.autograd.grad(plain, hidden)
    lean, lean_parts = head_loss(
        hidden, head, labels, w, teacher_hidden=t_hidden, teacher_head=t_head, chunk=3, kept=kept
    )
    (g_lean,) = torch.autograd.grad(lean, hidden)
    assert lean.item() == pytest.approx(plain.item(), rel=1e-5)
    assert {k: pytest.approx(v.item(), rel=1e-5) for k, v in lean_parts.items()} == {
        k: v for k, v in parts.items() if k != "loss"
    }
    assert torch.allclose(g_lean, g_plain, atol=1e-6)


def save_llama(tok_dir: Path, out: Path, layers: int, seed: int) -> Path:
    tok = load_tokenizer(tok_dir)
    model_of("tiny-llama", len(tok), seed=seed, init=0.02, layers=layers).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def student(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tiny_data["tok"], tmp_path_factory.mktemp("trim") / "student", 1, 1)


def trim(student: Path, out: Path, source: Path, **kw) -> dict:
    values = {"model": str(student), "out": str(out), "trim_vocab": str(source), **kw}
    return run_compress(build_config(CompressConfig, values))


def test_compress_trim_vocab_artifact_loads_everywhere(tiny_data: dict, student: Path, tmp_path: Path) -> None:
    trim(student, tmp_path / "t", tiny_data["data"], min_count=3)
    tok = load_tokenizer(tiny_data["tok"])
    train, test = (TokenShard(tiny_data["shards"], s) for s in ("train", "test"))
    counts = np.bincount(np.asarray(train.tokens, dtype=np.int64), minlength=len(tok))
    expected = sorted(set(np.flatnonzero(counts >= 3).tolist()) | set(tok.all_special_ids))
    spec = json.loads((tmp_path / "t" / KEPT_FILE).read_text())
    assert spec["kept"] == expected and spec["vocab_size"] == len(tok) and len(expected) < len(tok)
    held = np.asarray(test.tokens, dtype=np.int64)
    coverage = np.isin(held, expected).mean()
    t = json.loads((tmp_path / "t" / "run.json").read_text())["metrics"]["trim"]
    assert t["heldout_split"] == "test" and t["heldout_coverage"] == pytest.approx(coverage) and coverage < 1
    assert t["kept"] == len(expected) and t["head_share_after"] < t["head_share_before"]
    # a plain HF dir (transformers alone loads it, untrimmed); ours rebuild the trimmed head
    model = load_model(str(tmp_path / "t"))
    assert torch.equal(kept_ids(model), torch.tensor(expected))
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    x = torch.tensor([expected[:10]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits[..., expected], full(x).logits[..., expected], atol=1e-5)
    test_file = tiny_data["data"] / "line_completion" / "test.json"
    values = {"model": str(tmp_path / "t"), "test": str(test_file), "limit": 3, "latency_samples": 0}
    metrics = run_evaluate(build_config(EvaluateConfig, {**values, "max_new_tokens": 6, "out": str(tmp_path / "e")}))
    assert metrics["n"] == 3


def test_trimmed_int8_artifact_is_the_quantized_trimmed_model(tiny_data: dict, student: Path, tmp_path: Path) -> None:
    trim(student, tmp_path / "q", tiny_data["shards"], quantize="int8")  # a shards dir works as well as a corpus
    reloaded = load_int8(tmp_path / "q")
    head = reloaded.get_output_embeddings()
    kept = kept_ids(reloaded)
    assert isinstance(head, TrimmedHead) and is_int8_linear(head.proj) and head.proj.weight().shape[0] == len(kept)
    in_memory = quantize_int8(trim_head(load_model(str(student)), kept))
    x = torch.tensor([kept[:12].tolist()])
    with torch.no_grad():
        got, ref = reloaded(x).logits, in_memory(x).logits
        fp32 = load_model(str(student))(x).logits
    assert torch.equal(got, ref)  # the artifact is this model, exactly
    assert torch.allclose(got[..., kept], fp32[..., kept], atol=0.05 * fp32.abs().max())
    assert torch.isneginf(got).sum() == x.numel() * (got.size(-1) - len(kept))


def test_distil_a_trimmed_student_keeps_its_head(tiny_data: dict, student: Path, tmp_path: Path) -> None:
    trim(student, tmp_path / "t", tiny_data["data"], min_count=2)
    teacher = save_llama(tiny_data["tok"], tmp_path / "teacher", 2, 0)
    values = {"data": str(tiny_data["data"]), "teacher": str(teacher), "student": str(tmp_path / "t")}
    values |= {"out": str(tmp_path / "d"), "seq_len": 32, "batch_size": 4, "max_steps": 2, "warmup_steps": 1}
    values |= {"eval_every": 0, "eval_batches": 2, "save_every": 0, "tensorboard": False, "recipe": "logit"}
    metrics = run_distil(build_config(DistilConfig, {**values, "alpha_clm": 0.5}))
    assert all(math.isfinite(metrics[k]) for k in ("train_loss", "dev_loss"))
    before, after = (json.loads((d / KEPT_FILE).read_text())["kept"] for d in (tmp_path / "t", tmp_path / "d"))
    assert before == after and isinstance(load_model(str(tmp_path / "d")).get_output_embeddings(), TrimmedHead)
    with pytest.raises(UserError, match="trim_vocab: .*no such directory"):
        trim(student, tmp_path / "x", tmp_path / "missing")
