"""One row per student recipe against its teacher: shape, parameters, compute share, ES / EM, ES kept with its 95%
paired-bootstrap interval, latency, and the minutes and tokens of every training stage.

    python benchmarks/recipe_table.py runs/pilot teacher A-kd B-kd C-kd
    python benchmarks/recipe_table.py runs/demo-real teacher students/kd-30-ffn384-heads6  # run from the clone's root
    python benchmarks/recipe_table.py runs/recipe60 teacher-eval mix-local width-local  # benchmarks/recipe_compare.py
    python benchmarks/recipe_table.py runs/recipe60 teacher-eval mix-local --save docs/recipe60  # and the files

Each name is a model directory under the root with an evaluation in NAME/eval (`evaluate --out NAME/eval`). A
student's stages are found by walking back from its run.json: each distil run names the student it started from,
down to the `student` run that cut it from the teacher (whose seconds are the width and layer scoring). A student
trained with `distil --snapshots N` and its snapshots evaluated (NAME/snapshots/K-of-N/eval) also gets its learning
curve: ES kept against the minutes spent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoConfig

from distil_codegpt.experiment.noise import REPS, eval_dir, example_scores
from distil_codegpt.model import shape


def stages(model: Path) -> list[tuple[str, float, int]]:
    """(stage, minutes, tokens) from the cut to the final model, oldest first."""
    out: list[tuple[str, float, int]] = []
    run = model / "run.json"
    while run.is_file():
        r = json.loads(run.read_text())
        m = r.get("metrics") or {}
        if r["stage"] == "student":
            out.append(("cut", r["seconds"] / 60, 0))
            break
        name = (r["config"].get("stage") or "global") if r["stage"] == "distil" else r["stage"]
        out.append((name, m.get("train_seconds", m.get("seconds", 0.0)) / 60, m.get("tokens", 0)))
        start = Path(r["config"].get("student") or "")
        run = (start if start.is_absolute() else Path.cwd() / start) / "run.json"
        if not run.is_file():
            run = model.parent / start.name / "run.json"
    return out[::-1]


def kept_interval(s: np.ndarray, t: np.ndarray, reps: int = REPS, seed: int = 0) -> tuple[float, float, float]:
    """ES kept (mean s / mean t) and its 95% paired-bootstrap interval over the examples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(s), size=(reps, len(s)))
    ratios = s[idx].mean(1) / t[idx].mean(1)
    return float(s.mean() / t.mean()), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def row(root: Path, name: str, teacher: dict[str, Any]) -> dict[str, Any]:
    d = eval_dir(root / name)
    m = json.loads((d / "metrics.json").read_text())
    config = AutoConfig.from_pretrained(root / name)
    sh = shape.shape_of(config)
    macs = shape.macs_per_token(config)
    s = example_scores(d, m)
    kept = kept_interval(s, teacher["scores"]) if s is not None and len(s) == len(teacher["scores"]) else None
    return {
        "name": name,
        "shape": f"{sh.layers} x (ffn {sh.ffn}, heads {sh.heads}, hidden {sh.hidden})",
        "params": m.get("params"),
        "share": macs / teacher["macs"],
        "es": m["edit_sim"],
        "em": m["exact_match"],
        "kept": kept,
        "cold": m.get("latency_ms_p50"),
        "warm": m.get("warm_latency_ms_p50"),
        "stages": stages(root / name),
        "n": m["n"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="the folder the models are in")
    ap.add_argument("teacher", help="the teacher's directory under root")
    ap.add_argument("students", nargs="+", help="student directories under root")
    ap.add_argument(
        "--save",
        metavar="DIR",
        help="also write the table to DIR/table.md and copy each model's evaluation (metrics.json, predictions.txt),"
        " run.json and evaluated snapshots there: small files to commit (never the weights)",
    )
    args = ap.parse_args()
    if args.save:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            table(args)
        print(buf.getvalue(), end="")
        save(Path(args.root), [args.teacher, *args.students], Path(args.save), buf.getvalue())
    else:
        table(args)


def save(root: Path, names: list[str], dest: Path, text: str) -> None:
    """The table and the small files behind it, copied to `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "table.md").write_text(text)
    for name in names:
        src = root / name
        snaps = sorted(eval_dir(s.parent) for s in (src / "snapshots").glob("*/snapshot.json"))
        evals = [eval_dir(src)] + [d for d in snaps if (d / "metrics.json").is_file()]  # not yet evaluated: left
        for d in evals:
            to = dest / name / d.relative_to(src)
            for f in ("metrics.json", "predictions.txt", "run.json"):
                if (d / f).is_file():
                    to.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(d / f, to / f)
            if (d.parent / "snapshot.json").is_file() and d.parent != src:
                shutil.copy2(d.parent / "snapshot.json", to.parent / "snapshot.json")
    for d in root.iterdir():  # every step's record: the cuts (their scores), local stages, students
        if (d / "run.json").is_file():
            (dest / d.name).mkdir(parents=True, exist_ok=True)
            shutil.copy2(d / "run.json", dest / d.name / "run.json")
    print(f"saved to {dest}")


def table(args: argparse.Namespace) -> None:
    root = Path(args.root)
    td = eval_dir(root / args.teacher)
    tm = json.loads((td / "metrics.json").read_text())
    teacher = {
        "scores": example_scores(td, tm),
        # the teacher's own directory, or, for a sweep's teacher (evaluated only there), the model its eval names
        "macs": shape.macs_per_token(
            AutoConfig.from_pretrained(
                root / args.teacher if (root / args.teacher / "config.json").is_file() else tm["model"]
            )
        ),
        "es": tm["edit_sim"],
    }
    print(
        "| Model | Shape | Params | Compute | ES | EM | ES kept (95%) | Cold p50 (ms) | Warm p50 (ms) | Stages "
        "(minutes, tokens) | Train min |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    )
    print(
        f"| {args.teacher} | - | {tm.get('params', 0):,} | 100% | {tm['edit_sim']:.1f} | {tm['exact_match']:.1f} | "
        f"100% | {tm.get('latency_ms_p50', 0):.0f} | {tm.get('warm_latency_ms_p50', 0):.0f} | - | - |"
    )
    for name in args.students:
        r = row(root, name, teacher)
        kept = f"{100 * r['kept'][0]:.1f}% ({100 * r['kept'][1]:.1f}-{100 * r['kept'][2]:.1f})" if r["kept"] else "-"
        st = ", ".join(f"{s} {mins:.1f}" + (f" / {tok:,}" if tok else "") for s, mins, tok in r["stages"])
        total = sum(mins for _, mins, _ in r["stages"])
        print(
            f"| {name} | {r['shape']} | {r['params']:,} | {100 * r['share']:.1f}% | {r['es']:.1f} | {r['em']:.1f} | "
            f"{kept} | {r['cold'] or 0:.0f} | {r['warm'] or 0:.0f} | {st} | {total:.1f} |"
        )
    print(f"\n{r['n']} examples; ES kept = student ES / teacher ES on the same examples")
    machines = {name: machine_of(root / name) for name in [args.teacher, *args.students]}
    print(
        "machines (minutes, tokens and latency compare only within one): "
        + "; ".join(f"{n}: {m}" for n, m in machines.items())
    )
    curves = [(name, curve(root, name, teacher)) for name in args.students]
    if any(points for _, points in curves):
        print(
            "\nLearning curves (`distil --snapshots`): ES kept against the training minutes spent, every stage counted"
        )
        print("\n| Model | Minutes | Tokens of the last stage | ES | ES kept (95%) |\n|---|---:|---:|---:|---:|")
        for name, points in curves:
            for minutes, tokens, es, (k, lo, hi) in points:
                print(
                    f"| {name} | {minutes:.1f} | {tokens:,} | {es:.1f} |"
                    f" {100 * k:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}) |"
                )


def machine_of(model: Path) -> str:
    """The machine that trained a model (or, for a model trained elsewhere, evaluated it), from its run.json."""
    for run in (model / "run.json", eval_dir(model) / "run.json"):
        m = json.loads(run.read_text()).get("machine") if run.is_file() else None
        if m:
            return f"{m['cpu']}, {m['cores']} cores" + (f", {m['isa']}" if m.get("isa") else "")
    return "not recorded"


def curve(root: Path, name: str, teacher: dict[str, Any]) -> list[tuple[float, int, float, tuple]]:
    """(minutes, tokens, ES, ES kept) at each evaluated snapshot of a student's last stage and at its end: the
    minutes are the earlier stages' (the cut's scoring, a local stage) plus the snapshot's training seconds."""
    history = stages(root / name)
    if not (root / name / "snapshots").is_dir():
        return []
    before = sum(mins for _, mins, _ in history[:-1])
    points = []
    for snap in sorted((root / name / "snapshots").glob("*/snapshot.json")):
        d = eval_dir(snap.parent)
        if not (d / "metrics.json").is_file():
            continue
        at, m = json.loads(snap.read_text()), json.loads((d / "metrics.json").read_text())
        s = example_scores(d, m)
        if s is not None and len(s) == len(teacher["scores"]):
            points.append(
                (before + at["train_seconds"] / 60, at["tokens"], m["edit_sim"], kept_interval(s, teacher["scores"]))
            )
    d = eval_dir(root / name)
    m = json.loads((d / "metrics.json").read_text())
    s = example_scores(d, m)
    if s is not None and len(s) == len(teacher["scores"]):
        points.append(
            (sum(mins for _, mins, _ in history), history[-1][2], m["edit_sim"], kept_interval(s, teacher["scores"]))
        )
    return sorted(points)


if __name__ == "__main__":
    main()
