"""Throughput of the tokenizer and shard stages on a corpus, and what the tokenizer's layout costs in tokens.

    distil-codegpt corpus --out runs/bench/data
    python benchmarks/prepare_throughput.py runs/bench/data --vocab-size 8000 --threads 1 0

Each thread count runs in a fresh process, because the Rust thread pool is sized once per process.
Prints MB/s and tokens/s per stage, bytes per token, and the share of tokens that are a lone space in front of
an added token (`x <EOL>` -> `x`, `Ġ`, `<EOL>`): the price of exact round trips.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from distil_codegpt.config import TokenizerConfig, build_config
from distil_codegpt.data.shards import TokenShard
from distil_codegpt.data.tokenizer import load_tokenizer, train_tokenizer


def shards_run(data: str, tok: str, out: str, threads: int) -> dict:
    """Build shards in a child process with `threads` encoder threads (0 = all cores); its summary."""
    code = (
        "import json, sys; from distil_codegpt.config import ShardsConfig, build_config;"
        " from distil_codegpt.data.shards import build_shards;"
        " print(json.dumps(build_shards(build_config(ShardsConfig, json.loads(sys.argv[1])))))"
    )
    args = json.dumps({"data": data, "tokenizer": tok, "out": out, "workers": threads})
    done = subprocess.run([sys.executable, "-c", code, args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def lone_space_share(shard_dir: str, tok_dir: str) -> float:
    """Share of dev tokens that are a lone `Ġ` directly before an added (literal or marker) token."""
    tok = load_tokenizer(tok_dir)
    ids = TokenShard(shard_dir, "dev").tokens
    space = tok.convert_tokens_to_ids("Ġ")
    added = [i for i, t in tok.added_tokens_decoder.items() if not t.special]
    if len(ids) < 2 or not added:
        return 0.0
    before = (ids[:-1] == space) & np.isin(ids[1:], added)
    return float(before.sum()) / len(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="corpus directory (from `distil-codegpt corpus`)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="encoder threads to compare (0 = all)")
    a = p.parse_args()
    data = Path(a.data)
    mb = {s: (data / f"{s}.txt").stat().st_size / 1e6 for s in ("train", "dev", "test")}
    with tempfile.TemporaryDirectory() as tmp:
        tok = f"{tmp}/tok"
        t = train_tokenizer(build_config(TokenizerConfig, {"data": str(data), "out": tok, "vocab_size": a.vocab_size}))
        rows = [("tokenizer", "-", mb["train"], t["seconds"], None)]
        for threads in a.threads:
            s = shards_run(str(data), tok, f"{tmp}/shards{threads}", threads)
            rows.append(("shards", threads or "all", sum(mb.values()), s["seconds"], s["n_tokens"] / s["seconds"]))
        bytes_per_token = sum(mb.values()) * 1e6 / s["n_tokens"]
        share = lone_space_share(f"{tmp}/shards{a.threads[-1]}", tok)
    print(f"corpus {data}: {sum(mb.values()):.1f} MB, vocab {a.vocab_size}, {bytes_per_token:.2f} bytes/token")
    print(f"{'stage':<10} {'threads':>7} {'MB':>8} {'seconds':>8} {'MB/s':>7} {'tokens/s':>10}")
    for stage, threads, size, sec, tps in rows:
        tps_text = f"{tps:,.0f}" if tps else "-"
        print(f"{stage:<10} {threads!s:>7} {size:8.1f} {sec:8.2f} {size / sec:7.2f} {tps_text:>10}")
    print(f"lone spaces before added tokens: {share:.1%} of dev tokens")


if __name__ == "__main__":
    main()
