"""Plain-text summaries the CLI prints at the end of a stage."""

from __future__ import annotations

from typing import Any


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def corpus_lines(s: dict[str, Any]) -> list[str]:
    f = s["files"]
    skipped = ", ".join(f"{k} {v}" for k, v in f["skipped"].items()) or "none"
    rows = [[k, f"{v['files']:,}", f"{v['tokens']:,}", f"{v['bytes'] / 1e6:.1f}"] for k, v in s["splits"].items()]
    return [
        f"corpus ({s['config']['format']}, python {s['python']}): {', '.join(s['config']['src'])}",
        f"  files seen {f['seen']:,}, kept {f['kept']:,}, exact duplicates {f['duplicates']:,}",
        f"  skipped: {skipped}",
        _table(rows, ["split", "files", "tokens", "MB"]),
        f"  line completion: test {s['line_completion']['test']:,}, dev {s['line_completion']['dev']:,} examples",
        f"  time: {s['seconds']['total']:.1f} s",
    ]


def print_corpus(s: dict[str, Any], out: str) -> None:
    print("\n".join(corpus_lines(s) + [f"  written to {out}"]))


def tokenizer_lines(s: dict[str, Any]) -> list[str]:
    return [f"tokenizer: vocab {s['vocab_size']:,}, trained on {s['n_docs']:,} documents in {s['seconds']:.1f} s"]


def print_tokenizer(s: dict[str, Any], out: str) -> None:
    print("\n".join(tokenizer_lines(s) + [f"  written to {out}"]))


def shards_lines(s: dict[str, Any]) -> list[str]:
    rows = [
        [split, f"{v['n_docs']:,}", f"{v['n_tokens']:,}", v["dtype"], f"{v['seconds']:.1f}"]
        for split, v in s["splits"].items()
    ]
    return [
        f"shards: {s['out']}" + (" (already built, reused)" if s.get("reused") else ""),
        _table(rows, ["split", "docs", "tokens", "dtype", "seconds"]),
    ]


def print_shards(s: dict[str, Any]) -> None:
    print("\n".join(shards_lines(s)))


def print_prepare(s: dict[str, Any]) -> None:
    lines = corpus_lines(s["corpus"]) + [""] + tokenizer_lines(s["tokenizer"]) + [""] + shards_lines(s["shards"])
    lines += ["", f"run directory: {s['out']}  (data/, tok/, run.json)"]
    print("\n".join(lines))


def print_student(s: dict[str, Any], out: str) -> None:
    picked = f", teacher layers {s['layer_map']}" if s.get("layer_map") else ""
    shape, full = s.get("shape") or {}, s.get("teacher_shape") or {}
    cut = [k for k in ("ffn", "heads", "hidden") if shape.get(k) != full.get(k)]
    widths = ", ".join(f"{k} {shape[k]} of {full[k]}" for k in cut)
    compute = f"{100 * s['compute_share']:.1f}% of the teacher's compute per token" if "compute_share" in s else ""
    print(
        f"student ({s['init']}): {s['layers']} layers{picked}{', ' + widths if widths else ''}\n"
        f"  {s['params']:,} parameters ({s['size_mb']:.1f} MB fp32; teacher {s['teacher_params']:,})"
        f"{', ' + compute if compute else ''}\n  written to {out}"
    )


def print_training(m: dict[str, Any], out: str) -> None:
    line = f"{m['steps']} steps, {m['tokens']:,} tokens in {m['seconds']:.0f} s ({m['stop_reason']})"
    dev = f"dev loss {m['dev_loss']:.4f}, perplexity {m['dev_ppl']:.2f}"
    if "start_dev_loss" in m:
        dev += f" (at the start: {m['start_dev_loss']:.4f}, {m['start_dev_ppl']:.2f})"
    if "teacher_dev_loss" in m:
        dev += f"; teacher dev loss {m['teacher_dev_loss']:.4f}"
    local = m.get("local_stage")
    if local:
        line = (
            f"local stage: {local['steps']} steps, {local['tokens']:,} tokens in {local['train_seconds'] / 60:.1f} min"
            f" of training ({local['out']}); global KD: {line}"
        )
    print(f"{line}\n  {dev}\n  model written to {out}")
