"""Line-completion latency on this machine's CPU: teacher fp32, student fp32, student int8, exported engines.

    make demo
    python benchmarks/local_latency.py --teacher runs/demo/teacher --student runs/demo/students/8-frozen

The student's int8 artifact (`compress --quantize int8`) and CTranslate2 exports (fp32 and int8) are built in
a temporary directory unless given. Every engine completes the same prompts (the first --n inputs of a
line-completion test.json, cut to fit the context), greedy, to the end of the line or --max-new-tokens, one
at a time as an editor asks; after one warm-up prompt, each completion is timed. Prints p50/p95 ms per
line, generated tokens/s, and size on disk. Each engine runs in its own process: PyTorch's idle OpenMP threads
would otherwise take CPU from the next engine's threads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distil_codegpt.config import CompressConfig, ExportConfig, build_config
from distil_codegpt.data.line_completion import read_examples
from distil_codegpt.evaluate.completion import StopIds, encode_inputs, is_raw


def time_engine(engine, prompts: list[str], max_new_tokens: int) -> dict:  # noqa: ANN001
    tok = engine.tokenizer
    stops = StopIds.of(tok)
    encoded = [
        (encode_inputs(tok, [p], engine.context - max_new_tokens)[0], set(stops.for_mode(is_raw(p)))) for p in prompts
    ]
    engine.generate(encoded[0][0], max_new_tokens, encoded[0][1])  # warm-up
    times, tokens = [], 0
    for ids, stop in encoded:
        start = time.perf_counter()
        tokens += len(engine.generate(ids, max_new_tokens, stop))
        times.append(time.perf_counter() - start)
    ordered = sorted(times)

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]

    return {"p50": pct(50), "p95": pct(95), "tokens_per_s": tokens / sum(times), "mean_tokens": tokens / len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="runs/demo/teacher")
    p.add_argument("--student", default="runs/demo/students/8-frozen")
    p.add_argument("--test", default="runs/demo/data/line_completion/test.json")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--work", help="where to build the int8 and exported artifacts (default: a temporary dir)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: time one artifact in this process
    a = p.parse_args()

    from distil_codegpt.compress.export import run_export
    from distil_codegpt.compress.run import run_compress
    from distil_codegpt.serve.engine import load_engine

    prompts = [ex.input for ex in read_examples(a.test)[: a.n]]
    if a.one:
        engine = load_engine(a.one)
        print(json.dumps({**time_engine(engine, prompts, a.max_new_tokens), "disk_mb": engine.disk_mb()}))
        return
    work = Path(a.work or tempfile.mkdtemp(prefix="local_latency."))
    int8, ct2, ct2_int8 = work / "student-int8", work / "student-ct2", work / "student-ct2-int8"
    if not int8.exists():
        run_compress(build_config(CompressConfig, {"model": a.student, "out": str(int8), "quantize": "int8"}))
    for out, q in ((ct2, "none"), (ct2_int8, "int8")):
        if not out.exists():
            run_export(build_config(ExportConfig, {"model": a.student, "out": str(out), "quantize": q}))
    rows = [
        ("teacher fp32 (PyTorch)", a.teacher),
        ("student fp32 (PyTorch)", a.student),
        ("student int8 (PyTorch)", str(int8)),
        ("student fp32 (CTranslate2)", str(ct2)),
        ("student int8 (CTranslate2)", str(ct2_int8)),
    ]
    print(f"{len(prompts)} prompts from {a.test}; greedy, at most {a.max_new_tokens} new tokens; batch 1, CPU")
    print(f"{'engine':<28} {'p50 ms':>8} {'p95 ms':>8} {'tokens/s':>9} {'tok/line':>8} {'disk MB':>8}")
    for name, path in rows:
        argv = [sys.executable, __file__, "--test", a.test, "--n", str(a.n), "--max-new-tokens", str(a.max_new_tokens)]
        done = subprocess.run([*argv, "--one", path], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{name:<28} {r['p50']:>8.1f} {r['p95']:>8.1f} {r['tokens_per_s']:>9.0f} {r['mean_tokens']:>8.1f}"
            f" {r['disk_mb']:>8.2f}"
        )


if __name__ == "__main__":
    main()
