"""Line-completion throughput: one-at-a-time `generate` against our batched decoding, on the same examples.

    make demo
    python benchmarks/eval_throughput.py --model runs/demo/teacher --n 200 --batch-size 16 32 64
    python benchmarks/eval_throughput.py --preset codegpt-small --tokenizer runs/demo/tok --n 16 --batch-size 16

`--model` takes a trained model directory; `--preset` builds a random-initialised model of that shape with the
given tokenizer (a random model rarely ends a line, so nearly every completion runs to --max-new-tokens: a
worst case). Greedy, fp32, on the CPU or (`--device cuda`) a GPU. Prints samples/s of each way, the ratio to one
at a time, and the share of predictions identical to one at a time's.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from distil_codegpt.data.line_completion import read_examples
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.evaluate.completion import StopIds, complete, encode_inputs, finish, is_raw
from distil_codegpt.model import families
from distil_codegpt.model.families import count_params
from distil_codegpt.model.presets import load_model, preset_config


def naive(model, tok, inputs: list[str], max_new_tokens: int, stops: StopIds) -> list[str]:  # noqa: ANN001
    """The plain way: each example alone through `generate` (with its KV cache), in file order."""
    out = []
    context = families.context(model)
    with torch.inference_mode():
        for text in inputs:
            ids = torch.tensor([encode_inputs(tok, [text], context - max_new_tokens)[0]], device=model.device)
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stops.for_mode(is_raw(text)),
                pad_token_id=stops.fill,
            )
            out.append(finish(tok, gen[0, ids.shape[1] :].tolist(), is_raw(text), stops))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="trained model directory (with its tokenizer)")
    p.add_argument("--preset", help="or: a preset shape, random weights (needs --tokenizer)")
    p.add_argument("--tokenizer", default="runs/demo/tok")
    p.add_argument("--test", default="runs/demo/data/line_completion/test.json")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--batch-size", type=int, nargs="+", default=[32], help="one or more; each gets a row")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="fp32 on either")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        model, tok = load_model(a.model), load_tokenizer(a.model)
    else:
        tok = load_tokenizer(a.tokenizer)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(preset_config(a.preset or "tiny", len(tok)))
    model.to(a.device).eval()
    inputs = [ex.input for ex in read_examples(a.test)[: a.n]]
    stops = StopIds.of(tok)
    kw = {"max_new_tokens": a.max_new_tokens, "device": a.device, "progress": False, "stops": stops}
    complete(model, tok, inputs[:2], batch_size=2, **kw)  # warm-up (allocator, kernels), untimed
    naive(model, tok, inputs[:2], a.max_new_tokens, stops)

    start = time.perf_counter()
    one = naive(model, tok, inputs, a.max_new_tokens, stops)
    naive_s = time.perf_counter() - start
    rows = [("one at a time (generate)", naive_s, 1.0)]
    for batch in a.batch_size:
        start = time.perf_counter()
        batched = complete(model, tok, inputs, batch_size=batch, **kw)
        seconds = time.perf_counter() - start
        rows.append((f"batched, batch {batch}", seconds, sum(x == y for x, y in zip(one, batched)) / len(inputs)))

    cfg = model.config
    name = a.model or f"{a.preset or 'tiny'} (random weights)"
    shape = f"{families.depth(model)} layers x {families.width(model)}"
    print(f"{name}: {families.family(model).name}, {shape}, {count_params(model):,} params, vocab {cfg.vocab_size}")
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {threads} threads"
    print(f"{len(inputs)} examples, up to {a.max_new_tokens} new tokens, greedy fp32; {where}")
    print(f"{'way':<26} {'samples/s':>10} {'ratio':>7} {'identical':>10}")
    for way, seconds, same in rows:
        print(f"{way:<26} {len(inputs) / seconds:>10.2f} {naive_s / seconds:>7.2f} {same:>10.1%}")


if __name__ == "__main__":
    main()
