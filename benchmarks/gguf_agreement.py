"""Does a GGUF export read and complete code as the Hugging Face model does? Token ids of every prompt and target
of a line-completion file through llama.cpp's tokenizer against the model's own, and, given two evaluations of
the same examples (one per engine), how many completions are identical.

    distil-codegpt export --model runs/pilot/teacher --format gguf --quant f32 --out runs/pilot/teacher-f32.gguf
    distil-codegpt evaluate --model runs/pilot/teacher-f32.gguf --engine llamacpp --test T --limit 100 --out E2
    python benchmarks/gguf_agreement.py runs/pilot/teacher-f32.gguf runs/pilot/teacher T --limit 100 \
        --evals runs/pilot/teacher/eval E2

Needs llama-cpp-python (`pip install -e '.[llamacpp]'`); only the GGUF's vocabulary is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from distil_codegpt.data.tokenizer import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", help="the exported .gguf file")
    ap.add_argument("model", help="the HF model directory it came from (its tokenizer)")
    ap.add_argument("test", help="a line-completion file (raw mode: JSON lines {input, gt})")
    ap.add_argument("--limit", type=int, default=100, help="first N examples")
    ap.add_argument("--evals", nargs=2, metavar=("A", "B"), help="two evaluation directories of the same examples")
    args = ap.parse_args()
    import llama_cpp

    llm = llama_cpp.Llama(args.gguf, vocab_only=True, verbose=False)
    tok = load_tokenizer(args.model)
    texts = []
    for line in Path(args.test).read_text().splitlines()[: args.limit]:
        ex = json.loads(line)
        texts += [ex["input"], ex["gt"]]
    same = sum(
        llm.tokenize(t.encode(), add_bos=False, special=True) == tok.encode(t, add_special_tokens=False) for t in texts
    )
    n_ids = sum(len(tok.encode(t, add_special_tokens=False)) for t in texts)
    print(f"token ids equal on {same} of {len(texts)} texts ({args.limit} prompts and their targets, {n_ids:,} ids)")
    if args.evals:
        a, b = (Path(d, "predictions.txt").read_text().splitlines()[: args.limit] for d in args.evals)
        agree = sum(x == y for x, y in zip(a, b))
        print(f"completions identical on {agree} of {len(a)} examples ({args.evals[0]} vs {args.evals[1]})")


if __name__ == "__main__":
    main()
