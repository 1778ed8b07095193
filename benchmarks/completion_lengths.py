"""Do a sweep's completions end their line? Mean length in characters of each model's predictions against the
answers', and how many run past 100 characters (a raw-mode completion ends at the first line break; one that never
emits it runs on to the new-token limit).

    python benchmarks/completion_lengths.py runs/real teacher students/kd-10 students/10-online
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from distil_codegpt.data.line_completion import read_examples
from distil_codegpt.experiment.noise import eval_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep", help="a sweep directory")
    ap.add_argument("models", nargs="+", help="models (each with eval/) or evaluation directories under it")
    ap.add_argument("--long", type=int, default=100, help="a completion longer than this many characters runs on")
    args = ap.parse_args()
    root = Path(args.sweep)
    rows = []
    for name in args.models:
        d = eval_dir(root / name)
        metrics = json.loads((d / "metrics.json").read_text())
        n = int(metrics["n"])
        rows.append((name, (d / "predictions.txt").read_text(encoding="utf-8").split("\n")[:n]))
    gts = [ex.gt for ex in read_examples(metrics["test"])[:n]]
    print(f"| completions | mean length (chars) | over {args.long} chars (of {n}) |\n|---|---:|---:|")
    for name, texts in [("answers (gt)", gts), *rows]:
        print(f"| {name} | {statistics.mean(len(t) for t in texts):.1f} | {sum(len(t) > args.long for t in texts)} |")


if __name__ == "__main__":
    main()
