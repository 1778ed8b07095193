"""Turn a directory of evaluated models into the study's tables (results.md, results.csv) and plots.

The published study compares each student to its teacher by ES kept and speedup, so the report computes exactly
those from each model's eval/metrics.json: its table and its two trade-off plots (ES vs size, ES vs samples/s). The
real-teacher study adds what its goal is stated in (costs.py: compute share, cold and warm line latency, KD
tokens), ES vs latency, a learning curve (ES vs KD tokens of one student stopped along its budget) and each step's
wall time. It reads only files, so it works on a sweep that is still running: models listed in sweep.json but not
yet evaluated are shown as such instead of failing the report.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from distil_codegpt.artifacts import read_json
from distil_codegpt.config import ReportConfig, UserError
from distil_codegpt.experiment.costs import cost_fields, cost_notes, cost_table, wall_times
from distil_codegpt.experiment.noise import noise_table
from distil_codegpt.experiment.search import search_table
from distil_codegpt.runinfo import atomic_open, atomic_write_text

FIGSIZE = (8.0, 5.5)  # inches; with DPI this fixes the PNG's pixel size (960 x 660), which the tests check
DPI = 120
CSV_FIELDS = (
    "name label layers params_m size_mb samples_per_s latency_ms_p50 latency_ms_p95 edit_sim exact_match "
    "es_kept_pct speedup perplexity tokens seed macs_per_token compute_share_pct latency_warm_ms_p50 latency_speedup "
    "kind"
).split()
_REQUIRED = ("exact_match", "edit_sim", "n", "params", "size_mb", "samples_per_s")


class PlotSpec(NamedTuple):
    """One trade-off plot: both are drawn by the same function, so they cannot drift apart."""

    stem: str
    x: str  # the csv column on the x axis
    xlabel: str
    minimize_x: bool  # smaller size is better, higher speed is better; higher ES is always better
    title: str


PLOTS = [
    PlotSpec("es_vs_size", "size_mb", "size (MB, fp32)", True, "ES vs model size"),
    PlotSpec("es_vs_speed", "samples_per_s", "inference speed (samples/s)", False, "ES vs inference speed"),
]
# The real-teacher study's: drawn when the models have the data (every evaluation measures latency).
LATENCY_PLOT = PlotSpec("es_vs_latency", "latency_ms_p50", "cold line latency p50 (ms)", True, "ES vs line latency")
CURVE_STEM = "learning_curve"


@dataclass
class Row:
    """One model of the sweep; `metrics` is None while it is listed in sweep.json but not evaluated yet."""

    name: str
    label: str
    layers: int | None = None
    kind: str | None = None
    variant: str = ""
    metrics: dict[str, Any] | None = None
    tokens: int | None = None  # training tokens of a student (sweep.json)
    seed: int | None = None
    eval_dir: Path | None = None  # where its metrics.json and predictions.txt are


def _read_json(path: Path) -> Any:
    return read_json(path, fix="re-run the stage that wrote it", kind=object)


def _load_metrics(path: Path) -> dict[str, Any]:
    m = _read_json(path)
    missing = [k for k in _REQUIRED if not isinstance(m, dict) or m.get(k) is None]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}; re-run `distil-codegpt evaluate` for this model")
    return m


def collect(dir: str | Path) -> list[Row]:
    """Every model under `dir`, in sweep.json's order first (the study's order), then the others by name."""
    root = Path(dir)
    if not root.is_dir():
        raise UserError(
            f"{root}: no such directory; pass the sweep directory (--dir) that `distil-codegpt sweep` wrote"
        )
    found = {p.parent.parent.relative_to(root).as_posix(): p for p in sorted(root.rglob("eval/metrics.json"))}
    if not found:
        raise UserError(
            f"{root}: no evaluated model (no */eval/metrics.json); run `distil-codegpt sweep` or `evaluate` first"
        )
    found = {(root.name if name == "." else name): p for name, p in found.items()}
    sweep = _read_json(root / "sweep.json") if (root / "sweep.json").is_file() else {"models": []}
    rows: list[Row] = []
    for entry in sweep.get("models", []):
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"{root / 'sweep.json'}: model entry {entry!r} has no name; re-run `distil-codegpt sweep`")
        name, path = str(entry["name"]), found.pop(str(entry["name"]), None)
        label, variant = str(entry.get("label") or name), str(entry.get("variant") or "")
        metrics = _load_metrics(path) if path else None
        row = Row(name, label, entry.get("layers"), entry.get("kind"), variant, metrics)
        row.tokens, row.seed, row.eval_dir = entry.get("tokens"), entry.get("seed"), path.parent if path else None
        rows.append(row)
    rows += [
        Row(name=name, label=name, metrics=_load_metrics(path), eval_dir=path.parent)
        for name, path in sorted(found.items())
    ]
    return rows


def teacher_line(dir: str | Path) -> str | None:
    """Which teacher the sweep distilled from, in which family, with which tokenizer and corpus format: a student's
    numbers only mean something next to these."""
    path = Path(dir) / "sweep.json"
    sweep = _read_json(path) if path.is_file() else {}
    t, config = sweep.get("teacher"), sweep.get("config") or {}
    if not isinstance(t, dict) or not t.get("model"):
        return None
    fmt = f"; corpus format {config['format']}" if config.get("format") else ""
    shape = f"{t.get('family')}, {t.get('layers')} layers"
    return f"Teacher: `{t['model']}` ({shape}); tokenizer: {t.get('tokenizer')}{fmt}."


def pareto_front(points: list[tuple[float, float]], minimize_x: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (y is always maximised), sorted by x.

    Identical points do not dominate each other, so both stay; non-finite points are ignored (a model whose
    speed was not measured must not hide the others). O(n^2) is fine: a sweep has tens of models.
    """
    sign = 1.0 if minimize_x else -1.0
    ok = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        ax, bx = sign * a[0], sign * b[0]
        return ax <= bx and a[1] >= b[1] and (ax < bx or a[1] > b[1])

    front = [i for i in ok if not any(dominates(points[j], points[i]) for j in ok)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1], i))


def _record(row: Row, base: dict[str, Any] | None) -> dict[str, Any]:
    """The csv row; the markdown table formats the same values, so the two files cannot disagree."""
    m = row.metrics or {}
    ratio = lambda key: m[key] / base[key] if base and base[key] else None  # noqa: E731
    es_kept = ratio("edit_sim")
    return {
        "name": row.name,
        "label": row.label,
        "layers": row.layers,
        "params_m": m["params"] / 1e6,
        "size_mb": m["size_mb"],
        "samples_per_s": m["samples_per_s"],
        "latency_ms_p50": m.get("latency_ms_p50"),
        "latency_ms_p95": m.get("latency_ms_p95"),
        "edit_sim": m["edit_sim"],
        "exact_match": m["exact_match"],
        "es_kept_pct": None if es_kept is None else 100.0 * es_kept,
        "speedup": ratio("samples_per_s"),
        "perplexity": m.get("perplexity"),
        "tokens": row.tokens,
        "seed": row.seed,
        "kind": row.kind,
        **cost_fields(m, base),
    }


def _fmt(x: Any, spec: str, missing: str = "—") -> str:
    return missing if x is None else spec.format(x)


def _num(x: float) -> str:
    """Like the study: whole numbers for big values, one decimal where it carries information."""
    return f"{x:.1f}" if abs(x) < 10 else f"{x:,.0f}"


def _cells(rec: dict[str, Any], with_ppl: bool) -> list[str]:
    cells = [
        rec["label"],
        _fmt(rec["layers"], "{}"),
        _num(rec["params_m"]),
        _num(rec["size_mb"]),
        _num(rec["samples_per_s"]),
        f"{rec['edit_sim']:.1f}",
        f"{rec['exact_match']:.1f}",
        _fmt(rec["es_kept_pct"], "{:.1f}%", "n/a"),
        _fmt(rec["speedup"], "{:.2f}×", "n/a"),
    ]
    return cells + ([_fmt(rec["perplexity"], "{:.2f}")] if with_ppl else [])


def markdown_table(rows: list[Row], records: dict[str, dict[str, Any]]) -> str:
    """The study's columns, plus perplexity when some model has it; unevaluated models keep their place."""
    with_ppl = any(r["perplexity"] is not None for r in records.values())
    header = ["Model", "Layers", "Params (M)", "Size (MB)", "Inf. (samples/s)", "ES", "EM", "ES kept", "Speedup"]
    header += ["Perplexity"] if with_ppl else []
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in rows:
        if row.name in records:
            cells = _cells(records[row.name], with_ppl)
        else:
            cells = [row.label, _fmt(row.layers, "{}"), "not evaluated"] + [""] * (len(header) - 3)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _common(metrics: list[dict[str, Any]], key: str) -> str | None:
    """One value when all models share it, else the spread, so a mixed sweep is visible in the header."""
    values = sorted({m[key] for m in metrics if m.get(key) is not None}, key=str)
    if not values:
        return None
    if len(values) == 1:
        return f"{values[0]:,}" if isinstance(values[0], int) else str(values[0])
    return " / ".join(map(str, values)) + " (differs between models)"


def _plot(recs: list[dict[str, Any]], spec: PlotSpec, base: str | None, n: str | None, path: Path) -> None:
    """ES against one cost axis with its Pareto front: the models worth shipping are the ones on the line."""
    recs = [r for r in recs if r[spec.x] is not None and math.isfinite(r[spec.x])]
    pts = [(float(r[spec.x]), float(r["edit_sim"])) for r in recs]
    fig, ax = _figure()
    front = pareto_front(pts, spec.minimize_x)
    # The step holds the best ES reachable at that cost: up to the next, smaller/faster model's x.
    step = "steps-post" if spec.minimize_x else "steps-pre"
    fx, fy = [pts[i][0] for i in front], [pts[i][1] for i in front]
    ax.plot(fx, fy, drawstyle=step, color="tab:green", alpha=0.7, label="Pareto front")
    ax.scatter([x for x, _ in pts], [y for _, y in pts], color="tab:blue", zorder=3, label="models")
    for rec, (x, y) in zip(recs, pts):
        is_base = rec["name"] == base
        if is_base:
            ax.scatter([x], [y], marker="*", s=260, color="tab:red", zorder=4, label=f"baseline: {rec['label']}")
        weight = "bold" if is_base else "normal"
        ax.annotate(rec["label"], (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8, fontweight=weight)
    ax.set(xlabel=spec.xlabel, ylabel="ES (edit similarity, %)", title=f"{spec.title} (test set n = {n})")
    ax.margins(x=0.12, y=0.08)  # room for the labels written to the right of the outermost points
    _save(fig, ax, path)


def _figure() -> tuple[Any, Any]:
    # Imported here, and through the Agg canvas rather than pyplot: no display, no global state, fast CLI start.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Any, ax: Any, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)


def curve_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The learning curve: the points a student was stopped at (kind curve) and that student at its whole budget
    (students/kd-K of the same depth), by tokens."""
    depths = {r["layers"] for r in records if r["kind"] == "curve"}
    ends = {f"students/kd-{k}" for k in depths}
    points = [r for r in records if r["tokens"] and (r["kind"] == "curve" or r["name"] in ends)]
    return sorted(points, key=lambda r: (r["layers"], r["tokens"]))


def other_budgets(records: list[dict[str, Any]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Students of a curve's depth trained in runs of their own at budgets the curve has no point at (the `longer`
    variant): they extend it, each on its own schedule."""
    at = {(r["layers"], r["tokens"]) for r in points}
    depths = {k for k, _ in at}
    extra = [r for r in records if r["kind"] == "student" and r["layers"] in depths and r["tokens"]]
    return sorted((r for r in extra if (r["layers"], r["tokens"]) not in at), key=lambda r: r["tokens"])


def _plot_curve(
    points: list[dict[str, Any]], longer: list[dict[str, Any]], base: dict[str, Any] | None, n: str | None, path: Path
) -> None:
    """ES against KD tokens, one line per depth, with the baseline's ES and 95% of it: how ES kept grows. `longer`:
    runs of the same depth with more tokens and their own schedule (the `longer` variant), as separate points."""
    fig, ax = _figure()
    for k in sorted({r["layers"] for r in points}):
        line = [r for r in points if r["layers"] == k]
        ax.plot([r["tokens"] for r in line], [r["edit_sim"] for r in line], marker="o", label=f"{k} layers")
        if more := [r for r in longer if r["layers"] == k and r["tokens"]]:
            xs, ys = [r["tokens"] for r in more], [r["edit_sim"] for r in more]
            ax.plot(xs, ys, linestyle="none", marker="s", label=f"{k} layers, a run of its own at that budget")
    if base:
        ax.axhline(base["edit_sim"], color="tab:red", label=f"baseline: {base['label']}")
        ax.axhline(0.95 * base["edit_sim"], color="tab:red", linestyle="--", alpha=0.6, label="95% of the baseline")
    ax.set(xlabel="KD tokens", ylabel="ES (edit similarity, %)", title=f"Learning curve (test set n = {n})")
    _save(fig, ax, path)


def build_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write results.md, results.csv and plots/*.png into cfg.out (default: the sweep directory)."""
    cfg.validate()
    rows = collect(cfg.dir)
    out = Path(cfg.out or cfg.dir)
    evaluated = [r for r in rows if r.metrics is not None]
    base_row = next((r for r in evaluated if r.name == cfg.baseline), None)
    base = base_row.metrics if base_row else None
    records = {r.name: _record(r, base) for r in evaluated}
    metrics = [r.metrics for r in evaluated if r.metrics]
    n = _common(metrics, "n")

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in rec.items()} for rec in records.values())
    csv_path = out / "results.csv"
    atomic_write_text(csv_path, buf.getvalue())

    plots = [out / "plots" / f"{spec.stem}.png" for spec in PLOTS]
    base_name = base_row.name if base_row else None
    models = [r for r in records.values() if r["kind"] != "curve"]  # a curve's stops are on their own plot
    for spec, path in zip(PLOTS, plots):
        _plot(models, spec, base_name, n, path)
    study_plots = []
    if any(r["latency_ms_p50"] is not None for r in models):
        study_plots.append(out / "plots" / f"{LATENCY_PLOT.stem}.png")
        _plot(models, LATENCY_PLOT, base_name, n, study_plots[-1])
    if points := curve_points(list(records.values())):
        study_plots.append(out / "plots" / f"{CURVE_STEM}.png")
        _plot_curve(points, other_budgets(list(records.values()), points), records.get(base_name or ""), n,
                    study_plots[-1])  # fmt: skip
    costs = cost_table([records[r.name] for r in rows if r.name in records])
    times = wall_times(cfg.dir)
    search = search_table(cfg.dir)
    noise = noise_table(rows)

    table = markdown_table(rows, records)
    setup = [
        f"{label} {v}"
        for key, label in [("mode", "mode"), ("device", "device"), ("beam", "beam"), ("batch_size", "batch size")]
        if (v := _common(metrics, key)) is not None
    ]
    if base_row:
        note = f"ES kept = 100 × ES / ES of the baseline `{cfg.baseline}`; speedup = samples/s ÷ the baseline's."
    else:
        note = (
            f"Baseline `{cfg.baseline}` is missing (no evaluated model of that name): ES kept and speedup are "
            "n/a; pass `--baseline NAME` to compare against another model."
        )
    pending = [r.label for r in rows if r.metrics is None]
    md = [
        f"# Line-level completion results: {Path(cfg.dir).resolve().name}",
        "",
        f"Test set n = {n} examples" + (f"; {', '.join(setup)}" if setup else "") + ".",
        *([teacher] if (teacher := teacher_line(cfg.dir)) else []),
        "Size is the fp32 weight size; Inf. is throughput measured by `distil-codegpt evaluate`.",
        "",
        table,
        "",
        note,
        *([f"Not evaluated yet ({len(pending)}): {', '.join(pending)}."] if pending else []),
        "",
        "## Against the teacher",
        "",
        costs,
        "",
        *cost_notes(list(records.values()), cfg.baseline),
        "",
        *(["## Against the main student of the same depth", "", *noise, ""] if noise else []),
        "## Plots",
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in [*plots, *study_plots]],
        "",
        *(["## Learning rate, batch and window: the search", "", *search, ""] if search else []),
        *(["## Wall time of each step", "", *times, ""] if times else []),
    ]
    md_path = out / "results.md"
    atomic_write_text(md_path, "\n".join(md))
    return {
        "rows": len(evaluated),
        "results_md": str(md_path),
        "results_csv": str(csv_path),
        "plots": [str(p) for p in plots],
        "study_plots": [str(p) for p in study_plots],
        "table": table,
        "cost_table": costs,
        "baseline": base_name,
        "not_evaluated": [r.name for r in rows if r.metrics is None],
    }


def print_report(summary: dict[str, Any]) -> None:
    """What a user wants after `report`: the table itself, then where the files are."""
    print(summary["table"])
    if summary.get("cost_table"):
        print()
        print(summary["cost_table"])
    if summary.get("not_evaluated"):
        print(f"not evaluated yet: {', '.join(summary['not_evaluated'])}")
    print(f"results: {summary['results_md']}, {summary['results_csv']}")
    print("plots: " + ", ".join([*summary["plots"], *summary.get("study_plots", [])]))
