"""What KD from a teacher cache costs in quality: the same student, same steps, online frozen KD vs the cache.

    make demo
    python benchmarks/cache_quality.py --teacher runs/demo/teacher --data runs/demo/data --out runs/cache-quality

Builds (or reuses) in --out: a student of --layers picked from the teacher, the teacher cache over the whole train
split, then distils that student twice with the same loss weights, steps, batch and seed (alpha_cos 0: the cache
holds no hidden states), once online with the frozen teacher and once from the cache, and evaluates both on the
first --eval-limit line-completion examples. Prints dev loss, perplexity, EM, ES and training tokens/s of each,
and the cache's size. Online KD draws windows at any offset, cached KD the cache's fixed grid of windows: the
comparison includes that difference, as a user switching to the cache would get it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    p.add_argument("--device", default="auto")
    a = p.parse_args()
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
            "alpha_ce": 5.0, "alpha_clm": 2.0, "alpha_cos": 0.0, "device": a.device, "tensorboard": False}  # fmt: skip
    ways = {"online frozen": {"teacher": a.teacher}, "teacher cache": {"teacher_cache": str(out / "cache")}}
    rows = []
    for name, how in ways.items():
        run_dir = out / name.replace(" ", "-")
        if (run_dir / "run.json").is_file():
            metrics = json.loads((run_dir / "run.json").read_text())["metrics"]
        else:
            metrics = run_distil(build_config(DistilConfig, {**loop, **how, "out": str(run_dir)}))
        ev_dir = run_dir / "eval"
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
                    },
                )  # fmt: skip
            )
        tok_s = metrics["tokens"] / metrics["seconds"]
        rows.append((name, metrics["dev_loss"], metrics["dev_ppl"], ev["exact_match"], ev["edit_sim"], tok_s))
    print(
        f"teacher {a.teacher}; {a.layers}-layer student; {a.steps} steps x {a.batch_size} x {a.seq_len} tokens;"
        f" eval on {a.eval_limit} examples"
    )
    print(
        f"cache: top-{cache['top_k']}, {cache['bytes_per_token']} bytes/token, {cache['n_rows']:,} tokens,"
        f" {cache['n_rows'] * cache['bytes_per_token'] / 1e9:.2f} GB, built in {cache['seconds']:.0f} s"
        f" ({cache['tokens_per_s']:,.0f} tokens/s)"
    )
    print(f"{'way':<15} {'dev loss':>9} {'dev ppl':>8} {'EM':>6} {'ES':>6} {'train tok/s':>12}")
    for name, loss, ppl, em, es, tok_s in rows:
        print(f"{name:<15} {loss:>9.4f} {ppl:>8.2f} {em:>6.2f} {es:>6.2f} {tok_s:>12,.0f}")


if __name__ == "__main__":
    main()
