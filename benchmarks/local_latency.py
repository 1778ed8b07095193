"""Line-completion latency at real width on this machine's CPU: every variant on the same editor-length prompts.

    python benchmarks/local_latency.py --teacher TEACHER --student STUDENT [--student STUDENT2] --data DATA \
        --work WORK --out latency.json

Prompts: files of DATA's test split (a raw corpus), each cut at a random line (seeded) past its first
--prompt-tokens tokens, after the line's indentation, where an editor leaves the cursor on a new line. The prompt is
the text before the cut from the line start --prompt-tokens teacher tokens back; the answer is the rest of the line.
Every row completes all of them through `Completer` (framing, greedy, to the end of the line or --max-new-tokens),
one at a time as an editor asks, after one untimed completion:

  cold   the whole prompt is read (no prefix cache)
  warm   the prompt was read before (`cache_slots=1`, then `generate(ids, 0)`): only the last token is read again

Rows (--rows picks some; the student rows are made for every --student):

  teacher-fp32, teacher-bf16   the teacher; bf16 is autocast, fast only on a CPU with native bf16 (AVX-512 BF16, AMX)
  teacher-int8                 the teacher through `compress --quantize int8`
  teacher-llamacpp, llamacpp   the teacher / the student run by llama.cpp (`--engine llamacpp`: the model exported once
                               to an f32 GGUF, its own KV cache reused as the prefix cache; skipped with a note
                               without llama-cpp-python or for a family GGUF export refuses)
  [teacher-]llamacpp-f16, -q8_0, -q4_0
                               the same through `export --format gguf --quant f16|q8_0|q4_0` (built once in --work)
  fp32, bf16                   the student
  int8                         `compress --quantize int8` (torch.ao dynamic int8, the head included)
  ct2-int8                     `export --quantize int8` (CTranslate2; it keeps no prefix cache, so warm is cold;
                               refused for gpt_neox, skipped with a note)
  trim                         `compress --trim-vocab DATA` (fp32; the head keeps the ids DATA's train split uses)
  draft                        the teacher, with the student drafting (speculative and greedy: the teacher's output)

Columns: p50/p95 ms per line cold and warm; first byte (p50 ms to the first token, cold and warm); gen tok/s (new
tokens after the first / time after the first token, cold); prefill tok/s (prompt tokens read / time to the first
token, cold); RSS MB (peak resident memory of the row's process: its models, caches and runtime); disk MB (weight
files; the draft row: teacher + student); ES and EM of the cold completions against the rest of the line; =T
(completions identical to teacher fp32's); acc (the share of drafted tokens the teacher accepted) and tok/pass
(tokens per teacher forward pass); the speed-ups divide teacher
fp32's cold p50 by the row's cold and warm p50, and disk / T is the row's disk size over teacher fp32's. With
--eval-test, each row's model is also evaluated on that file (test ES, EM and examples/s of `evaluate`).

Each row runs in its own process, so that one row's OpenMP threads and memory neither slow nor inflate the next. The
int8, CTranslate2 and trimmed artifacts are built once in --work (a temporary dir unless given) and reused. Run it on
an otherwise idle machine: with every core busy elsewhere, torch's threads wait on each other and a line takes 10x
longer. CTranslate2 takes every core this process may use (`taskset -c` narrows them); torch takes --threads.
"""

from __future__ import annotations

import argparse
import bisect
import json
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GGUF_QUANTS = ("f16", "q8_0", "q4_0")  # llama.cpp rows beside the f32 one (`llamacpp`)
KINDS = ("fp32", "bf16", "int8", "ct2-int8", "trim", "llamacpp", *(f"llamacpp-{q}" for q in GGUF_QUANTS), "draft")
TEACHER_KINDS = ("fp32", "bf16", "int8", "llamacpp", *(f"llamacpp-{q}" for q in GGUF_QUANTS))
TEACHER_ROWS = tuple(f"teacher-{k}" for k in TEACHER_KINDS)
STUDENT_ROWS = KINDS
ROWS = TEACHER_ROWS + STUDENT_ROWS


# ------------------------------------------------------------ prompts


def line_cuts(text: str, ends: list[int], prompt_tokens: int) -> list[int]:
    """Offsets where a cursor sits on a line after its indentation, before code (a Python token that starts the line
    and is not a comment, as `evaluate`'s raw examples are cut), with `prompt_tokens` tokens or more before them
    (`ends`: the end offset of each model token of `text`)."""
    from distil_codegpt.data.line_completion import raw_cuts

    return [
        cut
        for cut in raw_cuts(text, len(text))
        if not text[text.rfind("\n", 0, cut) + 1 : cut].strip() and bisect.bisect_right(ends, cut) >= prompt_tokens
    ]


def make_prompts(data: str, tok: Any, n: int, prompt_tokens: int, seed: int) -> list[dict[str, str]]:
    """Up to n {"prompt", "gt"} from the test split: one cut per file in a seeded order, then more from the same
    files while there are fewer files than prompts."""
    from distil_codegpt.data.formats import read_documents

    rng = random.Random(seed)
    docs = list(read_documents(data, "test"))
    rng.shuffle(docs)
    pools: list[tuple[str, list[tuple[int, int]], list[int]]] = []  # (text, token offsets, cuts not taken yet)
    out: list[dict[str, str]] = []

    def take(text: str, offsets: list[tuple[int, int]], cuts: list[int]) -> None:
        cut = cuts.pop()
        before = bisect.bisect_right([e for _, e in offsets], cut)  # tokens that end before the cut
        first = offsets[before - prompt_tokens][0]  # where the last --prompt-tokens of them start
        begin = text.rfind("\n", 0, first) + 1  # from the start of that line
        end = text.find("\n", cut)
        out.append({"prompt": text[begin:cut], "gt": text[cut : len(text) if end < 0 else end].rstrip()})

    for text in docs:
        if len(out) >= n:
            break
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cuts = line_cuts(text, [e for _, e in offsets], prompt_tokens)
        if cuts:
            rng.shuffle(cuts)
            pools.append((text, offsets, cuts))
            take(*pools[-1])
    while len(out) < n and any(cuts for _, _, cuts in pools):
        for pool in pools:
            if pool[2] and len(out) < n:
                take(*pool)
    return out


# ------------------------------------------------------------ one row, in its own process


def set_cache_slots(engine: Any, n: int) -> None:
    """Prefix-cache slots of every engine inside `engine` that keeps a prefix cache (the draft row has two), emptied
    (llama.cpp's one context is overwritten from the first id when slots are 0)."""
    from distil_codegpt.engines.base import TorchEngine

    for e in (engine.teacher, engine.draft) if hasattr(engine, "draft") else (engine,):
        if isinstance(e, TorchEngine):
            e.cache_slots, e.slots = n, []
        elif e.name == "llamacpp":
            e.cache_slots = n


def complete_one(completer: Any, prompt: str, max_new: int, warm: bool) -> dict[str, Any]:
    from distil_codegpt.serve.complete import Job

    job = Job(prompt, max_tokens=max_new)
    if warm and (p := completer._prompt(job)) is not None:  # the very ids the completion will send
        completer.engine.generate(p.ids, 0, set())  # a warm-up: reads them into the prefix cache
    result: dict[str, Any] = {}
    start = time.perf_counter()
    text = "".join(completer.stream(job, result))
    return {
        "text": text,
        "ms": 1000 * (time.perf_counter() - start),
        "ttft_ms": result["prompt_ms"],
        "decode_ms": result["predict_ms"],
        "read": result["prompt_tokens"] - result["cached_tokens"],
        "prompt_tokens": result["prompt_tokens"],
        "new_tokens": result["completion_tokens"],
        "truncated": result["truncated"],
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ms = [s["ms"] for s in samples]
    decode_ms = sum(s["decode_ms"] for s in samples)
    return {
        "p50_ms": pct(ms, 50),
        "p95_ms": pct(ms, 95),
        "mean_ms": sum(ms) / len(ms),
        "gen_tokens_per_s": 1000 * sum(max(s["new_tokens"] - 1, 0) for s in samples) / decode_ms if decode_ms else 0.0,
        "prefill_tokens_per_s": 1000 * sum(s["read"] for s in samples) / sum(s["ttft_ms"] for s in samples),
        "ttft_p50_ms": pct([s["ttft_ms"] for s in samples], 50),
        "mean_read_tokens": sum(s["read"] for s in samples) / len(samples),
        "mean_new_tokens": sum(s["new_tokens"] for s in samples) / len(samples),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB = 1e6 bytes): VmHWM, as ru_maxrss on Linux carries over the peak of
    the parent that started it (the kernel keeps it across exec), which here has built the artifacts."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


def time_row(a: argparse.Namespace, path: str, precision: str, draft: str) -> dict[str, Any]:
    """Cold, then warm, over every prompt with one engine (loaded once: RSS is one copy of the model)."""
    import torch

    from distil_codegpt.engines.base import TorchEngine
    from distil_codegpt.engines.load import load_engine
    from distil_codegpt.engines.speculative import DraftStats, SpeculativeEngine
    from distil_codegpt.evaluate.metrics import fuzz_ratio
    from distil_codegpt.serve.complete import Completer

    if a.threads:
        torch.set_num_threads(a.threads)
    engine = load_engine(path, "cpu")  # a .gguf path (the llamacpp rows): llama.cpp, by --engine auto
    if draft:
        engine = SpeculativeEngine(engine, load_engine(draft, "cpu"))
    completer = Completer(engine)
    prompts = json.loads(Path(a.one_prompts).read_text())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        set_cache_slots(engine, 0)
        complete_one(completer, prompts[0]["prompt"], a.max_new_tokens, warm=False)  # first-call costs, untimed
        if draft:
            engine.stats = DraftStats()
        cold = [complete_one(completer, p["prompt"], a.max_new_tokens, warm=False) for p in prompts]
        set_cache_slots(engine, 1)
        warm = [complete_one(completer, p["prompt"], a.max_new_tokens, warm=True) for p in prompts]
    texts = [s["text"] for s in cold]
    row = {
        "cold": summary(cold),
        "warm": summary(warm),
        "es": sum(fuzz_ratio(t, p["gt"]) for t, p in zip(texts, prompts)) / len(prompts),
        "em": 100 * sum(t.strip() == p["gt"].strip() for t, p in zip(texts, prompts)) / len(prompts),
        "warm_differs": sum(c["text"] != w["text"] for c, w in zip(cold, warm)),
        "truncated": sum(s["truncated"] for s in cold),
        "rss_mb": peak_rss_mb(),
        "disk_mb": engine.disk_mb(),
        "prefix_cache": isinstance(engine, (TorchEngine, SpeculativeEngine)) or engine.name == "llamacpp",
        "completions": texts,
    }
    if draft:
        row.update(acceptance=engine.stats.acceptance, tokens_per_pass=engine.stats.tokens_per_pass)
    return row


# ------------------------------------------------------------ artifacts and rows


def build(work: Path, name: str, run: Any, cls: type, values: dict[str, str]) -> Path:
    """work/name, made by `run` from `cls` with `values` unless a finished one (run.json) from the same model and
    corpus is there; built aside and then moved in, so a run stopped half-way leaves nothing that looks finished."""
    from distil_codegpt.config import UserError, build_config

    out = work / name
    if (out / "run.json").is_file():
        made = json.loads((out / "run.json").read_text()).get("config", {})
        for key in ("model", "trim_vocab"):
            if key in values and Path(str(made.get(key))).resolve() != Path(values[key]).resolve():
                raise UserError(
                    f"--work: {out} was made from {made.get(key)}, not {values[key]}; remove it or pass another --work"
                )
        return out
    tmp = work / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # an unfinished one, from a run stopped half-way
    print(f"building {out} ...", flush=True)
    run(build_config(cls, {**values, "out": str(tmp)}))
    tmp.rename(out)
    return out


def gguf_row(name: str, model: str, quant: str, work: Path) -> dict[str, str]:
    """A llama.cpp row: the model's GGUF (f32: exported once into the engine's cache; other types: built once in
    `work` by `export --format gguf`) and the tokenizer imported from it, both made here so that the row's process
    only loads them (its RSS is llama.cpp's, not the export's)."""
    from distil_codegpt.compress.export import run_export
    from distil_codegpt.config import ExportConfig, UserError, build_config

    try:
        from distil_codegpt.engines.llamacpp_engine import exported_gguf, llama_cpp_module
        from distil_codegpt.model.gguf import cached_import

        llama_cpp_module()
        if quant == "f32":
            path = exported_gguf(model)
        else:
            path = work / f"{Path(model).name}-{quant}.gguf"
            if not path.is_file():  # the export writes whole or nothing
                print(f"building {path} ...", flush=True)
                values = {"model": model, "format": "gguf", "quant": quant, "out": str(path)}
                run_export(build_config(ExportConfig, values))
        cached_import(path)
    except UserError as e:
        return {"name": name, "skip": str(e)}
    return {"name": name, "path": str(path), "precision": "fp32", "draft": ""}


def plan(a: argparse.Namespace, work: Path) -> list[dict[str, str]]:
    """The rows to time: {"name", "path", "precision", "draft"}, or {"name", "skip"} with why."""
    from distil_codegpt.compress.export import run_export
    from distil_codegpt.compress.run import run_compress
    from distil_codegpt.config import CompressConfig, ExportConfig, UserError

    models = [("teacher", a.teacher, [k for k in TEACHER_KINDS if f"teacher-{k}" in a.rows])]
    models += [(Path(s).name, s, [k for k in STUDENT_ROWS if k in a.rows]) for s in a.student]
    rows = []
    for label, model, kinds in models:
        made = {  # row kind -> (artifact dir, verb, its config, values)
            "int8": (f"{label}-int8", run_compress, CompressConfig, {"quantize": "int8"}),
            "ct2-int8": (f"{label}-ct2-int8", run_export, ExportConfig, {"quantize": "int8"}),
            "trim": (f"{label}-trim", run_compress, CompressConfig, {"trim_vocab": a.data}),
        }
        for kind in kinds:
            name = f"teacher + {label} draft" if kind == "draft" else f"{label} {kind}"
            if kind.startswith("llamacpp"):
                rows.append(gguf_row(name, model, kind.partition("-")[2] or "f32", work))
                continue
            try:
                if kind in made:
                    artifact, run, cls, values = made[kind]
                    path = str(build(work, artifact, run, cls, {"model": model, **values}))
                else:
                    path = a.teacher if kind == "draft" else model
            except UserError as e:
                rows.append({"name": name, "skip": str(e)})
                continue
            precision = "bf16" if kind == "bf16" else "fp32"
            rows.append({"name": name, "path": path, "precision": precision, "draft": model if kind == "draft" else ""})
    return rows


def check_inputs(a: argparse.Namespace) -> None:
    """One line for each kind of bad input, before anything is built."""
    from transformers import AutoConfig

    from distil_codegpt.config import UserError
    from distil_codegpt.data.formats import corpus_format
    from distil_codegpt.engines.load import engine_kind
    from distil_codegpt.model import families

    for flag, value in (("n", a.n), ("prompt-tokens", a.prompt_tokens), ("max-new-tokens", a.max_new_tokens)):
        if value < 1:
            raise UserError(f"--{flag}: {value}; pass 1 or more")
    unknown = [r for r in a.rows if r not in ROWS]
    if unknown:
        raise UserError(f"--rows: unknown {', '.join(unknown)}; choose from {','.join(ROWS)}")
    if not a.student and any(r in STUDENT_ROWS for r in a.rows):
        raise UserError(f"--rows: {','.join(r for r in a.rows if r in STUDENT_ROWS)} need a --student DIR")
    labels = [Path(s).name for s in a.student]
    if len(set(labels)) < len(labels):
        raise UserError(f"--student: two students share a directory name ({', '.join(labels)}); their rows would clash")
    if corpus_format(a.data) != "raw":
        raise UserError(f"--data: {a.data} is not a raw corpus; build one with `distil-codegpt corpus --format raw`")
    for path in [a.teacher, *a.student]:
        if engine_kind(path) != "torch":
            raise UserError(
                f"model: {path} is a compressed or exported artifact; pass the model directory it came from"
            )
        context = families.context(AutoConfig.from_pretrained(path))
        if a.prompt_tokens + a.max_new_tokens >= context:
            raise UserError(
                f"--prompt-tokens: {a.prompt_tokens} + --max-new-tokens {a.max_new_tokens} do not fit the context"
                f" {context} of {path}; pass a smaller --prompt-tokens"
            )


EVAL_SKIP = ("bf16", "draft")  # emulated bf16 is the fp32 model slower; a draft's output is the teacher's


def evaluate_rows(rows: list[dict[str, Any]], a: argparse.Namespace, work: Path, save: Any) -> None:
    """`distil-codegpt evaluate` of each timed row's model on --eval-test (greedy, the row's engine: a .gguf runs
    on llama.cpp), each in its own process, into work/eval-<row>; EM, ES and the examples/s of the pass join the
    row. An evaluation already finished there (run.json) is reused, so a rerun only does what is left."""
    for row in rows:
        if "cold" not in row or row["name"].rsplit(" ", 1)[-1] in EVAL_SKIP:
            continue
        out = work / ("eval-" + row["name"].replace(" ", "-"))
        print(f"evaluate {row['name']}: ", end="", flush=True)
        if not (out / "run.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "distil_codegpt.cli", "evaluate", "--model", row["path"], "--test"]
            cmd += [a.eval_test, "--out", str(out), "--limit", str(a.eval_limit), "--context", str(a.eval_context)]
            cmd += ["--max-new-tokens", str(a.max_new_tokens), "--latency-samples", "0", "--batch-size", "8"]
            cmd += ["--threads", str(a.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                row["eval_error"] = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
                print(f"failed: {row['eval_error']}", flush=True)
                continue
        m = json.loads((out / "metrics.json").read_text())
        row["eval"] = {k: m.get(k) for k in ("exact_match", "edit_sim", "n", "samples_per_s", "engine", "disk_mb")}
        print(f"ES {m['edit_sim']:.2f}, EM {m['exact_match']:.2f} ({m['n']} examples)", flush=True)
        save()


# ------------------------------------------------------------ the table


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The rows as a markdown table (docs/PERFORMANCE.md), with speed-ups against teacher fp32 cold."""
    base = next((r for r in rows if r["name"] == "teacher fp32" and "cold" in r), None)
    head = "| row | cold p50 ms | cold p95 ms | warm p50 ms | warm p95 ms | 1st byte cold | 1st byte warm"
    head += " | gen tok/s | prefill tok/s | RSS MB"
    head += " | disk MB | ES | EM | =T | acc | tok/pass | speed-up cold | speed-up warm | disk / T |"
    tested = [r for r in rows if "eval" in r]
    if tested:
        head += " test ES | test EM | test ex/s |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "cold" not in r:
            lines.append(f"| {r['name']} | skipped: {r.get('skip') or r.get('error')} |")
            continue
        c, w = r["cold"], r["warm"]
        same = f"{r['same_as_teacher']}/{len(r['completions'])}" if base else "-"
        draft = f"{r['acceptance']:.0%} | {r['tokens_per_pass']:.2f}" if "acceptance" in r else "- | -"
        up = (
            f"{base['cold']['p50_ms'] / c['p50_ms']:.2f}x | {base['cold']['p50_ms'] / w['p50_ms']:.2f}x"
            f" | {r['disk_mb'] / base['disk_mb']:.0%}"
            if base
            else "- | - | -"
        )
        warm = (
            f"{w['p50_ms']:.0f} | {w['p95_ms']:.0f}"
            if r["prefix_cache"]
            else f"({w['p50_ms']:.0f}) | ({w['p95_ms']:.0f})"
        )
        lines.append(
            f"| {r['name']} | {c['p50_ms']:.0f} | {c['p95_ms']:.0f} | {warm} | {c['ttft_p50_ms']:.0f}"
            f" | {w['ttft_p50_ms']:.0f} | {c['gen_tokens_per_s']:.1f}"
            f" | {c['prefill_tokens_per_s']:.0f} | {r['rss_mb']:.0f} | {r['disk_mb']:.1f} | {r['es']:.1f}"
            f" | {r['em']:.0f} | {same} | {draft} | {up} |"
        )
        if tested:
            e = r.get("eval")
            scores = f" {e['edit_sim']:.1f} | {e['exact_match']:.1f} | {e['samples_per_s']:.2f} |" if e else ""
            lines[-1] += scores or " - | - | - |"
    return lines


def notes(rows: list[dict[str, Any]]) -> list[str]:
    """What to know when reading the table, each note once with the rows it holds for."""
    found: dict[str, list[str]] = {}
    for r in rows:
        if r.get("prefix_cache") is False:
            found.setdefault("no prefix cache, so warm (in brackets) reads the whole prompt", []).append(r["name"])
        if r.get("warm_differs"):
            n = f"{r['warm_differs']} of {len(r['completions'])}"
            found.setdefault(f"{n} warm completions differ from cold", []).append(r["name"])
        if r.get("truncated"):
            n = f"{r['truncated']} of {len(r['completions'])}"
            found.setdefault(f"{n} prompts cut to fit the context (the start dropped)", []).append(r["name"])
    return [f"{', '.join(names)}: {text}" for text, names in found.items()]


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())


def time_rows(rows: list[dict[str, Any]], argv: list[str], save: Any) -> None:
    """Each row in its own process, in order (teacher fp32 first: the others' completions are compared to its);
    `save` after each, so a run stopped half-way keeps the rows it timed."""
    teacher = None
    for row in rows:
        if "skip" in row:
            print(f"{row['name']}: skipped ({row['skip']})", flush=True)
            continue
        print(f"{row['name']}: ", end="", flush=True)
        start = time.perf_counter()
        done = subprocess.run(
            [*argv, "--one", row["path"], row["precision"], row["draft"]], capture_output=True, text=True
        )
        if done.returncode:
            row["error"] = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            print(f"failed: {row['error']}\n{done.stderr[-3000:]}", flush=True)
            continue
        row.update(json.loads(done.stdout.strip().splitlines()[-1]), seconds=time.perf_counter() - start)
        teacher = row["completions"] if row["name"] == "teacher fp32" else teacher
        if teacher is not None:
            row["same_as_teacher"] = sum(x == y for x, y in zip(row["completions"], teacher))
        c, w = row["cold"], row["warm"]
        print(
            f"cold p50 {c['p50_ms']:.0f} ms, warm p50 {w['p50_ms']:.0f} ms, ES {row['es']:.1f}"
            f" ({row['seconds']:.0f} s)",
            flush=True,
        )
        save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="teacher model directory (with its tokenizer)")
    p.add_argument("--student", action="append", default=[], help="student model directory; repeat for several")
    p.add_argument("--data", required=True, help="raw corpus directory: test split for prompts, train for --trim")
    p.add_argument("--n", type=int, default=20, help="prompts (one per test file while there are enough files)")
    p.add_argument("--prompt-tokens", type=int, default=1000, help="teacher tokens of code before each cursor")
    p.add_argument("--max-new-tokens", type=int, default=48, help="a completion ends at the line's end or here")
    p.add_argument(
        "--rows", help=f"comma-separated subset of {','.join(ROWS)} (default: all; no --student: the teacher's)"
    )
    p.add_argument("--seed", type=int, default=0, help="which files and lines are cut")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: torch's default, OMP_NUM_THREADS or the cores)"
    )
    p.add_argument(
        "--eval-test",
        help="also `evaluate` each row's model (not bf16, draft) on this line-completion file (a sweep's test set)",
    )
    p.add_argument("--eval-limit", type=int, default=100, help="examples of --eval-test (0 = all)")
    p.add_argument("--eval-context", type=int, default=1024, help="--context of those evaluations")
    p.add_argument("--work", help="where the int8, CTranslate2 and trimmed artifacts go (default: a temporary dir)")
    p.add_argument("--out", help="write the rows, settings and completions here as JSON")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: path, precision, draft ("" for none)
    p.add_argument("--one-prompts", help=argparse.SUPPRESS)  # internal: the prompts file
    a = p.parse_args()
    a.rows = [r.strip() for r in a.rows.split(",") if r.strip()] if a.rows else list(ROWS if a.student else ROWS[:2])
    from distil_codegpt.config import UserError

    if a.one:
        try:
            print(json.dumps(time_row(a, *a.one)))
        except UserError as e:
            sys.exit(f"error: {e}")
        return

    import torch

    from distil_codegpt.data.tokenizer import load_tokenizer
    from distil_codegpt.runtime import cpu_has_bf16

    try:
        check_inputs(a)
        prompts = make_prompts(a.data, load_tokenizer(a.teacher), a.n, a.prompt_tokens, a.seed)
        if not prompts:
            raise UserError(
                f"--data: no test file of {a.data} has a line past {a.prompt_tokens} tokens;"
                " pass a smaller --prompt-tokens"
            )
        work = Path(a.work or tempfile.mkdtemp(prefix="local_latency."))
        work.mkdir(parents=True, exist_ok=True)
        rows = plan(a, work)
    except UserError as e:
        sys.exit(f"error: {e}")
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts, indent=1))
    settings = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_name(),
        "native_bf16": cpu_has_bf16(),
        "threads": a.threads or torch.get_num_threads(),
        "prompts": len(prompts),
        "mean_prompt_chars": sum(len(q["prompt"]) for q in prompts) / len(prompts),
        "prompt_tokens": a.prompt_tokens,
        "max_new_tokens": a.max_new_tokens,
        "work": str(work),
    }
    print(
        f"{len(prompts)} prompts of ~{a.prompt_tokens} tokens from {a.data} (test split); greedy, at most"
        f" {a.max_new_tokens} new tokens, to the end of the line; batch 1; {settings['threads']} threads on"
        f" {settings['cpu']} (native bf16: {'yes' if settings['native_bf16'] else 'no'}); prompts and artifacts in"
        f" {work}"
    )
    if len(prompts) < a.n:
        print(f"note: only {len(prompts)} lines of the test split are past {a.prompt_tokens} tokens (asked for {a.n})")
    argv = [sys.executable, __file__, "--teacher", a.teacher, "--data", a.data, "--threads", str(a.threads)]
    argv += ["--max-new-tokens", str(a.max_new_tokens), "--one-prompts", str(prompts_file)]

    def save() -> None:
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))

    time_rows(rows, argv, save)
    save()
    if a.eval_test:
        evaluate_rows(rows, a, work, save)
    print()
    print("\n".join(markdown(rows)))
    for note in notes(rows):
        print(f"note: {note}")
    if a.out:
        print(f"wrote {a.out}")
    if any("error" in r for r in rows):
        sys.exit("error: some rows failed (above)")


if __name__ == "__main__":
    main()
