"""Replay an editor: type real files line by line and word by word, sending at each pause the request an editor
sends (the file so far as prefix, what follows the current line as suffix), through one of the server's protocols.

    python benchmarks/editor_replay.py --model /tmp/real/teacher --model /tmp/real/kd/logit-t1 \\
        --data /tmp/real/data --files 6 --lines 4 --out docs/editor_replay.json

For every model on every --engine (and, with --draft, the first model with that student drafting for it, on
PyTorch), one server (in this process, on a free loopback port) per cache setting: `cold` (--cache-slots 0: every
prompt read in full) and `warm` (--cache-slots 2, the default of `serve`), the same requests in the
same order, so the rows compare side by side. A file is typed from a random line (seeded) for --lines lines;
the pauses are after each word (a blank, a bracket, a dot) and at each line start, as an editor debounces. As
llama.vscode does, the prefix is --prefix-lines whole lines above the cursor's line plus that line up to the
cursor, the suffix the --suffix-lines lines after it (the rest of the cursor's line is not typed yet), so the
prompt's start moves by one line at each new line. With --ms-per-char above 0 the next pause
comes that long per typed character after the last one, and a request still running then is cancelled (its
connection closed, as editors do); with 0 every answer is waited for. Printed per row: requests, cancelled,
p50/p95 latency of an answer (one line: the first-line latency), p50 time to its first byte, the share of
prompt tokens read from the KV cache, mean prompt tokens, and the ES of the first line of each completion
against what the user typed next on that line (CodeXGLUE's edit similarity).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

PAUSE = re.compile(r"[ (.\[,:=]")


def pauses(doc: str, start_line: int, lines: int) -> list[tuple[int, str]]:
    """(cursor offset, what follows on its line) at each pause while lines start_line.. are typed."""
    out = []
    offsets = [0] + [m.end() for m in re.finditer("\n", doc)]
    for n in range(start_line, min(start_line + lines, len(offsets) - 1)):
        begin, end = offsets[n], offsets[n + 1] - 1  # the line's text is doc[begin:end]
        line = doc[begin:end]
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        cuts = [indent] + [m.end() for m in PAUSE.finditer(line) if m.end() > indent and m.end() < len(line)]
        out += [(begin + c, line[c:]) for c in dict.fromkeys(cuts)]
    return out


def sessions(data: str, files: int, lines: int, seed: int) -> list[tuple[str, list[tuple[int, str]]]]:
    from distil_codegpt.data.formats import read_documents

    docs = [d for d in read_documents(data, "test") if d.count("\n") > lines + 20]
    rng = random.Random(seed)
    picked = rng.sample(docs, min(files, len(docs)))
    return [(d, pauses(d, rng.randrange(10, d.count("\n") - lines), lines)) for d in picked]


def window(doc: str, cursor: int, before: int, after: int) -> tuple[str, str]:
    """(prefix, suffix) as llama.vscode cuts them: whole lines, `before` above the cursor's line and `after` below
    it; the rest of the cursor's line is not typed yet, so the suffix starts at its line break."""
    start = cursor
    for _ in range(before + 1):
        start = doc.rfind("\n", 0, start)
        if start < 0:
            break
    end = doc.find("\n", cursor)
    stop = end
    for _ in range(after):
        if stop < 0:
            break
        stop = doc.find("\n", stop + 1)
    return doc[start + 1 : cursor], (doc[end : stop if stop >= 0 else len(doc)] if end >= 0 else "")


def request(protocol: str, prefix: str, suffix: str, max_tokens: int) -> tuple[str, dict[str, Any]]:
    if protocol == "infill":
        head, _, typed = prefix.rpartition("\n")
        body = {"input_prefix": head + "\n" if _ else "", "prompt": typed, "input_suffix": suffix}
        return "/infill", body | {"n_predict": max_tokens, "cache_prompt": True, "stream": True}
    if protocol == "ollama":
        return "/api/generate", {
            "model": "m",
            "prompt": prefix,
            "suffix": suffix,
            "options": {"num_predict": max_tokens},
        }
    body = {"model": "m", "prompt": prefix, "suffix": suffix, "max_tokens": max_tokens, "stream": True}
    return "/v1/completions", body | {"stream_options": {"include_usage": True}}


def read_stream(protocol: str, r: httpx.Response, t0: float, budget: float | None) -> dict[str, Any] | None:
    """Text, first-byte time and token counts of a streamed answer; None when `budget` ran out (cancelled)."""
    text, first, prompt, cached = "", None, 0, 0
    for line in r.iter_lines():
        if budget is not None and time.perf_counter() - t0 > budget:
            return None
        line = line.removeprefix("data: ").strip()
        if not line or line == "[DONE]":
            continue
        first = first or time.perf_counter() - t0
        event = json.loads(line)
        if protocol == "openai":
            text += "".join(c["text"] for c in event.get("choices", []))
            usage = event.get("usage") or {}
            prompt = usage.get("prompt_tokens", prompt)
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", cached)
        elif protocol == "infill":
            text += event.get("content", "")
            if event.get("stop"):
                prompt, cached = event["tokens_evaluated"], event["tokens_cached"]
        else:
            text += event.get("response", "")
            if event.get("done"):
                prompt = event["prompt_eval_count"]
    if protocol == "ollama":  # Ollama reports the prompt tokens it read, not those it took from its cache
        cached = 0
    return {"text": text, "first": first or time.perf_counter() - t0, "prompt": prompt, "cached": cached}


def replay(url: str, args: argparse.Namespace, plan: list[tuple[str, list[tuple[int, str]]]]) -> dict[str, Any]:
    from distil_codegpt.evaluate.metrics import fuzz_ratio

    lat, first, es, prompt, cached, cancelled = [], [], [], 0, 0, 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for doc, points in plan:
            for k, (cursor, typed_next) in enumerate(points):
                prefix, suffix = window(doc, cursor, args.prefix_lines, args.suffix_lines)
                path, body = request(args.protocol, prefix, suffix, args.max_tokens)
                nxt = points[k + 1][0] if k + 1 < len(points) else cursor
                budget = args.ms_per_char * max(nxt - cursor, 1) / 1000 if args.ms_per_char else None
                t0 = time.perf_counter()
                with client.stream("POST", path, json=body) as r:
                    r.raise_for_status()
                    got = read_stream(args.protocol, r, t0, budget)
                if got is None:  # closing the stream hung up on the server: the editor moved on
                    cancelled += 1
                    continue
                lat.append(time.perf_counter() - t0)
                first.append(got["first"])
                prompt, cached = prompt + got["prompt"], cached + got["cached"]
                line = got["text"].split("\n", 1)[0].strip()
                es.append(fuzz_ratio(line, typed_next.strip()))
    n = len(lat)
    q = statistics.quantiles(lat, n=20) if n >= 2 else lat * 19
    return {
        "requests": n + cancelled,
        "cancelled": cancelled,
        "p50_ms": 1000 * statistics.median(lat) if lat else 0.0,
        "p95_ms": 1000 * q[18] if lat else 0.0,
        "first_byte_p50_ms": 1000 * statistics.median(first) if first else 0.0,
        "cache_hit": cached / prompt if prompt else 0.0,
        "prompt_tokens": prompt / n if n else 0.0,
        "es": sum(es) / len(es) if es else 0.0,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model: str, cache_slots: int, max_tokens: int, draft: str = "", engine: str = "auto") -> tuple[Any, str]:
    """A real uvicorn server on a free loopback port in a thread: (server, url)."""
    import uvicorn

    from distil_codegpt.config import ServeConfig, build_config
    from distil_codegpt.engines.load import load_engine
    from distil_codegpt.serve.complete import Completer
    from distil_codegpt.serve.server import create_app

    port = free_port()
    cfg = build_config(ServeConfig, {"model": model, "port": port, "cache_slots": cache_slots, "engine": engine})
    cfg.max_tokens_limit = max(cfg.max_tokens_limit, max_tokens)
    from distil_codegpt.engines.speculative import with_draft

    loaded = with_draft(load_engine(model, "cpu", cache_slots, engine=engine), draft, "cpu", 0, cache_slots)
    app = create_app(Completer(loaded), cfg)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"editor_replay: the server for {model} did not come up")
        time.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="model dir or artifact (repeat: side by side)")
    p.add_argument("--data", required=True, help="corpus directory (raw format): its test split is typed")
    p.add_argument("--protocol", choices=["openai", "infill", "ollama"], default="openai")
    p.add_argument("--files", type=int, default=6)
    p.add_argument("--lines", type=int, default=4, help="lines typed per file")
    p.add_argument("--prefix-lines", type=int, default=100, help="whole lines above the cursor's line")
    p.add_argument("--suffix-lines", type=int, default=30, help="whole lines below it")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--ms-per-char", type=float, default=0.0, help="typing speed; 0 = wait for every answer")
    p.add_argument("--draft", default="", help="also serve the first --model with this student drafting for it")
    p.add_argument(
        "--engine",
        action="append",
        choices=["auto", "torch", "llamacpp"],
        help="run every --model on this engine (repeat: each engine side by side; default auto)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the rows to this JSON file")
    args = p.parse_args()
    plan = sessions(args.data, args.files, args.lines, args.seed)
    print(f"editor_replay: {sum(len(pts) for _, pts in plan)} pauses in {len(plan)} files", file=sys.stderr)
    rows = []
    engines = args.engine or ["auto"]
    runs = [(m, "", e) for m in args.model for e in engines]
    runs += [(args.model[0], args.draft, "torch")] if args.draft else []  # drafts run on PyTorch only
    for model, draft, engine in runs:
        for mode, slots in (("cold", 0), ("warm", 2)):
            server, url = serve(model, slots, args.max_tokens, draft, engine)
            t0 = time.perf_counter()
            name = f"{Path(model).name}+{Path(draft).name}" if draft else Path(model).name
            kind = httpx.get(f"{url}/health", timeout=5).json()["engine"]
            row = {"model": name, "engine": kind, "cache": mode, **replay(url, args, plan)}
            row["wall_s"] = time.perf_counter() - t0
            server.should_exit = True
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    head = f"{'model':<28} {'engine':<11} {'cache':<5} {'req':>4} {'canc':>4} {'p50 ms':>8} {'p95 ms':>8} {'1st B':>7}"
    print(head + f" {'cached':>7} {'prompt':>7} {'ES':>6}")
    for r in rows:
        print(
            f"{r['model']:<28} {r['engine']:<11} {r['cache']:<5} {r['requests']:>4} {r['cancelled']:>4}"
            f" {r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} {r['first_byte_p50_ms']:>7.0f} {r['cache_hit']:>7.1%}"
            f" {r['prompt_tokens']:>7.0f} {r['es']:>6.2f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
