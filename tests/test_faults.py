"""Fault injection: each damaged artifact a verb reads ends in one line (what, which file, the fix) with exit code 2,
and leaves every earlier output as it was; hard kills resume to the uninterrupted result; a write that fails half
way keeps the previous file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distil_codegpt.artifacts import check_safetensors, first_line
from distil_codegpt.cli import main
from distil_codegpt.config import CacheTeacherConfig, CompressConfig, UserError, build_config
from distil_codegpt.data.shards import TokenShard, ensure_shards
from distil_codegpt.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from distil_codegpt.distill.checkpoint import checkpoint_path, previous_path
from distil_codegpt.distill.teacher_cache import build_cache
from distil_codegpt.model.presets import preset_config
from distil_codegpt.runinfo import atomic_open, open_log

REWRITE = "copy the model again, or rewrite it (`distil-codegpt train --resume` rewrites a training run's model)"
CONFIG_FIX = "fix it, or copy config.json again from where the model came from"
# a tiny training run: 2 layers, width 64, one thread so that runs in two processes agree bit for bit
LOOP = ["--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--warmup-steps", "1", "--threads", "1"]
LOOP += ["--eval-every", "0", "--log-every", "1", "--no-tensorboard", "--device", "cpu", "--lr", "3e-3"]


def snapshot(*dirs: Path) -> dict[str, str]:
    """sha256 of every file under the dirs: equal snapshots mean nothing was written, moved or left behind."""
    return {
        str(f): hashlib.sha256(f.read_bytes()).hexdigest() for d in dirs for f in sorted(d.rglob("*")) if f.is_file()
    }


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Exit code and the last stderr line (progress bars may come before it); no traceback anywhere."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, (err.strip().splitlines() or [""])[-1]


def cut(path: Path, keep: int | None = None) -> int:
    """Truncate a file to `keep` bytes (default: half), as a full disk or an interrupted copy leaves it."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2 if keep is None else keep)
    return size


@pytest.fixture(scope="module")
def model_dir(tiny_data: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny GPT-2 (2 layers, width 64) with the shared tokenizer: good enough to be damaged."""
    out = tmp_path_factory.mktemp("faults") / "model"
    tok = load_tokenizer(tiny_data["tok"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(preset_config("tiny", len(tok))).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def earlier(tmp_path: Path) -> Path:
    """An --out holding a previous run's output, which a failed run must leave as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"em": 12.5}\n')
    return out


@pytest.fixture()
def code(tmp_path: Path) -> Path:
    f = tmp_path / "code.py"
    f.write_text("def f(x):\n    return x\n")
    return f


def evaluate(tiny_data: dict, model: Path, out: Path) -> list[str]:
    test = tiny_data["data"] / "line_completion" / "test.json"
    return ["evaluate", "--model", model, "--test", test, "--out", out, "--limit", "2", "--latency-samples", "0"]


def unchanged(out: Path) -> str:
    return f" ({out}: nothing written, its earlier contents are unchanged)"


# ---------------------------------------------------------------- model directories


def test_truncated_weights(tiny_data: dict, model_dir: Path, tmp_path: Path, earlier: Path, capsys) -> None:
    bad = shutil.copytree(model_dir, tmp_path / "bad")
    size = cut(bad / "model.safetensors", 5000)
    before = snapshot(bad, earlier)
    rc, line = cli(capsys, *evaluate(tiny_data, bad, earlier))
    assert rc == 2
    assert line == (
        f"distil-codegpt evaluate: error: model: {bad}/model.safetensors: truncated (5,000 bytes, its tensors need"
        f" {size:,}); {REWRITE}{unchanged(earlier)}"
    )
    assert snapshot(bad, earlier) == before


def test_safetensors_header_check_is_exact(model_dir: Path, tmp_path: Path) -> None:
    good = model_dir / "model.safetensors"
    check_safetensors(good, fix="x")
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(good.read_bytes() + b"\0")
    with pytest.raises(UserError, match=r"longer than its header says \(.* bytes, its tensors need .*\); x$"):
        check_safetensors(longer, fix="x")
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(b"\x05\0")
    with pytest.raises(UserError, match=r"stub.safetensors: truncated or not a safetensors file \(2 bytes"):
        check_safetensors(stub, fix="x")


@pytest.mark.parametrize(
    ("config", "detail"),
    [
        ('"n_layer": "x"', "Field 'n_layer' expected int, got str (value: 'x')"),
        ("{", "not valid JSON (line 1, column 2: Expecting property name enclosed in double quotes)"),
    ],
)
def test_bad_config(model_dir: Path, tmp_path: Path, code: Path, config: str, detail: str, capsys) -> None:
    bad = shutil.copytree(model_dir, tmp_path / "bad")
    text = (bad / "config.json").read_text()
    text = text.replace('"n_layer": 2', config) if config.startswith('"') else config
    (bad / "config.json").write_text(text)
    before = snapshot(bad)
    rc, line = cli(capsys, "complete", code, "--model", bad)
    prefix = "model: " if config.startswith('"') else ""  # a file that is not JSON at all is named first
    assert (rc, line) == (2, f"distil-codegpt complete: error: {prefix}{bad}/config.json: {detail}; {CONFIG_FIX}")
    assert snapshot(bad) == before


def test_missing_tokenizer(tiny_data: dict, model_dir: Path, tmp_path: Path, earlier: Path, capsys) -> None:
    bad = shutil.copytree(model_dir, tmp_path / "bad")
    for f in bad.glob("tokenizer*"):
        f.unlink()
    before = snapshot(bad, earlier)
    rc, line = cli(capsys, *evaluate(tiny_data, bad, earlier))
    assert (rc, line) == (
        2,
        f"distil-codegpt evaluate: error: model: {bad} has no tokenizer (tokenizer.json); save the tokenizer with"
        f" the model or copy the tokenizer files it was trained with into that directory{unchanged(earlier)}",
    )
    assert snapshot(bad, earlier) == before


def test_tokenizer_larger_than_the_model(tiny_data: dict, tmp_path: Path, earlier: Path, code: Path, capsys) -> None:
    bad = tmp_path / "bad"
    tok = load_tokenizer(tiny_data["tok"])
    AutoModelForCausalLM.from_config(preset_config("tiny", 500)).save_pretrained(bad)
    tok.save_pretrained(bad)
    why = f"model: {bad} holds a tokenizer of {len(tok):,} tokens but a model with a vocabulary of 500; put the"
    why += " tokenizer the model was trained with next to it"
    rc, line = cli(capsys, *evaluate(tiny_data, bad, earlier))
    assert (rc, line) == (2, f"distil-codegpt evaluate: error: {why}{unchanged(earlier)}")
    rc, line = cli(capsys, "complete", code, "--model", bad)  # the engines that complete and serve check it too
    assert (rc, line) == (2, f"distil-codegpt complete: error: {why}")


def test_damaged_engine_spec(model_dir: Path, tmp_path: Path, code: Path, capsys) -> None:
    bad = shutil.copytree(model_dir, tmp_path / "spec")
    (bad / "engine.json").write_text('{"engine": "ctransl')
    rc, line = cli(capsys, "complete", code, "--model", bad)
    assert rc == 2 and line.startswith(f"distil-codegpt complete: error: {bad}/engine.json: not valid JSON (")
    assert line.endswith("); export or compress the model again")


def test_truncated_gguf(tiny_data: dict, tmp_path: Path, earlier: Path, monkeypatch, capsys) -> None:
    from test_gguf import tiny_model, write_gguf

    monkeypatch.setenv("DISTIL_CODEGPT_CACHE", str(tmp_path / "cache"))
    bad = write_gguf(tiny_model("llama"), tmp_path / "tiny.gguf")
    size = cut(bad)
    rc, line = cli(capsys, *evaluate(tiny_data, bad, earlier))
    assert rc == 2
    assert line.startswith(f"distil-codegpt evaluate: error: model: {bad}: truncated or corrupt GGUF ({size // 2:,}")
    assert line.endswith(f"); re-download it{unchanged(earlier)}"), line
    assert not [d for d in (tmp_path / "cache" / "gguf").iterdir() if d.is_dir()]  # nothing half-imported is kept


# ---------------------------------------------------------------- compressed and exported artifacts


def test_damaged_int8_artifact(model_dir: Path, tmp_path: Path, code: Path, capsys) -> None:
    from distil_codegpt.compress.run import run_compress

    art = tmp_path / "int8"
    run_compress(build_config(CompressConfig, {"model": str(model_dir), "out": str(art), "quantize": "int8"}))
    cut(art / "model_int8.bin")
    before = snapshot(art)
    rc, line = cli(capsys, "complete", code, "--model", art)
    assert rc == 2
    assert line.startswith(f"distil-codegpt complete: error: {art}/model_int8.bin: damaged (")
    assert line.endswith("); rebuild the artifact with `distil-codegpt compress --quantize int8`")
    assert snapshot(art) == before


@pytest.fixture(scope="module")
def ct2_engine(model_dir: Path) -> Path:
    pytest.importorskip("ctranslate2")
    from distil_codegpt.compress.export import run_export
    from distil_codegpt.config import ExportConfig

    out = model_dir.parent / "ct2"
    run_export(build_config(ExportConfig, {"model": str(model_dir), "out": str(out)}))
    return out


def test_damaged_ctranslate2_engine(ct2_engine: Path, tmp_path: Path, code: Path, capsys) -> None:
    again = f"export it again with `distil-codegpt export --model {ct2_engine.parent / 'model'} --out NEW_DIR`"
    bad = shutil.copytree(ct2_engine, tmp_path / "cut")
    cut(bad / "model.bin")
    rc, line = cli(capsys, "complete", code, "--model", bad)
    assert rc == 2
    assert line.startswith(f"distil-codegpt complete: error: model: CTranslate2 cannot load {bad}/model.bin on cpu (")
    assert line.endswith(f"); {again}")

    bad = shutil.copytree(ct2_engine, tmp_path / "vocab")
    vocab = json.loads((bad / "vocabulary.json").read_text())
    (bad / "vocabulary.json").write_text(json.dumps(vocab[:-1]))
    rc, line = cli(capsys, "complete", code, "--model", bad)
    assert (rc, line) == (
        2,
        f"distil-codegpt complete: error: model: {bad}/vocabulary.json lists {len(vocab) - 1:,} tokens, the"
        f" tokenizer in {bad} {len(vocab):,}; {again}",
    )


# ---------------------------------------------------------------- data: shards, caches, line-completion files


def test_shard_shorter_than_its_header(tiny_data: dict, tmp_path: Path) -> None:
    data = shutil.copytree(tiny_data["data"], tmp_path / "data")
    shard_dir = data / "shards" / tokenizer_fingerprint(tiny_data["tok"])
    whole = (shard_dir / "train.bin").read_bytes()
    cut(shard_dir / "train.bin")
    n = json.loads((shard_dir / "train.json").read_text())["n_tokens"]
    with pytest.raises(UserError) as e:
        TokenShard(shard_dir, "train")
    assert str(e.value) == (
        f"{shard_dir}/train.bin: truncated ({len(whole) // 2:,} bytes, its header says {2 * n:,}); build the shards"
        f" with `distil-codegpt shards --data DATA --tokenizer TOK --out {shard_dir}`"
    )
    # where the verbs get their shards, a damaged one is rebuilt: the same ids as before
    assert ensure_shards(data, tiny_data["tok"], ("train",)) == shard_dir
    assert (shard_dir / "train.bin").read_bytes() == whole


def test_cache_from_another_tokenizer(tiny_data: dict, model_dir: Path, tmp_path: Path, capsys) -> None:
    data = shutil.copytree(tiny_data["data"], tmp_path / "data")
    cache = tmp_path / "cache"
    values = {"teacher": str(model_dir), "data": str(data), "tokenizer": str(tiny_data["tok"]), "out": str(cache)}
    values = {**values, "seq_len": 32, "max_windows": 4}
    build_cache(build_config(CacheTeacherConfig, {**values, "top_k": 4, "device": "cpu"}))
    other = shutil.copytree(
        tiny_data["tok"], tmp_path / "other-tok"
    )  # the same vocabulary in another file: another tokenizer
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text() + "\n")
    before = snapshot(cache)
    rc, line = cli(
        capsys,
        *["distil", "--teacher-cache", cache, "--student", model_dir, "--data", data, "--tokenizer", other],
        *["--out", tmp_path / "student", "--max-steps", "1", *LOOP],
    )
    fp, other_fp = tokenizer_fingerprint(tiny_data["tok"]), tokenizer_fingerprint(other)
    assert (rc, line) == (
        2,
        f"distil-codegpt distil: error: teacher_cache: {cache} was built with tokenizer_fingerprint {fp}, but the"
        f" shards in {data}/shards/{other_fp} have {other_fp}; rebuild the cache for this data with `distil-codegpt"
        " cache-teacher --out NEW_DIR`",
    )
    assert snapshot(cache) == before


def test_malformed_line_completion_file(tiny_data: dict, model_dir: Path, tmp_path: Path, earlier, capsys) -> None:
    test = tmp_path / "test.json"
    lines = (tiny_data["data"] / "line_completion" / "test.json").read_text().splitlines()[:4]
    lines[2] = lines[2][: len(lines[2]) // 2]
    test.write_text("\n".join(lines) + "\n")
    rc, line = cli(capsys, "evaluate", "--model", model_dir, "--test", test, "--out", earlier)
    assert (rc, line) == (
        2,
        f"distil-codegpt evaluate: error: {test}:3: not a JSON object with 'input' and 'gt'; fix that line or rebuild"
        f" the file with `distil-codegpt corpus`{unchanged(earlier)}",
    )


# ---------------------------------------------------------------- checkpoints, hard kills, failed writes


def train(tiny_data: dict, out: Path, *extra: str) -> list[str]:
    base = ["train", "--model", "tiny", "--data", tiny_data["data"], "--tokenizer", tiny_data["tok"], "--out", out]
    return [str(a) for a in (*base, *LOOP, *extra)]


def test_damaged_last_checkpoint_offers_the_previous(tiny_data: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(train(tiny_data, out, "--max-steps", "4", "--save-every", "3")) == 0
    last, prev = checkpoint_path(out), previous_path(out)
    assert torch.load(prev, weights_only=False)["step"] == 3 and torch.load(last, weights_only=False)["step"] == 4
    cut(last)
    try:
        torch.load(last, weights_only=False)
    except RuntimeError as e:
        why = first_line(e)
    before = snapshot(out)
    rc, line = cli(capsys, *train(tiny_data, out, "--max-steps", "6", "--resume"))
    assert (rc, line) == (
        2,
        f"distil-codegpt train: error: {last}: damaged checkpoint ({why}); the previous one is intact (step 3):"
        f" `mv {prev} {last}` and rerun with --resume{unchanged(out)}",
    )
    assert snapshot(out) == before
    os.replace(prev, last)  # what the line says to do
    assert main(train(tiny_data, out, "--max-steps", "6", "--resume")) == 0
    assert torch.load(last, weights_only=False)["step"] == 6


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL the process as soon as `ready()` holds; fails if it finished first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _logged_steps(out: Path) -> int:
    log = out / "metrics.jsonl"
    return log.read_text().count('"loss"') if log.is_file() else 0


def test_kill_9_mid_training_resumes_to_the_same_weights(tiny_data: dict, tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ["--max-steps", "12", "--save-every", "1"]
    assert main(train(tiny_data, straight, *args)) == 0
    at = random.randint(2, 8)
    script = "import sys; from distil_codegpt.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *train(tiny_data, killed, *args)], env=env, stderr=subprocess.DEVNULL
    )
    kill_when(proc, lambda: _logged_steps(killed) >= at)
    assert not (killed / "run.json").exists()
    step = torch.load(checkpoint_path(killed), weights_only=False)["step"]
    assert at - 1 <= step < 12, (at, step)
    assert main(train(tiny_data, killed, *args, "--resume")) == 0
    assert all(json.loads(ln) for ln in (killed / "metrics.jsonl").read_text().splitlines())  # no line cut short
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed at step {step}"


def test_a_log_line_cut_by_a_kill_is_dropped_before_appending(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "lo')
    with open_log(log) as f:
        f.write('{"step": 2}\n')
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_kill_9_mid_cache_build_resumes_to_the_same_files(tiny_data: dict, model_dir: Path, tmp_path: Path) -> None:
    bins = ("train.ids.bin", "train.logp.bin", "train.tail.bin")
    values = {"teacher": str(model_dir), "data": str(tiny_data["data"]), "tokenizer": str(tiny_data["tok"])}
    values = {**values, "seq_len": 16, "top_k": 4, "max_windows": 40, "batch_size": 2, "device": "cpu", "threads": 1}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    build_cache(build_config(CacheTeacherConfig, {**values, "out": str(straight)}))
    # in the child: progress saved after every batch, and batches slowed so that the kill lands mid-build
    script = (
        "import sys, time; from distil_codegpt.distill import teacher_cache as tc; tc.SAVE_EVERY_S = 0.0;"
        " f = tc.top_k_logprobs; tc.top_k_logprobs = lambda *a: (time.sleep(0.03), f(*a))[1];"
        " from distil_codegpt.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "cache-teacher", *flags, f"--out={killed}"], stderr=subprocess.DEVNULL
    )
    at = random.randint(4, 30)

    def done() -> int:
        try:
            return json.loads((killed / "cache.json").read_text())["windows_done"]
        except (OSError, ValueError, KeyError):
            return 0

    kill_when(proc, lambda: done() >= at)
    assert not json.loads((killed / "cache.json").read_text())["complete"]
    resumed = build_cache(build_config(CacheTeacherConfig, {**values, "out": str(killed)}))
    assert 0 < resumed["windows_computed"] < 40
    for f in bins:
        assert (killed / f).read_bytes() == (straight / f).read_bytes(), (f, at)


def test_a_write_failing_half_way_keeps_the_previous_model(tiny_data: dict, tmp_path: Path, monkeypatch, capsys):
    import transformers.modeling_utils as mu

    out = tmp_path / "run"
    assert main(train(tiny_data, out, "--max-steps", "2")) == 0
    model_files = ("model.safetensors", "config.json", "tokenizer.json")
    before = {f: (out / f).read_bytes() for f in model_files}
    real = mu.safe_save_file

    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        real(tensors, filename, metadata=metadata)
        cut(Path(filename))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(mu, "safe_save_file", disk_full)
    rc, line = cli(capsys, *train(tiny_data, out, "--max-steps", "4", "--resume"))
    assert (rc, line) == (
        2,
        f"distil-codegpt train: error: {out}/model.safetensors: not written (No space left on device); the previous"
        f" version, if any, is unchanged; free disk space and rerun ({out}: wrote checkpoints/last.pt; not written:"
        " run.json, the stage did not finish)",
    )
    assert {f: (out / f).read_bytes() for f in model_files} == before
    assert not list(out.glob(".staged.*"))
    check_safetensors(out / "model.safetensors", fix="")


def test_a_text_write_failing_half_way_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "predictions.txt"
    target.write_text("old\n")
    with pytest.raises(UserError) as e, atomic_open(target) as f:
        f.write("new\n" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(e.value) == (
        f"{target}: not written (No space left on device); the previous version, if any, is unchanged; free disk"
        " space and rerun"
    )
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["predictions.txt"]
