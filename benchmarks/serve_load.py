"""Load on a running `serve`: N completion requests at concurrency C; throughput, latency, errors by kind.

    distil-codegpt serve --model runs/demo/student-8 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 200 --concurrency 4 \\
        --prompts runs/demo/data/line_completion/test.json --max-tokens 32 --timeout 30 \\
        --protocols openai,infill,ollama --cancel-every 5

Prompts are the inputs of a line-completion file turned into the raw code an editor would send (normalised
CodeXGLUE inputs are denormalised; raw-mode inputs are used as they are), cycled to N; without --prompts a few
built-in snippets. Clients are threads with urllib, so the only server this measures is the one at --url.
The run is bounded: at most --requests requests, none started after --duration seconds, each given up after
--timeout seconds. The server runs one request at a time, so concurrency above 1 measures queueing (and,
past its queue size, 503s), not parallel speed. Only loopback URLs unless --allow-remote: this is a load test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from urllib.parse import urlsplit

SNIPPETS = [
    "import os\n\n\ndef read_lines(path):\n    with open(path) as f:\n        return ",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.",
    "for i, line in enumerate(lines):\n    if line.startswith(",
    "def fib(n):\n    if n < 2:\n        return n\n    return ",
]


def load_prompts(path: str | None) -> list[str]:
    """Raw code to complete: from a line-completion file (normalised or raw inputs), or the built-in snippets."""
    if not path:
        return SNIPPETS
    from distil_codegpt.data.denormalize import denormalize
    from distil_codegpt.data.line_completion import read_examples
    from distil_codegpt.evaluate.completion import is_raw

    prompts = []
    for ex in read_examples(path):
        if is_raw(ex.input):
            prompts.append(ex.input)
        else:  # the cut is mid-line unless the input ends with <EOL>, so no newline after the last line
            code = denormalize(ex.input).code
            prompts.append(code if ex.input.rstrip().endswith("<EOL>") else code.rstrip("\n"))
    return prompts or SNIPPETS


PATHS = {"openai": "/v1/completions", "infill": "/infill", "ollama": "/api/generate"}


def body_for(protocol: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    if protocol == "infill":
        return {"input_prefix": prompt, "input_suffix": "", "n_predict": max_tokens, "stream": stream}
    if protocol == "ollama":
        return {"model": "m", "prompt": prompt, "options": {"num_predict": max_tokens}, "stream": stream}
    return {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, "temperature": 0}


def finished(protocol: str, data: bytes, stream: bool) -> tuple[bool, int]:
    """(the answer is whole, completion tokens or streamed pieces) in each protocol's shape."""
    if protocol == "ollama":
        lines = [json.loads(x) for x in data.decode().splitlines() if x.strip()]
        return bool(lines) and lines[-1].get("done") is True, lines[-1].get("eval_count", 0) if lines else 0
    if not stream:
        body = json.loads(data)
        return True, body["usage"]["completion_tokens"] if protocol == "openai" else body["tokens_predicted"]
    events = [e[len("data: ") :] for e in data.decode().split("\n\n") if e.startswith("data: ")]
    if protocol == "openai":
        return bool(events) and events[-1] == "[DONE]", len(events) - 2
    return bool(events) and json.loads(events[-1]).get("stop") is True, len(events) - 1


def post(url: str, protocol: str, body: dict, timeout: float, hang_up: bool) -> tuple[str, float, float, int]:
    """One request: (outcome, seconds to the whole answer, seconds to the first byte of it, completion tokens).
    With `hang_up`, the client closes the connection after the first byte, as an editor cancels a request."""
    req = urllib.request.Request(
        f"{url}{PATHS[protocol]}", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            first = r.read(1)
            t_first = time.perf_counter() - t0
            if hang_up:
                return "cancelled", t_first, t_first, 0
            data = first + r.read()
        whole, tokens = finished(protocol, data, body["stream"])
        return ("ok" if whole else "stream_not_done"), time.perf_counter() - t0, t_first, tokens
    except urllib.error.HTTPError as e:
        return f"http_{e.code}", time.perf_counter() - t0, 0.0, 0
    except TimeoutError:
        return "timeout", time.perf_counter() - t0, 0.0, 0
    except urllib.error.URLError as e:
        kind = "timeout" if isinstance(e.reason, TimeoutError) else "connection"
        return kind, time.perf_counter() - t0, 0.0, 0
    except (OSError, ValueError, KeyError) as e:
        return type(e).__name__, time.perf_counter() - t0, 0.0, 0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


def run_load(a: argparse.Namespace, prompts: list[str]) -> tuple[list[tuple[str, float, float, int]], float]:
    """Send the requests from --concurrency threads; stop at --requests or when --duration has passed."""
    protocols = a.protocols.split(",")
    cycle = itertools.islice(enumerate(itertools.cycle(prompts)), a.requests)
    lock = threading.Lock()
    results: list[tuple[str, float, float, int]] = []
    t0 = time.perf_counter()
    stop_at = t0 + a.duration

    def client() -> None:
        while time.perf_counter() < stop_at:
            with lock:
                k, prompt = next(cycle, (0, None))
            if prompt is None:
                return
            protocol = protocols[k % len(protocols)]
            hang_up = bool(a.cancel_every) and k % a.cancel_every == a.cancel_every - 1
            body = body_for(protocol, prompt, a.max_tokens, a.stream or hang_up)
            result = post(a.url, protocol, body, a.timeout, hang_up)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback unless --allow-remote)")
    p.add_argument("--requests", type=int, default=100, help="requests to send in all")
    p.add_argument("--concurrency", type=int, default=4, help="clients sending at once")
    p.add_argument("--prompts", help="line-completion file (test.json); default: built-in snippets")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before one request is given up")
    p.add_argument("--duration", type=float, default=300.0, help="no request starts after this many seconds")
    p.add_argument("--stream", action="store_true", help="ask for server-sent events (latency to first byte too)")
    p.add_argument("--allow-remote", action="store_true", help="allow a URL that is not this machine")
    p.add_argument("--protocols", default="openai", help="comma list of openai, infill, ollama: used in turn")
    p.add_argument("--cancel-every", type=int, default=0, help="every K-th request hangs up after its first byte")
    a = p.parse_args()
    if set(a.protocols.split(",")) - set(PATHS):
        print(f"serve_load: --protocols {a.protocols!r}: use a comma list of {', '.join(PATHS)}", file=sys.stderr)
        return 2
    a.url = a.url.rstrip("/")
    from distil_codegpt.serve.server import is_loopback

    host = urlsplit(a.url).hostname or ""
    if not is_loopback(host):
        print(f"serve_load: {host!r} is not loopback; pass --allow-remote to load another machine", file=sys.stderr)
        return 2
    if min(a.requests, a.concurrency, a.max_tokens) < 1 or min(a.timeout, a.duration) <= 0:
        print("serve_load: --requests, --concurrency, --max-tokens, --timeout, --duration must be > 0", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(f"{a.url}/health", timeout=a.timeout) as r:
            health = json.load(r)
    except (OSError, ValueError) as e:
        print(f"serve_load: no server at {a.url} ({e}); start one with `distil-codegpt serve`", file=sys.stderr)
        return 2
    prompts = load_prompts(a.prompts)
    mean_chars = sum(map(len, prompts)) / len(prompts)
    print(
        f"{a.url}: model {health.get('model')} ({health.get('engine')} engine, {health.get('mode')} mode), "
        f"queue limit {health.get('queue', {}).get('limit')}; {a.requests} requests at concurrency {a.concurrency}, "
        f"max_tokens {a.max_tokens}{', streamed' if a.stream else ''}; {len(prompts)} prompts of "
        f"{mean_chars:.0f} chars on average"
    )
    results, wall = run_load(a, prompts)
    ok = [r for r in results if r[0] == "ok"]
    cancelled = sum(r[0] == "cancelled" for r in results)
    errors = Counter(r[0] for r in results if r[0] not in ("ok", "cancelled"))
    lat = [r[1] * 1000 for r in ok]
    tokens = sum(r[3] for r in ok)
    print(
        f"sent {len(results)} in {wall:.1f} s: ok {len(ok)}, cancelled {cancelled}, errors {sum(errors.values())}",
        end="",
    )
    print(f" ({', '.join(f'{k}: {v}' for k, v in errors.most_common())})" if errors else "")
    print(
        f"throughput {len(ok) / wall:.2f} req/s, {tokens / wall:.1f} completion {'pieces' if a.stream else 'tokens'}/s"
    )
    print(f"latency ms  p50 {percentile(lat, 0.5):.1f}  p95 {percentile(lat, 0.95):.1f}  max {max(lat, default=0):.1f}")
    if a.stream:
        first = [r[2] * 1000 for r in ok]
        print(f"first byte ms  p50 {percentile(first, 0.5):.1f}  p95 {percentile(first, 0.95):.1f}")
    if len(results) < a.requests:
        print(f"stopped after --duration {a.duration:.0f} s with {a.requests - len(results)} requests unsent")
    try:
        with urllib.request.urlopen(f"{a.url}/health", timeout=a.timeout) as r:
            print(f"after: /health {json.load(r)['status']}")
    except (OSError, ValueError) as e:
        print(f"after: the server does not answer /health ({e})")
        return 1
    return 0 if ok and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
