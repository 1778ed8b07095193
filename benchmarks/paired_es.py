"""The ES difference of two models of a sweep on the same examples, with its 95% paired-bootstrap interval (the
report's "Against the main student of the same depth", for any pair).

    python benchmarks/paired_es.py runs/real students/10-in-training students/10-online \
        students/10-online students/10-ce-only

A name is a model directory (its eval/ is read) or an evaluation directory itself (`evaluate --out`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distil_codegpt.experiment.noise import REPS, eval_dir, example_scores, paired_bootstrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", help="a sweep directory")
    ap.add_argument("pairs", nargs="+", help="models or evaluations under it, two by two: A B (A - B) ...")
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give the models two by two: A B [A B ...]")
    root = Path(args.sweep)

    def scores(name: str):  # noqa: ANN202
        d = eval_dir(root / name)
        s = example_scores(d, json.loads((d / "metrics.json").read_text()))
        if s is None:
            raise SystemExit(f"{d}: no predictions.txt, or its test file is gone")
        return s

    print(f"| A | ES | B | ES | A - B | 95% interval ({REPS} resamplings) |\n|---|---:|---|---:|---:|---:|")
    for a, b in zip(args.pairs[::2], args.pairs[1::2]):
        x, y = scores(a), scores(b)
        diff, lo, hi = paired_bootstrap(x, y)
        print(f"| {a} | {x.mean():.1f} | {b} | {y.mean():.1f} | {diff:+.1f} | {lo:+.1f} to {hi:+.1f} |")


if __name__ == "__main__":
    main()
