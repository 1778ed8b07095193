"""Print the tables of docs/REAL_TEACHER.md from a `benchmarks/real_teacher.sh` run directory.

    python benchmarks/real_teacher_table.py runs/real

Every ES/EM is also recomputed here from the model's own predictions.txt with rapidfuzz alone (not our metrics
code), and the teacher's ES on each student's example count is taken from its predictions on the same examples,
so "ES kept" compares like with like.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rapidfuzz import fuzz


def scores(preds_file: Path, gts: list[str], n: int) -> tuple[float, float]:
    """(ES, EM) of the first n predictions: fuzzywuzzy's ratio rounded per pair, EM on whitespace-split tokens."""
    preds = preds_file.read_text(encoding="utf-8").split("\n")[:n]
    es = sum(int(round(fuzz.ratio(p.strip(), g.strip()))) for p, g in zip(preds, gts)) / n
    em = 100 * sum(p.split() == g.split() for p, g in zip(preds, gts)) / n
    return es, em


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    run = ap.parse_args().run
    lines = (run / "data" / "line_completion" / "test.json").read_text(encoding="utf-8").splitlines()
    gts = [json.loads(x)["gt"] for x in lines]
    teacher_preds = run / "eval" / "teacher" / "predictions.txt"
    print("| model | n | ES | EM | ES (recomputed) | teacher ES, same n | ES kept | params | p50 ms | samples/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in sorted((run / "eval").iterdir(), key=lambda p: (p.name != "teacher", p.name)):
        m_file = d / "metrics.json"
        if not m_file.is_file():
            continue
        m = json.loads(m_file.read_text())
        n = m["n"]
        es, em = scores(d / "predictions.txt", gts, n)
        t_es, _ = scores(teacher_preds, gts, n)
        print(
            f"| {d.name} | {n} | {m['edit_sim']:.2f} | {m['exact_match']:.2f} | {es:.2f} / {em:.2f} | {t_es:.2f} "
            f"| {100 * m['edit_sim'] / t_es:.1f}% | {m['params']:,} | {m['latency_ms_p50'] or 0:.0f} "
            f"| {m['samples_per_s']:.3f} |"
        )
    print()
    print("| distil run | steps | tokens | seconds | tokens/s | dev loss at start | dev loss at end | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for d in sorted((run / "kd").iterdir()) if (run / "kd").is_dir() else []:
        if not (d / "run.json").is_file():
            continue
        r = json.loads((d / "run.json").read_text())
        m, c = r["metrics"], r["config"]
        weights = f"T {c['temperature']:g}, ce {c['alpha_ce']:g}, clm {c['alpha_clm']:g}, cos {c['alpha_cos']:g}"
        recipe = weights
        if c.get("teacher_mode") == "train":
            recipe += ", in-training"
        if c.get("teacher_cache"):
            recipe += ", teacher cache"
        print(
            f"| {d.name} | {m['steps']} | {m['tokens']:,} | {m['seconds']:.0f} | {m['tokens'] / m['seconds']:.0f} "
            f"| {m.get('start_dev_loss', float('nan')):.4f} | {m['dev_loss']:.4f} | {recipe} |"
        )
    picks = []
    for d in sorted((run / "init").iterdir()) if (run / "init").is_dir() else []:
        c = json.loads((d / "config.json").read_text())
        picks.append(f"- {d.name}: layers {c['distil_layer_map']}")
    if picks:
        print()
        print("\n".join(picks))


if __name__ == "__main__":
    main()
