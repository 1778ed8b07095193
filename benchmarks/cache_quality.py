"""What KD from a teacher cache costs in quality: the same student, same steps, online frozen KD vs the cache.

    make demo
    python benchmarks/cache_quality.py --teacher runs/demo/teacher --data runs/demo/data --out runs/cache-quality

Builds (or reuses) in --out: a student of --layers picked from the teacher, the teacher cache over the whole train
split, then, for each seed, distils that student with the same loss weights, steps and batch (alpha_cos 0: the cache
holds no hidden states), online with the frozen teacher and from the cache, and evaluates each on the first
--eval-limit line-completion examples. Prints dev loss, perplexity, EM, ES and training tokens/s of each run and
the means per way, and the cache's size.

Online KD draws windows at any offset, cached KD the cache's fixed grid of windows. --grid-online adds a third way,
online KD drawing the cache's grid, which tells the grid's share of a difference from the top-k's. Evaluation uses
at most --context positions (default: --seq-len, the positions training used; 0 = the model's whole context) and
--max-new-tokens 32, so that the input keeps context - 32 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from distil_codegpt.config import CacheTeacherConfig, DistilConfig, EvaluateConfig, StudentConfig, build_config
from distil_codegpt.distill.run import run_distil
from distil_codegpt.distill.teacher_cache import build_cache
from distil_codegpt.evaluate.run import run_evaluate
from distil_codegpt.model.student import build_student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="runs/demo/teacher")
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--out", default="runs/cache-quality")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337])
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--context", type=int, default=-1, help="evaluation positions (-1 = --seq-len, 0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--grid-online", action="store_true", help="also online KD on the cache's window grid")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    context = a.seq_len if a.context < 0 else a.context
    out = Path(a.out)
    init = out / f"init-{a.layers}"
    if not (init / "run.json").is_file():
        build_student(build_config(StudentConfig, {"teacher": a.teacher, "out": str(init), "layers": a.layers}))
    cache = build_cache(
        build_config(
            CacheTeacherConfig,
            {
                "teacher": a.teacher,
                "data": a.data,
                "out": str(out / "cache"),
                "top_k": a.top_k,
                "seq_len": a.seq_len,
                "device": a.device,
            },
        )  # fmt: skip
    )
    loop = {"data": a.data, "student": str(init), "max_steps": a.steps, "batch_size": a.batch_size,
            "seq_len": a.seq_len, "lr": a.lr, "warmup_steps": 20, "eval_every": 0, "save_every": 0,
            "temperature": a.temperature, "alpha_ce": 5.0, "alpha_clm": 2.0, "alpha_cos": 0.0, "device": a.device,
            "tensorboard": False, "local_share": 0.0}  # fmt: skip
    ways = {"online frozen": {"teacher": a.teacher}, "teacher cache": {"teacher_cache": str(out / "cache")}}
    if a.grid_online:
        ways["online, grid"] = {"teacher": a.teacher}
    rows = []
    for seed in a.seeds:
        for name, how in ways.items():
            run_dir = out / f"{name.replace(' ', '-').replace(',', '')}-T{a.temperature:g}-seed{seed}"
            metrics = _distil(run_dir, {**loop, **how, "seed": seed, "out": str(run_dir)}, grid=name == "online, grid")
            ev_dir = run_dir / f"eval-ctx{context}-new{a.max_new_tokens}-n{a.eval_limit}"
            if (ev_dir / "metrics.json").is_file():
                ev = json.loads((ev_dir / "metrics.json").read_text())
            else:
                ev = run_evaluate(
                    build_config(
                        EvaluateConfig,
                        {
                            "model": str(run_dir),
                            "test": f"{a.data}/line_completion/test.json",
                            "out": str(ev_dir),
                            "limit": a.eval_limit,
                            "latency_samples": 0,
                            "device": a.device,
                            "context": context,
                            "max_new_tokens": a.max_new_tokens,
                        },
                    )  # fmt: skip
                )
            tok_s = metrics["tokens"] / metrics["seconds"]
            rows.append((name, seed, metrics["dev_loss"], ev["exact_match"], ev["edit_sim"], tok_s))
    print(
        f"teacher {a.teacher}; {a.layers}-layer student; {a.steps} steps x {a.batch_size} x {a.seq_len} tokens,"
        f" T={a.temperature:g}; eval on {a.eval_limit} examples, context {context or 'all'},"
        f" max {a.max_new_tokens} new tokens"
    )
    print(
        f"cache: top-{cache['top_k']}, {cache['bytes_per_token']} bytes/token, {cache['n_rows']:,} tokens,"
        f" {cache['n_rows'] * cache['bytes_per_token'] / 1e9:.2f} GB, built in {cache['seconds']:.0f} s"
        f" ({cache['tokens_per_s']:,.0f} tokens/s)"
    )
    print(f"{'way':<15} {'seed':>5} {'dev loss':>9} {'EM':>6} {'ES':>6} {'train tok/s':>12}")
    for name, seed, loss, em, es, tok_s in rows:
        print(f"{name:<15} {seed:>5} {loss:>9.4f} {em:>6.2f} {es:>6.2f} {tok_s:>12,.0f}")
    for name in ways:
        mine = [r for r in rows if r[0] == name]
        mean = [statistics.mean(r[i] for r in mine) for i in (2, 3, 4)]
        print(f"{name + ' (mean)':<21} {mean[0]:>9.4f} {mean[1]:>6.2f} {mean[2]:>6.2f}")


def _distil(run_dir: Path, values: dict, grid: bool) -> dict:
    """run.json's metrics of a finished run, else the run; `grid` draws the windows of the cache's grid."""
    if (run_dir / "run.json").is_file():
        return json.loads((run_dir / "run.json").read_text())["metrics"]
    if not grid:
        return run_distil(build_config(DistilConfig, values))
    from distil_codegpt.data.shards import TokenShard

    plain = TokenShard.random_batch

    def grid_batch(self: TokenShard, batch_size: int, seq_len: int, generator: torch.Generator):  # noqa: ANN202
        w = torch.randint(self.num_windows(seq_len), (batch_size,), generator=generator).numpy()
        return self.grid_windows(w, seq_len)

    TokenShard.random_batch = grid_batch  # the cache's draw (same generator, same windows), online teacher
    try:
        return run_distil(build_config(DistilConfig, values))
    finally:
        TokenShard.random_batch = plain


if __name__ == "__main__":
    main()
