"""Is a difference in ES more than the noise of the examples? A paired bootstrap over the examples two models
completed, for the report's comparison of each student with the main student of its depth.

Two models evaluated on the same examples differ per example; resampling the examples (with replacement, the same
draw for both models) gives the spread of their mean difference that a different sample of examples of the same
kind would show. That is the examples' noise only: a second training seed measures the training's own (the
sweep's `seeds`), and the report shows both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distil_codegpt.data.line_completion import read_examples
from distil_codegpt.evaluate.metrics import pair_scores

REPS = 2000  # bootstrap draws: the 2.5/97.5 percentiles settle to about 0.1 ES at 500 examples


def eval_dir(path: Path) -> Path:
    """An evaluation directory: `path` itself when it holds metrics.json (`evaluate --out`), else a model's eval/."""
    return path if (path / "metrics.json").is_file() else path / "eval"


def example_scores(eval_dir: Path, metrics: dict[str, Any]) -> np.ndarray | None:
    """Each example's ES of one evaluation (predictions.txt against its test file's answers); None when either
    file is not there any more (a report over copied results)."""
    preds_path, test = eval_dir / "predictions.txt", Path(str(metrics.get("test", "")))
    if not preds_path.is_file() or not test.is_file():
        return None
    n = int(metrics["n"])
    preds = preds_path.read_text(encoding="utf-8").split("\n")[:n]
    gts = [ex.gt for ex in read_examples(test)[:n]]
    if len(preds) != n or len(gts) != n:
        return None
    return np.array([es for es, _ in pair_scores(preds, gts)], dtype=np.float64)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = REPS, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, 2.5th and 97.5th percentile of that mean over `reps` resamplings of the examples)."""
    if a.shape != b.shape or not len(a):
        raise ValueError(f"paired scores need the same examples: {a.shape} against {b.shape}")
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(reps, len(diff)))
    means = diff[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def noise_table(rows: list[Any]) -> list[str]:
    """Markdown lines: every evaluated student against `students/kd-K` of its depth K (same examples), with the
    paired-bootstrap interval of the ES difference; [] when no row has such a reference."""
    by_name = {r.name: r for r in rows if r.metrics is not None and r.eval_dir is not None}
    lines = []
    for r in by_name.values():
        ref = by_name.get(f"students/kd-{r.layers}")
        if ref is None or ref is r or r.kind not in ("student", "control", "curve"):
            continue
        a, b = example_scores(r.eval_dir, r.metrics), example_scores(ref.eval_dir, ref.metrics)
        if a is None or b is None or a.shape != b.shape:
            continue
        diff, lo, hi = paired_bootstrap(a, b)
        beyond = "yes" if lo > 0 or hi < 0 else "no"
        lines.append(f"| {r.label} | {a.mean():.1f} | {ref.label} | {b.mean():.1f} | {diff:+.1f} | "
                     f"{lo:+.1f} to {hi:+.1f} | {beyond} |")  # fmt: skip
    if not lines:
        return []
    return [
        "| Model | ES | Against | Its ES | Difference | 95% interval (examples) | Beyond the examples' noise |",
        "|---|---:|---|---:|---:|---:|---|",
        *lines,
        "",
        f"Paired bootstrap over the {len(a)} examples ({REPS} resamplings, the same draw for both models): the "
        "interval is how far the difference would move on another sample of such examples. It leaves out the "
        "training's own noise, which a second seed of the same run shows (rows 'seed N').",
    ]
