import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tokenizer import DOCS, RAW_DOCS, RAW_VOCAB, VOCAB, train, write_corpus

import distil_codegpt.data.shards as shards
from distil_codegpt.config import ShardsConfig, UserError, build_config
from distil_codegpt.data.shards import TokenShard, build_shards, ensure_shards, token_dtype
from distil_codegpt.data.tokenizer import load_tokenizer, tokenizer_fingerprint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data dir, tokenizer dir) for the normalised test documents."""
    base = tmp_path_factory.mktemp("shards")
    data = write_corpus(base / "data", DOCS)
    train(data, base / "tok", min_frequency=1)
    return data, base / "tok"


def build(data: Path, tok: Path, **kw) -> dict:
    return build_shards(build_config(ShardsConfig, {"data": str(data), "tokenizer": str(tok), **kw}))


def split_docs(data: Path, split: str) -> list[str]:
    return (data / f"{split}.txt").read_text(encoding="utf-8").splitlines()


def test_bin_is_the_concatenation_of_every_document(corpus: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    data, tok_dir = corpus
    monkeypatch.setattr(shards, "CHUNK_DOCS", 3)  # several chunks per split
    out = tmp_path / "shards"
    summary = build(data, tok_dir, out=str(out))
    assert summary["out"] == str(out) and not summary["reused"]
    tok = load_tokenizer(tok_dir)
    for split in ("train", "dev", "test"):
        docs = split_docs(data, split)
        per_doc = [tok.encode(d, add_special_tokens=False) for d in docs]
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16)
        assert ids.tolist() == [i for doc in per_doc for i in doc]
        header = json.loads((out / f"{split}.json").read_text())
        assert header["n_tokens"] == len(ids) == summary["splits"][split]["n_tokens"]
        assert header["n_docs"] == len(docs) and header["vocab_size"] == VOCAB and header["dtype"] == "uint16"
        assert header["tokenizer_fingerprint"] == tokenizer_fingerprint(tok_dir)
        starts = np.load(out / f"{split}.idx.npy")
        assert starts.dtype == np.int64
        assert starts.tolist() == np.cumsum([0] + [len(d) for d in per_doc[:-1]]).tolist()
        assert (ids[starts] == tok.bos_token_id).all() and (ids[starts[1:] - 1] == tok.eos_token_id).all()
        assert TokenShard(out, split).doc_starts().tolist() == starts.tolist()
    assert not list(out.glob("*.tmp"))


def test_raw_documents_are_wrapped_in_bos_and_eos(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", RAW_DOCS, "raw")
    train(data, tmp_path / "tok", vocab_size=RAW_VOCAB, min_frequency=1)
    tok = load_tokenizer(tmp_path / "tok")
    shard = TokenShard(build(data, tmp_path / "tok", splits=["train"])["out"], "train")
    expected = [[tok.bos_token_id, *tok.encode(d, add_special_tokens=False), tok.eos_token_id] for d in RAW_DOCS]
    assert shard.tokens.tolist() == [i for doc in expected for i in doc]
    assert shard.n_docs == len(RAW_DOCS)


def test_dtype_is_the_smallest_that_holds_every_id() -> None:
    assert token_dtype(600) == np.uint16
    assert token_dtype(65_536) == np.uint16  # ids 0..65535
    assert token_dtype(65_537) == np.uint32
    assert token_dtype(50_257) == np.uint16


@pytest.mark.parametrize("make_generator", [lambda: torch.Generator().manual_seed(3), lambda: np.random.default_rng(3)])
def test_random_windows_are_slices_of_the_tokens(corpus: tuple[Path, Path], make_generator) -> None:
    data, tok_dir = corpus
    shard = TokenShard(build(data, tok_dir, splits=["train"])["out"], "train")
    tokens = torch.from_numpy(np.fromfile(shard.base.with_suffix(".bin"), dtype=np.uint16).astype(np.int64))
    assert len(shard) == len(tokens) and shard.vocab_size == VOCAB and shard.n_docs == len(DOCS)
    batch_size, seq_len = 8, 16
    x, y = shard.random_batch(batch_size, seq_len, make_generator())
    assert x.shape == y.shape == (batch_size, seq_len) and x.dtype == y.dtype == torch.int64
    # one int64 copy of the windows; x and y are views of it (no second copy)
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    assert torch.equal(x[:, 1:], y[:, :-1])
    # The same generator state gives the same starts, so each row is the slice at its start.
    gen = make_generator()
    high = len(tokens) - seq_len
    starts = (
        torch.randint(high, (batch_size,), generator=gen)
        if isinstance(gen, torch.Generator)
        else gen.integers(0, high, batch_size)
    )
    for row, s in enumerate(int(s) for s in starts):
        assert torch.equal(x[row], tokens[s : s + seq_len]) and torch.equal(y[row], tokens[s + 1 : s + seq_len + 1])
    # Every start is possible, including the last one whose target is the final token.
    _, y = shard.random_batch(200, len(tokens) - 2, make_generator())
    assert (y[:, -1] == tokens[-1]).any() and (y[:, -1] == tokens[-2]).any()


def test_sequential_windows_cover_the_tokens_in_order(corpus: tuple[Path, Path]) -> None:
    data, tok_dir = corpus
    shard = TokenShard(build(data, tok_dir, splits=["dev"])["out"], "dev")
    tokens = torch.from_numpy(np.asarray(shard.tokens).astype(np.int64))
    seq_len, batch_size = 7, 5
    batches = list(shard.sequential_batches(batch_size, seq_len))
    n_windows = (len(tokens) - 1) // seq_len
    assert shard.num_windows(seq_len) == n_windows
    assert [len(x) for x, _ in batches] == [batch_size] * (n_windows // batch_size) + (
        [n_windows % batch_size] if n_windows % batch_size else []
    )
    x = torch.cat([x for x, _ in batches]).flatten()
    y = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(x, tokens[: n_windows * seq_len]) and torch.equal(y, tokens[1 : n_windows * seq_len + 1])


def test_up_to_date_shards_are_reused_and_stale_ones_rebuilt(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "data", DOCS)
    tok_dir = tmp_path / "tok"
    train(data, tok_dir, min_frequency=1)
    out = tmp_path / "shards"
    first = build(data, tok_dir, out=str(out))
    mtime = (out / "train.bin").stat().st_mtime_ns
    again = build(data, tok_dir, out=str(out))
    assert again["reused"] and again["splits"] == {k: {**v, "reused": True} for k, v in first["splits"].items()}
    assert (out / "train.bin").stat().st_mtime_ns == mtime
    # A different tokenizer in the same place: its fingerprint no longer matches the headers.
    train(data, tok_dir, vocab_size=VOCAB - 20, min_frequency=1)
    rebuilt = build(data, tok_dir, out=str(out))
    assert not any(s["reused"] for s in rebuilt["splits"].values())
    assert (out / "train.bin").stat().st_mtime_ns != mtime
    assert TokenShard(out, "train").header["tokenizer_fingerprint"] == tokenizer_fingerprint(tok_dir)
    # A changed corpus is noticed too, and so is a truncated .bin.
    (data / "dev.txt").write_text("<s> x = <NUM_LIT:1> </s>\n")
    assert not build(data, tok_dir, out=str(out), splits=["dev"])["reused"]
    assert TokenShard(out, "dev").n_docs == 1
    with open(out / "test.bin", "r+b") as f:
        f.truncate(4)
    assert not build(data, tok_dir, out=str(out), splits=["test"])["reused"]


def test_ensure_shards_builds_once_in_the_default_place(corpus: tuple[Path, Path]) -> None:
    data, tok_dir = corpus
    out = ensure_shards(data, tok_dir)
    assert out == data / "shards" / tokenizer_fingerprint(tok_dir)
    assert all((out / f"{s}.json").is_file() for s in ("train", "dev", "test"))
    assert ensure_shards(data, tok_dir) == out


def test_an_interrupted_build_leaves_no_shard_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    data = write_corpus(tmp_path / "data", DOCS * 60)  # more than one chunk of documents
    train(data, tmp_path / "tok", min_frequency=1)
    out = tmp_path / "shards"
    build(data, tmp_path / "tok", out=str(out), splits=["train"])
    (data / "train.txt").write_text((data / "train.txt").read_text() + "<s> pass </s>\n")
    encode = shards.encode_documents
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(*args)

    monkeypatch.setattr(shards, "CHUNK_DOCS", 512)
    monkeypatch.setattr(shards, "encode_documents", failing)
    with pytest.raises(KeyboardInterrupt):
        build(data, tmp_path / "tok", out=str(out), splits=["train"])
    assert not (out / "train.json").exists() and not list(out.glob("*.tmp"))
    with pytest.raises(UserError, match="train.json: missing; build the shards"):
        TokenShard(out, "train")


def test_too_short_split_and_format_mismatch_are_clear_errors(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    data, tok_dir = corpus
    shard = TokenShard(build(data, tok_dir, splits=["dev"])["out"], "dev")
    with pytest.raises(UserError, match=f"dev shard: {len(shard)} tokens, fewer than seq_len \\+ 1"):
        shard.random_batch(2, len(shard), torch.Generator())
    with pytest.raises(UserError, match="use a shorter seq_len"):
        next(shard.sequential_batches(2, len(shard)))
    shard.random_batch(2, len(shard) - 1, torch.Generator())  # the longest that fits
    raw = write_corpus(tmp_path / "raw", RAW_DOCS, "raw")
    with pytest.raises(UserError, match="trained on a codexglue corpus but .* is raw; train a tokenizer"):
        build(raw, tok_dir)


def test_grid_windows_are_the_windows_sequential_batches_walks(corpus: tuple[Path, Path]) -> None:
    data, tok_dir = corpus
    shard = TokenShard(build(data, tok_dir, splits=["train"])["out"], "train")
    seq_len = 8
    xs, ys = zip(*shard.sequential_batches(4, seq_len))
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    picks = np.array([3, 0, shard.num_windows(seq_len) - 1, 3])
    x, y = shard.grid_windows(picks, seq_len)
    assert torch.equal(x, x_all[picks]) and torch.equal(y, y_all[picks])
