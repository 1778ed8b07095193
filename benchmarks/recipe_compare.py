"""Student recipes compared at one fixed budget of training minutes on this machine, every training stage counted:
the cut's scoring (layer and width importance), the local stage, global KD. Evaluation is not counted.

    python benchmarks/recipe_compare.py --teacher TEACHER --data DATA --root runs/recipe60            # every row
    python benchmarks/recipe_compare.py ... --rows mix-local,width-local --curve mix-local,width-local
    python benchmarks/recipe_table.py runs/recipe60 teacher-eval depth depth-local width ...            # the table

Rows (students at <= 50% of SmolLM2-135M's multiply-adds per token, head included):

  depth, depth-local       10 of 30 blocks (influence pick): 47.4% of the teacher's compute
  width, width-local       30 blocks, 6 of 9 heads (2 of 3 KV groups), MLPs of 384 of 1,536: 49.0%
  mix, mix-local           20 blocks (influence) with MLPs of 600: 49.6%
  width-local-lr3e-4, width-local-lr3e-3    the learning-rate bracket of global KD around 1e-3 (the real study's
                           best and largest) for the best cut measured; they share width-local's local stage (at 1e-3)
  width-local-trim         width-local with its head trimmed to the ids of the corpus (`compress --trim-vocab`): a
                           speed row (our engine only; GGUF cannot hold a trimmed head), no training of its own
  ROW@N                    another run of ROW (N = 2, 3, ...) into ROOT/ROW@N, sharing its cut and local stage: a
                           learning curve for a row already trained without one (`--curve width-local@2`), or the
                           spread between two runs of one recipe

A `-local` row spends --local-share of what the cut's scoring left in the local stage (each block learns its span of
teacher blocks), the rest in logit KD (forward KL, T = 1, the frozen teacher); the others spend it all in logit KD.
Rows named in --curve also save the student at each quarter of the budget (`distil --snapshots 4`), and every
snapshot is evaluated: ES kept against minutes.

`--no-eval` trains the rows back to back and leaves their evaluations to the same command run without it (the
evaluations time a batch-1 line too, so they want idle cores as much as training does).

Every step is skipped when its run.json is there and a training stage cut short resumes from its checkpoint, so the
same command continues after an interruption; run it on an otherwise idle machine (the budget is wall-clock).

The minutes buy different tokens on different machines (the width cut's global KD ran at 142 tokens/s on one
2-core machine and 62 on another), so rows compare only within one machine: the first run writes ROOT/machine.json
(the processor and an fp32 matrix-product probe, GFLOP/s on the threads training uses), and every later run measures
the probe again and stops with both figures if they differ by more than --machine-tolerance (--other-machine goes on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from distil_codegpt.runinfo import machine_info

CUTS = {
    "depth": ["--layers", "10", "--pick", "influence"],
    "width": ["--layers", "30", "--heads", "6", "--ffn", "384"],
    "mix": ["--layers", "20", "--pick", "influence", "--ffn", "600"],
}
# row -> (cut, local stage first, learning rate, trimmed head)
ROWS = {
    "depth": ("depth", False, 1e-3, False),
    "depth-local": ("depth", True, 1e-3, False),
    "width": ("width", False, 1e-3, False),
    "width-local": ("width", True, 1e-3, False),
    "mix": ("mix", False, 1e-3, False),
    "mix-local": ("mix", True, 1e-3, False),
    "width-local-lr3e-4": ("width", True, 3e-4, False),
    "width-local-lr3e-3": ("width", True, 3e-3, False),
    "width-local-trim": ("width", True, 1e-3, True),
}


def cli() -> list[str]:
    return [sys.executable, "-m", "distil_codegpt.cli"]


def run(cmd: list[str], out: Path) -> dict:
    """The step's run.json, running it first unless it is there (resuming a training stage cut short)."""
    done = out / "run.json"
    if not done.is_file():
        resume = ["--resume"] if (out / "checkpoints").is_dir() else []
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd[3:] + resume)}", flush=True)
        if subprocess.run(cmd + resume).returncode:
            sys.exit(f"error: {out.name} failed (above); rerun the same command to continue")
    return json.loads(done.read_text())


def probe_gflops(n: int = 1024, seconds: float = 3.0) -> float:
    """fp32 matrix products of n x n on this process's threads: the best GFLOP/s of 5 rounds of ~seconds/5."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = 0.0
    for _ in range(5):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 5:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / elapsed / 1e9)
    return best


def check_machine(root: Path, tolerance: float, other_ok: bool, gflops: float | None = None) -> str:
    """Record this machine in root/machine.json on first use; later, compare: a message, or exit if it differs."""
    gflops = probe_gflops() if gflops is None else gflops
    here = {**machine_info(), "probe_gflops": round(gflops, 1)}
    path = root / "machine.json"
    if not path.is_file():
        path.write_text(json.dumps(here, indent=1) + "\n")
        return f"machine: {here['cpu']}, {here['cores']} cores, probe {gflops:.1f} GFLOP/s (recorded in {path})"
    ref = json.loads(path.read_text())
    ratio = gflops / ref["probe_gflops"]
    line = (f"machine: {here['cpu']}, probe {gflops:.1f} GFLOP/s; the rows of {root} were trained on {ref['cpu']}"
            f" at {ref['probe_gflops']:.1f} ({ratio:.2f}x)")  # fmt: skip
    if abs(ratio - 1) > tolerance and not other_ok:
        sys.exit(f"error: {line}: its minutes would buy other tokens; use another --root, or --other-machine")
    return line


def minutes_of(r: dict, key: str = "train_seconds") -> float:
    m = r.get("metrics") or {}
    return float(m.get(key, r.get("seconds", 0.0))) / 60


def evaluate(a: argparse.Namespace, model: Path, out: Path) -> None:
    if a.no_eval:
        return
    cmd = cli() + ["evaluate", "--model", str(model), "--test", str(Path(a.data) / "line_completion" / "test.json")]
    cmd += ["--limit", str(a.examples), "--context", "1024", "--max-new-tokens", "48", "--batch-size", "8"]
    cmd += ["--latency-samples", str(a.latency_samples), "--out", str(out)]
    run(cmd, out)


def recipe(name: str) -> tuple[str, bool, float, bool]:
    """A row's (cut, local stage first, learning rate, trimmed head); ROW@N (N >= 2) is another run of ROW."""
    base, at, repeat = name.partition("@")
    if base not in ROWS or (at and not (repeat.isdigit() and int(repeat) >= 2)):
        raise KeyError(name)
    return ROWS[base]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="the teacher's model directory")
    p.add_argument("--data", required=True, help="the corpus (raw format, with line_completion/test.json and shards)")
    p.add_argument("--root", required=True, help="where the cuts, students and evaluations go")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--curve", default="", help="rows whose student is also saved and evaluated at each quarter")
    p.add_argument("--minutes", type=float, default=60.0, help="training minutes per row, every stage counted")
    p.add_argument("--local-share", type=float, default=0.25, help="the local stage's share of a -local row")
    p.add_argument("--examples", type=int, default=500, help="line completions evaluated (the same for every row)")
    p.add_argument("--latency-samples", type=int, default=10)
    p.add_argument(
        "--no-eval", action="store_true", help="train only (rows back to back); the same command without it evaluates"
    )
    p.add_argument("--machine-tolerance", type=float, default=0.15, help="the probe's largest relative difference")
    p.add_argument("--other-machine", action="store_true", help="train even if the probe differs from ROOT's")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args()
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    curve = {r.strip() for r in a.curve.split(",") if r.strip()}
    unknown = []
    for r in rows + sorted(curve):
        try:
            recipe(r)
        except KeyError:
            unknown.append(r)
    if unknown:
        rows_known = ",".join(ROWS)
        sys.exit(
            f"error: --rows/--curve: unknown {', '.join(unknown)}; choose from {rows_known}, or ROW@N: another run"
        )
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    print(check_machine(root, a.machine_tolerance, a.other_machine), flush=True)
    evaluate(a, Path(a.teacher), root / "teacher-eval")
    loop = ["--data", a.data, "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--schedule", "cosine"]
    loop += ["--warmup-steps", "10", "--eval-every", "0", "--eval-batches", "8", "--save-every", "20"]
    loop += ["--max-steps", str(10**9), "--temperature", "1", "--alpha-ce", "1", "--alpha-clm", "0", "--alpha-cos", "0"]
    for name in rows:
        cut_name, local, lr, trim = recipe(name)
        cut = root / f"cut-{cut_name}"
        scoring = minutes_of(
            run(cli() + ["student", "--teacher", a.teacher, "--data", a.data, "--out", str(cut)] + CUTS[cut_name], cut),
            "seconds",
        )
        if trim:  # the trained row's student, its head trimmed: no training of its own
            row, at, repeat = name.partition("@")
            base = root / (row.removesuffix("-trim") + at + repeat)  # width-local-trim@2 trims width-local@2
            if not (base / "run.json").is_file():
                print(f"skip {name}: train {base.name} first (--rows {base.name},{name})")
                continue
            out = root / name
            run(cli() + ["compress", "--model", str(base), "--trim-vocab", a.data, "--out", str(out)], out)
            evaluate(a, out, out / "eval")
            continue
        left = a.minutes - scoring
        start, spent = cut, 0.0
        common = ["--teacher", a.teacher, "--lr", f"{lr:g}", *loop]
        if local:  # one local stage per cut, at the base rate: the bracket's rows share it and differ in KD only
            out = root / f"local-{cut_name}"
            r = run(
                cli()
                + [
                    "distil",
                    "--stage",
                    "local",
                    "--student",
                    str(start),
                    "--out",
                    str(out),
                    "--max-minutes",
                    f"{a.local_share * left:.4f}",
                    "--teacher",
                    a.teacher,
                    "--lr",
                    "0.001",
                    *loop,
                ],
                out,
            )
            start, spent = out, minutes_of(r)
        out = root / name
        snap = ["--snapshots", "4"] if name in curve else []
        run(
            cli()
            + [
                "distil",
                "--student",
                str(start),
                "--out",
                str(out),
                "--max-minutes",
                f"{left - spent:.4f}",
                "--local-share",
                "0",  # a row's local stage is the step above, or none
                *snap,
                *common,
            ],
            out,
        )
        evaluate(a, out, out / "eval")
        for s in sorted((out / "snapshots").glob("*")) if name in curve else []:
            evaluate(a, s, s / "eval")
    print(f"done; the table: python benchmarks/recipe_table.py {root} teacher-eval {' '.join(rows)}")


if __name__ == "__main__":
    main()
