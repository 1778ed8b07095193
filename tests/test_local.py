"""The local (blockwise) stage: spans tile the teacher, a student equal to its teacher has loss 0, only blocks
learn, the loss is the hand formula, it falls with training and resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_shape import make_teacher, save
from transformers import AutoModelForCausalLM

from distil_codegpt.config import ConfigError, DistilConfig, StudentConfig, build_config
from distil_codegpt.config.training import LOCAL_SHARE
from distil_codegpt.distill.local import LocalStage, block_loss, block_spans, fresh_cut
from distil_codegpt.distill.run import run_distil
from distil_codegpt.distill.trainer import Trainer, setup_runtime
from distil_codegpt.model import families
from distil_codegpt.model.student import build_student

LOOP = {"seq_len": 64, "batch_size": 4, "eval_batches": 2, "log_every": 1, "warmup_steps": 2, "tensorboard": False}
IDS = torch.randint(0, 1200, (2, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def teacher_dir(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("local")
    return save(make_teacher(root, "tiny-llama", tiny_data["tok"], layers=4), root / "t", tiny_data["tok"])


def student(teacher_dir: Path, out: Path, data: Path, **kw) -> AutoModelForCausalLM:
    build_student(StudentConfig(teacher=str(teacher_dir), out=str(out), data=str(data), pick_windows=4, **kw))
    return AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(
    ("picked", "n", "spans"),
    [([0, 3, 7], 10, [(0, 3), (3, 7), (7, 10)]), ([2, 5], 6, [(0, 5), (5, 6)]), ([0, 1, 2, 3], 4, None)],
)
def test_spans_tile_the_teacher(picked, n, spans):
    model = AutoModelForCausalLM.from_config(
        families.model_config("llama", 50, {"layers": len(picked), "width": 16, "heads": 2})
    )
    model.config.distil_layer_map = picked
    assert block_spans(model, n) == (spans or [(0, 1), (1, 2), (2, 3), (3, 4)])


def test_block_loss_is_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    start, target, out = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    nmse = ((out - target) ** 2).sum() / ((target - start) ** 2).sum()
    assert block_loss(out, target, start, "nmse").item() == pytest.approx(nmse.item(), rel=1e-6)
    cos = (out * target).sum(-1) / (out.norm(dim=-1) * target.norm(dim=-1))
    assert block_loss(out, target, start, "cosine").item() == pytest.approx(1 - cos.mean().item(), rel=1e-6)
    assert block_loss(start, target, start, "nmse").item() == pytest.approx(1.0)  # a block that does nothing


@pytest.mark.parametrize("flags", [{}, {"ffn": 128}])
def test_a_student_equal_to_its_teacher_has_local_loss_zero(flags, teacher_dir, tiny_data, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    s = student(teacher_dir, tmp_path / "s", tiny_data["data"], layers=4, **flags).eval()
    loss, parts = LocalStage(s, teacher)(s, teacher, IDS)
    assert loss.item() < 1e-10 and parts["local_worst"] < 1e-10


def test_only_student_blocks_get_gradients_and_each_only_its_own(teacher_dir, tiny_data, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    s = student(teacher_dir, tmp_path / "s", tiny_data["data"], layers=2, pick="1,3", ffn=64, heads=2)
    loss, _ = LocalStage(s, teacher)(s, teacher, IDS)
    assert loss.item() > 0.01
    loss.backward()
    prefix = families.block_prefix(s)
    for name, p in s.named_parameters():
        if name.startswith(prefix):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:  # embeddings (tied head) and the final norm
            assert p.grad is None or p.grad.abs().sum() == 0, name
    # block 0's loss depends on block 0 alone: its gradient is that of its own loss, computed with block 1 removed
    g0 = {n: p.grad.clone() for n, p in s.named_parameters() if n.startswith(f"{prefix}0.")}
    s.zero_grad()
    stage = LocalStage(s, teacher)
    from distil_codegpt.model.layer_scores import residual_stream

    with torch.no_grad():
        states = residual_stream(teacher, IDS)
    (a, b), _ = stage.spans
    out = {}
    h = families.blocks(s)[0].register_forward_hook(lambda _m, _a, o: out.setdefault("y", o))
    hp = families.blocks(s)[0].register_forward_pre_hook(
        lambda _m, args, kw: ((states[a], *args[1:]), kw), with_kwargs=True
    )
    s(input_ids=IDS, use_cache=False, logits_to_keep=1)
    h.remove(), hp.remove()
    y = out["y"][0] if isinstance(out["y"], tuple) else out["y"]
    (block_loss(y, states[b], states[a], "nmse") / 2).backward()  # the mean over the 2 blocks
    for n, g in g0.items():
        torch.testing.assert_close(dict(s.named_parameters())[n].grad, g, atol=1e-6, rtol=1e-4)


def local_cfg(tiny_data: dict, teacher_dir: Path, s_dir: Path, out: Path, **kw) -> DistilConfig:
    values = {
        **LOOP,
        "data": str(tiny_data["data"]),
        "teacher": str(teacher_dir),
        "student": str(s_dir),
        "out": str(out),
        "stage": "local",
        "lr": 3e-3,
        **kw,
    }
    return build_config(DistilConfig, values)


def test_the_local_loss_falls_and_resumes_exactly(teacher_dir, tiny_data, tmp_path):
    # a full-shape student whose blocks were knocked off the teacher's: the local stage should bring them back
    s = student(teacher_dir, tmp_path / "s", tiny_data["data"], layers=4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in families.blocks(s).parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    s.save_pretrained(tmp_path / "s")
    metrics = run_distil(local_cfg(tiny_data, teacher_dir, tmp_path / "s", tmp_path / "a", max_steps=40))
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    first, last = sum(r["loss"] for r in lines[:5]) / 5, sum(r["loss"] for r in lines[-5:]) / 5
    assert last < 0.4 * first, (first, last)
    assert metrics["steps"] == 40
    # 40 straight steps against 20 + 20 after an interruption (it checkpoints on the way out)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)

    def trainer(**kw) -> Trainer:
        cfg = local_cfg(tiny_data, teacher_dir, tmp_path / "s", tmp_path / "b", max_steps=40, **kw)
        s = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
        return Trainer(cfg, setup_runtime(cfg), s, tiny_data["shards"], teacher=teacher)

    trainer().fit(stop_at=20)
    resumed = trainer(resume=True)
    resumed.fit()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    for k, v in resumed.student.state_dict().items():
        torch.testing.assert_close(v, a[k], atol=0, rtol=0)


def test_local_stage_errors_name_the_fix(teacher_dir, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"^teacher_cache: .* the local stage needs --teacher"):
        build_config(DistilConfig, {"data": "d", "out": "o", "student": "s", "teacher_cache": "c", "stage": "local"})
    other = save(make_teacher(tmp_path, "tiny-llama", tiny_data["tok"]), tmp_path / "r", tiny_data["tok"])
    build_student(StudentConfig(teacher=str(other), out=str(tmp_path / "rand"), layers=2, random=True))
    assert not fresh_cut(str(tmp_path / "rand"))  # so `distil`'s default runs no local stage for it
    with pytest.raises(ConfigError, match=r"^stage: local needs a student cut from this teacher"):
        run_distil(local_cfg(tiny_data, teacher_dir, tmp_path / "rand", tmp_path / "x", max_steps=1))


def test_local_share_runs_the_local_stage_then_global_kd_from_it(teacher_dir, tiny_data, tmp_path, capsys):
    # `distil --local-share 0.25 --max-steps 8`: 2 local steps saved to OUT/local, then 6 of global KD from them,
    # the same weights as the two stages run by hand
    student(teacher_dir, tmp_path / "s", tiny_data["data"], layers=2)
    glob = {"stage": "global", "temperature": 1.0, "alpha_ce": 1.0, "alpha_clm": 0.0, "alpha_cos": 0.0}
    both = local_cfg(tiny_data, teacher_dir, tmp_path / "s", tmp_path / "auto", max_steps=8, local_share=0.25, **glob)
    metrics = run_distil(both)
    run_distil(local_cfg(tiny_data, teacher_dir, tmp_path / "s", tmp_path / "hand-local", max_steps=2))
    hand = local_cfg(tiny_data, teacher_dir, tmp_path / "hand-local", tmp_path / "hand", max_steps=6, **glob)
    run_distil(hand)
    local_run = json.loads((tmp_path / "auto" / "local" / "run.json").read_text())
    run = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert local_run["config"]["stage"] == "local" and local_run["metrics"]["steps"] == 2
    assert run["config"]["student"] == str(tmp_path / "auto" / "local") and run["config"]["local_share"] == 0
    assert run["metrics"]["steps"] == 6 and metrics["local_stage"]["steps"] == 2
    assert run["metrics"]["local_stage"]["tokens"] == 2 * 4 * 64
    for sub in ("local", ""):
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "auto" / sub).state_dict()
        b = AutoModelForCausalLM.from_pretrained(tmp_path / ("hand-local" if sub else "hand")).state_dict()
        for k, v in a.items():
            torch.testing.assert_close(v, b[k], atol=0, rtol=0)
    # resumed with the local stage done: it is not run again, and global KD starts afresh from it
    (tmp_path / "again").mkdir()
    shutil.copytree(tmp_path / "hand-local", tmp_path / "again" / "local")
    capsys.readouterr()
    run_distil(dataclasses.replace(both, out=str(tmp_path / "again"), resume=True))
    assert "local stage: done" in capsys.readouterr().out
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "hand").state_dict()
    for k, v in AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict().items():
        torch.testing.assert_close(v, b[k], atol=0, rtol=0)
    # the defaults for a pretrained teacher and a student cut from it: the logit recipe with its quarter of local
    # stage, the same run as the explicit one
    assert fresh_cut(str(tmp_path / "s")) and not fresh_cut(str(tmp_path / "nowhere"))
    assert not fresh_cut(str(tmp_path / "hand-local"))  # trained already: its own default is global KD only
    run_distil(local_cfg(tiny_data, teacher_dir, tmp_path / "s", tmp_path / "default", max_steps=8, stage="global"))
    run = json.loads((tmp_path / "default" / "run.json").read_text())
    assert run["config"]["recipe"] == "logit" and run["metrics"]["local_stage"]["steps"] == 2
    for k, v in AutoModelForCausalLM.from_pretrained(tmp_path / "default").state_dict().items():
        torch.testing.assert_close(v, b[k], atol=0, rtol=0)
    # a run begun in global KD only (as before this default) resumes there: no local stage slips in
    plain = local_cfg(tiny_data, teacher_dir, tmp_path / "s", tmp_path / "plain", max_steps=4, **glob, local_share=0.0)
    run_distil(plain)
    run_distil(local_cfg(tiny_data, teacher_dir, tmp_path / "s", tmp_path / "plain", max_steps=6, stage="global",
                         resume=True))  # fmt: skip
    run = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert not (tmp_path / "plain" / "local").exists() and "local_stage" not in run["metrics"]
    assert run["metrics"]["steps"] == 6 and run["config"]["local_share"] == 0


def test_local_share_defaults_and_errors():
    base = {"data": "d", "out": "o", "student": "s", "teacher": "t"}
    cfg = build_config(DistilConfig, base)
    assert cfg.local_share == -1
    assert LOCAL_SHARE == {"distilbert": 0.0, "logit": 0.25}
    for recipe, share in LOCAL_SHARE.items():
        one = build_config(DistilConfig, {**base, "recipe": recipe})
        assert one.resolve(True, cut_student=True).local_share == share
        assert one.resolve(True).local_share == 0  # a student not cut from the teacher: no local stage to run
    assert build_config(DistilConfig, {**base, "max_steps": 3}).resolve(True, cut_student=True).local_share == 0
    cached = build_config(DistilConfig, {**base, "teacher": "", "teacher_cache": "c", "recipe": "logit"})
    assert cached.resolve(True, cut_student=True).local_share == 0  # no activations in a cache: global KD only
    trains = build_config(DistilConfig, {**base, "teacher_mode": "train"})
    assert trains.resolve(True, cut_student=True).local_share == 0
    assert build_config(DistilConfig, {**base, "local_share": 0.3}).resolve(True).local_share == 0.3
    with pytest.raises(ConfigError, match=r"^teacher_cache: .* the local stage needs --teacher"):
        build_config(DistilConfig, {**base, "teacher": "", "teacher_cache": "c", "local_share": 0.25})
    with pytest.raises(ConfigError, match=r"^local_share: 1\.0 .* use a share in \[0, 1\)"):
        build_config(DistilConfig, {**base, "local_share": 1.0})
    with pytest.raises(ConfigError, match=r"^local_share: 0\.25 .* use it with --stage global"):
        build_config(DistilConfig, {**base, "local_share": 0.25, "stage": "local"})
