"""What a student costs against its teacher: compute per token, line latency, KD tokens, and each step's wall time.

The goal of the real-teacher study is stated in these terms (at most half the teacher's per-token compute, at least
95% of its ES), so they get their own table next to the seed study's columns. Compute is counted from config.json
alone: every weight matrix of every block plus the LM head is one multiply-add per weight per token. Attention over
the context is left out: it grows with the prompt and is the same share for a teacher and its shallower students.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from distil_codegpt.config import ConfigError
from distil_codegpt.model import shape

COST_HEADER = [
    "Model",
    "Layers",
    "KD tokens",
    "ES",
    "ES kept",
    "Compute / token",
    "Compute share",
    "Cold p50 (ms)",
    "Warm p50 (ms)",
    "Speedup (cold p50)",
]
WARM_KEY = "warm_latency_ms_p50"  # written by an evaluation that measures a prompt already in the KV cache


def macs_per_token(model_dir: str | None) -> int | None:
    """Multiply-adds per token of a model directory's weight matrices (blocks + head); None when it has no
    config.json of a supported family (an exported engine, a hub id)."""
    if not model_dir or not (Path(model_dir) / "config.json").is_file():
        return None
    try:
        return shape.macs_per_token(AutoConfig.from_pretrained(model_dir))
    except (OSError, ValueError, ConfigError):
        return None


def cost_fields(m: dict[str, Any], base: dict[str, Any] | None) -> dict[str, Any]:
    """The csv's cost columns of one model's metrics against the baseline's (None without a baseline)."""
    macs = macs_per_token(m.get("model"))
    base_macs = macs_per_token(base.get("model")) if base else None
    cold, base_cold = m.get("latency_ms_p50"), (base or {}).get("latency_ms_p50")
    return {
        "macs_per_token": macs,
        "compute_share_pct": 100.0 * macs / base_macs if macs and base_macs else None,
        "latency_warm_ms_p50": m.get(WARM_KEY),
        "latency_speedup": base_cold / cold if cold and base_cold else None,
    }


def _cell(x: Any, spec: str) -> str:
    return "-" if x is None else spec.format(x)


def cost_table(records: list[dict[str, Any]]) -> str:
    """The study's cost columns, one line per evaluated model (records as the csv holds them)."""
    lines = ["| " + " | ".join(COST_HEADER) + " |", "|---" + "|---:" * (len(COST_HEADER) - 1) + "|"]
    for r in records:
        cells = [
            r["label"],
            _cell(r["layers"], "{}"),
            _cell(r["tokens"], "{:,}"),
            f"{r['edit_sim']:.1f}",
            _cell(r["es_kept_pct"], "{:.1f}%"),
            _cell(r["macs_per_token"] and r["macs_per_token"] / 1e6, "{:.1f}M"),
            _cell(r["compute_share_pct"], "{:.0f}%"),
            _cell(r["latency_ms_p50"], "{:,.0f}"),
            _cell(r["latency_warm_ms_p50"], "{:,.0f}"),
            _cell(r["latency_speedup"], "{:.2f}×"),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def cost_notes(records: list[dict[str, Any]], baseline: str) -> list[str]:
    """What the cost columns mean, and what was not measured."""
    notes = [
        f"Compute / token counts the multiply-adds of every weight matrix (blocks and LM head) once per token; "
        f"compute share is that over the baseline `{baseline}`'s. Cold p50 is the median batch-1 latency of a whole "
        "line completion from the full prompt (`evaluate`'s latency_ms_p50); the speedup is the baseline's cold p50 "
        "over the model's. Warm p50 is the same line when the prompt but its last token is already in the KV cache, "
        "as the previous keystroke leaves it in `serve` (`evaluate`'s warm_latency_ms_p50)."
    ]
    if all(r["latency_warm_ms_p50"] is None for r in records):
        notes.append(
            "Warm p50 was not measured for these models (`evaluate` with --latency-samples 0, or beam search): shown "
            "as -."
        )
    return notes


def wall_times(sweep_dir: str | Path) -> list[str]:
    """The markdown lines of each step's wall time (timings.json, kept across resumed sweeps); [] before any."""
    path = Path(sweep_dir) / "timings.json"
    try:
        timings = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return [f"{path} could not be read; it is rewritten by the next step the sweep runs."]
    if not isinstance(timings, dict) or not timings:
        return []
    total = sum(float(s) for s in timings.values())
    lines = ["| Step | Wall time |", "|---|---:|"]
    lines += [f"| {name} | {_duration(float(s))} |" for name, s in timings.items()]
    return [*lines, f"| all steps | {_duration(total)} |"]


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
