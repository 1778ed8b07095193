"""Offline teacher cache: rows equal the teacher's own top-k, exact resume, reuse, mismatch errors, CLI, reader."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from distil_codegpt.cli import main
from distil_codegpt.config import CacheTeacherConfig, ConfigError, UserError, build_config
from distil_codegpt.data.shards import TokenShard
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill import teacher_cache
from distil_codegpt.distill.teacher_cache import TeacherCache, build_cache, top_k_logprobs
from distil_codegpt.model.presets import preset_config

BINS = ("train.ids.bin", "train.logp.bin", "train.tail.bin")
SMALL = {"seq_len": 32, "batch_size": 4, "max_windows": 10, "top_k": 8, "device": "cpu"}  # fp32, the reference


def save_teacher(tok_dir: Path, out: Path, seed: int, layers: int = 2, preset: str = "tiny") -> Path:
    """A tiny random model (GPT-2 unless `preset` says otherwise) with its tokenizer. A wide init (0.3, GPT-2 uses
    0.02) spreads the logits, so the top-k holds real mass and near-ties between top ids are rare."""
    tok = load_tokenizer(tok_dir)
    cfg = preset_config(preset, len(tok), layers=layers)
    cfg.initializer_range = 0.3
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_teacher(tiny_data["tok"], tmp_path_factory.mktemp("cache") / "teacher", seed=0)


def cache_cfg(tiny_data: dict, teacher: Path, out: Path, **kw) -> CacheTeacherConfig:
    values = {"teacher": str(teacher), "data": str(tiny_data["data"]), "tokenizer": str(tiny_data["tok"]), **SMALL}
    values = {**values, "out": str(out), **kw}
    return build_config(CacheTeacherConfig, values)


@pytest.fixture(scope="module")
def built(tiny_data: dict, teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    build_cache(cache_cfg(tiny_data, teacher, out))
    return out


def test_top_k_logprobs_tail_is_stable_where_one_minus_sum_cancels() -> None:
    logits = torch.tensor([[0.0, -40.0, -40.0, -40.0]])
    top, ids, tail = top_k_logprobs(logits, 1)
    assert ids.tolist() == [[0]] and top.item() == pytest.approx(0.0, abs=1e-12)
    naive = torch.log1p(-top.exp().sum(-1))  # 1 - p underflows to 0 in fp32
    assert naive.item() == -math.inf
    assert tail.item() == pytest.approx(math.log(3) - 40 - math.log1p(3 * math.exp(-40)), abs=1e-5)
    _, ids_all, tail_all = top_k_logprobs(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 4)
    assert ids_all.tolist() == [[1, 2, 0, 3]] and tail_all.item() == -math.inf


def test_cached_rows_equal_the_teachers_top_k(tiny_data: dict, teacher: Path, built: Path) -> None:
    cache, shard = TeacherCache(built), TokenShard(tiny_data["shards"], "train")
    assert cache.header["shard_dir"] == str(tiny_data["shards"])
    T, k = cache.seq_len, cache.top_k
    assert (T, k, cache.n_windows, cache.vocab_size) == (32, 8, 10, len(load_tokenizer(tiny_data["tok"])))
    windows = [7, 0, 3, 9]
    b = cache.batch(windows, shard)
    tokens = np.asarray(shard.tokens, dtype=np.int64)
    assert torch.equal(b.x, torch.from_numpy(np.stack([tokens[w * T : w * T + T] for w in windows])))
    assert torch.equal(b.y, torch.from_numpy(np.stack([tokens[w * T + 1 : w * T + T + 1] for w in windows])))
    assert (b.ids.dtype, b.logp.dtype, b.tail.dtype) == (torch.int64, torch.float32, torch.float32)
    assert (b.ids.shape, b.logp.shape, b.tail.shape) == ((4, T, k), (4, T, k), (4, T))

    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    assert cache.header["teacher_params"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = torch.log_softmax(model(b.x).logits.float(), dim=-1)  # (B, T, V)
    ref_top, ref_ids = ref.topk(k + 1, dim=-1)
    # The cached ids hold the true top-k log-probs, in order (tie-proof: compares values at the ids).
    torch.testing.assert_close(ref.gather(-1, b.ids), ref_top[..., :k], atol=1e-5, rtol=0)
    # And they are the same ids wherever no near-tie makes the order ambiguous.
    gap = ref_top[..., :-1] - ref_top[..., 1:]  # (B, T, k): to the next value, the (k+1)-th included
    left = torch.cat([torch.full_like(gap[..., :1], math.inf), gap[..., :-1]], dim=-1)
    clear = (gap > 1e-4) & (left > 1e-4)
    assert clear.float().mean() > 0.95
    assert torch.equal(b.ids[clear], ref_ids[..., :k][clear])
    # fp16 storage: within half a unit in the last place of an 11-bit mantissa.
    torch.testing.assert_close(b.logp, ref_top[..., :k], rtol=2**-11, atol=1e-6)
    tail_ref = torch.log(1 - ref_top[..., :k].double().exp().sum(-1))
    torch.testing.assert_close(b.tail.double(), tail_ref, atol=1e-5, rtol=0)
    assert (tail_ref < -0.05).all()  # the top-k leave real mass out: the tail is not trivially ~0


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-neox"])
def test_a_cache_of_another_family_holds_its_teachers_top_k(tiny_data: dict, tmp_path: Path, preset: str) -> None:
    teacher = save_teacher(tiny_data["tok"], tmp_path / "teacher", seed=0, preset=preset)
    cache_dir = tmp_path / "c"
    build_cache(cache_cfg(tiny_data, teacher, cache_dir, max_windows=3))
    b = TeacherCache(cache_dir).batch([2, 0], TokenShard(tiny_data["shards"], "train"))
    with torch.no_grad():
        ref = torch.log_softmax(AutoModelForCausalLM.from_pretrained(teacher)(b.x).logits.float(), dim=-1)
    torch.testing.assert_close(ref.gather(-1, b.ids), ref.topk(8, dim=-1).values, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.logp, ref.gather(-1, b.ids), rtol=2**-11, atol=1e-6)


def test_bytes_per_token_and_file_sizes(built: Path) -> None:
    cache = TeacherCache(built)
    assert cache.bytes_per_token() == 6 * 8 + 4 == cache.header["bytes_per_token"]
    n_rows = cache.header["n_rows"]
    assert n_rows == 10 * 32
    assert sum((built / f).stat().st_size for f in BINS) == n_rows * cache.bytes_per_token()
    assert [(built / f).stat().st_size // n_rows for f in BINS] == [8 * 4, 8 * 2, 4]


def test_interrupted_build_resumes_to_identical_files(
    tiny_data: dict, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "c"
    cfg = cache_cfg(tiny_data, teacher, out, batch_size=3)  # batches of 3, 3, 3, 1 windows
    straight = tmp_path / "straight"
    build_cache(cache_cfg(tiny_data, teacher, straight, batch_size=3))
    saved: list[tuple[int, bool]] = []
    write_json = teacher_cache.write_json

    def record(path: Path, data: dict) -> None:
        saved.append((data["windows_done"], data["complete"]))
        write_json(path, data)

    monkeypatch.setattr(teacher_cache, "write_json", record)
    monkeypatch.setattr(teacher_cache, "SAVE_EVERY_S", 0.0)  # save after every batch
    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, stop_after=2)
    assert saved == [(0, False), (3, False), (6, False), (6, False)]  # start, two blocks, the interrupt
    header = json.loads((out / "cache.json").read_text())
    assert header["windows_done"] == 6 and header["complete"] is False
    with pytest.raises(UserError, match=r"is incomplete \(6 of 10 windows\); finish it by rerunning"):
        TeacherCache(out)

    saved.clear()
    resumed = build_cache(cfg)
    assert resumed["windows_computed"] == 4 and not resumed["reused"]
    assert saved == [(9, False), (10, True)]  # went straight on from window 6
    for f in BINS:
        assert (out / f).read_bytes() == (straight / f).read_bytes(), f


def test_complete_cache_is_reused_and_another_teacher_refused(
    tiny_data: dict, teacher: Path, built: Path, tmp_path: Path
) -> None:
    before = {f: (built / f).stat().st_mtime_ns for f in (*BINS, "cache.json")}
    again = build_cache(cache_cfg(tiny_data, teacher, built))
    assert again["reused"] and again["windows_computed"] == 0 and again["complete"]
    assert {f: (built / f).stat().st_mtime_ns for f in before} == before

    other = save_teacher(tiny_data["tok"], tmp_path / "other", seed=1)
    fp = "'[0-9a-f]{16}'"
    with pytest.raises(
        UserError, match=rf"made with teacher_fingerprint {fp} \(teacher '.*teacher'\), not {fp} \(from"
    ):
        build_cache(cache_cfg(tiny_data, other, built))
    with pytest.raises(
        UserError, match=r"made with seq_len 32, not 16 \(from --seq-len\); pass another --out, or delete"
    ) as e:
        build_cache(cache_cfg(tiny_data, teacher, built, seq_len=16))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"made with top_k 8, not 4 \(from --top-k\)"):
        build_cache(cache_cfg(tiny_data, teacher, built, top_k=4))


def test_reader_checks_shards_and_windows(tiny_data: dict, built: Path, tmp_path: Path) -> None:
    cache = TeacherCache(built)
    cache.check_shards(tiny_data["shards"])
    other = tmp_path / "shards"
    other.mkdir()
    shutil.copy(tiny_data["shards"] / "train.bin", other / "train.bin")
    header = json.loads((tiny_data["shards"] / "train.json").read_text())
    (other / "train.json").write_text(json.dumps({**header, "corpus_fingerprint": "0" * 16}))
    with pytest.raises(ConfigError, match=r"corpus_fingerprint [0-9a-f]{16}, but the shards in .* have 0{16}; rebuild"):
        cache.check_shards(other)
    with pytest.raises(IndexError, match=r"indices in \[0, 10\)"):
        cache.batch([10], TokenShard(tiny_data["shards"], "train"))
    with pytest.raises(UserError, match="holds no cache.json; build the cache with `distil-codegpt cache-teacher"):
        TeacherCache(tmp_path / "nothing")


def test_cli_builds_a_cache_and_names_a_bad_top_k(
    tiny_data: dict, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "c"
    base = ["cache-teacher", "--teacher", str(teacher), "--data", str(tiny_data["data"])]
    base += ["--seq-len", "16", "--device", "cpu"]
    assert main([*base, "--out", str(out), "--max-windows", "5", "--top-k", "4"]) == 0
    header = json.loads((out / "cache.json").read_text())
    assert (header["complete"], header["n_windows"], header["n_rows"], header["top_k"]) == (True, 5, 80, 4)
    assert header["teacher"] == str(teacher) and header["precision"] == "fp32" and header["tokens_per_s"] > 0
    assert json.loads((out / "run.json").read_text())["stage"] == "cache-teacher"
    assert "cache-teacher: 5 windows x 16 = 80 tokens, top-4 of 1,200" in capsys.readouterr().out

    vocab = header["vocab_size"]
    assert main([*base, "--out", str(tmp_path / "bad"), "--top-k", str(vocab + 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the weight-loading progress bar
    assert err == (
        f"distil-codegpt cache-teacher: error: top_k: {vocab + 1} exceeds the teacher's vocabulary of {vocab};"
        f" use --top-k {vocab} or less"
    )
    assert main([*base, "--out", str(tmp_path / "bad"), "--top-k", "0"]) == 2
    assert "top_k: 0 is not allowed; use 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_tempered_tail_share_is_the_even_tails_share_of_the_tempered_buckets(built: Path) -> None:
    cache = TeacherCache(built)
    k, vocab, rows = cache.top_k, cache.vocab_size, 3 * cache.seq_len
    logp = np.fromfile(built / "train.logp.bin", dtype=np.float16)[: rows * k].reshape(rows, k).astype(np.float64)
    tail = np.exp(np.fromfile(built / "train.tail.bin", dtype=np.float32)[:rows].astype(np.float64))
    mass, share1, _ = cache.tempered_tail_share(1.0, windows=3)
    assert mass == pytest.approx(tail.mean()) and share1 == pytest.approx(tail.mean(), rel=1e-3)  # exact at T = 1
    for t in (2.0, 4.0):
        per_token = (vocab - k) * (tail / (vocab - k)) ** (1 / t)  # V - k tokens of tail / (V - k) each, tempered
        top = (np.exp(logp) ** (1 / t)).sum(1)
        _, share, median = cache.tempered_tail_share(t, windows=3)
        assert share == pytest.approx((per_token / (top + per_token)).mean(), rel=1e-6)
        assert median == pytest.approx(np.median(per_token / (top + per_token)), rel=1e-6) and share > share1
