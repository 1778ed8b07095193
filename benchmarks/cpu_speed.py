"""CPU speed of a student side by side, in one run: KD step fp32 vs bf16 autocast, decode latency fp32 / bf16 / int8,
and the output head's share of a decoding step before and after `compress --trim-vocab`.

    python benchmarks/cpu_speed.py --teacher runs/demo/teacher --student runs/demo/students/8-frozen \
        --data runs/demo/data

Rows (each in its own process, so that one variant's OpenMP threads and memory do not slow the next):

  kd fp32, kd bf16     one optimizer step of online KD with the frozen teacher (`Trainer.train_step`, the logit
                       recipe: forward KL at T = 1), --batch-size x --seq-len tokens from the train split; tokens/s
  decode <variant>     the student on one --prompt-tokens prompt from the test split: prefill, then --new-tokens
                       greedy steps with the KV cache, no stop; ms per new token, prefill tokens/s, and the time
                       spent inside the output head (forward hooks) as a share of the step
                       variants: fp32, bf16 (autocast), int8 (`compress --quantize int8`), trimmed fp32 and int8
                       (`compress --trim-vocab DATA`, with that artifact's held-out coverage)

The compressed artifacts are built in --work (a temporary directory unless given) and reused when present.
bf16 autocast is only faster on a CPU with native bf16 (AVX-512 BF16 or AMX; elsewhere it is emulated).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def prompt_ids(a: argparse.Namespace) -> torch.Tensor:
    """(1, P) ids of the test split (dev if none), tokenised with the student's tokenizer."""
    from distil_codegpt.data.shards import TokenShard, ensure_shards

    shard_dir = ensure_shards(a.data, a.student)
    split = "test" if (shard_dir / "test.json").is_file() else "dev"
    tokens = TokenShard(shard_dir, split).tokens
    return torch.tensor(tokens[: a.prompt_tokens].astype("int64"))[None]


def time_kd(a: argparse.Namespace, precision: str) -> dict:
    from distil_codegpt.config import DistilConfig, build_config
    from distil_codegpt.data.shards import ensure_shards
    from distil_codegpt.distill.trainer import Trainer, setup_runtime
    from distil_codegpt.model.presets import load_model

    values = {"data": a.data, "out": "unused", "teacher": a.teacher, "student": a.student, "recipe": "logit"}
    values |= {"seq_len": a.seq_len, "batch_size": a.batch_size, "device": "cpu", "precision": precision}
    cfg = build_config(DistilConfig, {**values, "threads": a.threads, "tensorboard": False})
    teacher, student = load_model(a.teacher, dtype=torch.float32), load_model(a.student, dtype=torch.float32)
    trainer = Trainer(cfg, setup_runtime(cfg), student, ensure_shards(a.data, a.student), teacher=teacher)
    trainer.train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(a.steps):
        trainer.train_step()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": a.steps * a.batch_size * a.seq_len / seconds, "ms_per_step": 1000 * seconds / a.steps}


def time_decode(a: argparse.Namespace, path: str, precision: str) -> dict:
    """Prefill once (timed), then greedy steps with the cache; the head's time from hooks around its forward."""
    from distil_codegpt.engines.load import load_for_evaluation
    from distil_codegpt.model import families

    torch.set_num_threads(a.threads or torch.get_num_threads())
    model = load_for_evaluation(path)[0].eval()
    head, spent = model.get_output_embeddings(), [0.0]
    head.register_forward_pre_hook(lambda m, i: spent.__setitem__(0, spent[0] - time.perf_counter()))
    head.register_forward_hook(lambda m, i, o: spent.__setitem__(0, spent[0] + time.perf_counter()))
    x = prompt_ids(a)
    arg = families.cache_arg(model)
    amp = torch.bfloat16 if precision == "bf16" else None
    with torch.inference_mode(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        model(input_ids=x[:, :8], use_cache=True)  # warm-up
        start = time.perf_counter()
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        past, nxt = out.get(arg), out.logits[:, -1:].argmax(-1)
        spent[0] = 0.0
        start = time.perf_counter()
        for _ in range(a.new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{arg: past})
            past, nxt = out.get(arg), out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    return {
        "ms_per_token": 1000 * decode / a.new_tokens,
        "prefill_tokens_per_s": x.size(1) / prefill,
        "head_share": spent[0] / decode,
    }


def artifacts(a: argparse.Namespace, work: Path) -> dict[str, str]:
    """The compressed students, built once in `work`."""
    from distil_codegpt.compress.run import run_compress
    from distil_codegpt.config import CompressConfig, build_config

    made = {"int8": {"quantize": "int8"}, "trimmed": {"trim_vocab": a.data}}
    made["trimmed-int8"] = {"trim_vocab": a.data, "quantize": "int8"}
    for name, values in made.items():
        if not (work / name / "run.json").is_file():
            run_compress(build_config(CompressConfig, {"model": a.student, "out": str(work / name), **values}))
    return {name: str(work / name) for name in made}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="teacher model dir (the KD rows)")
    p.add_argument("--student", required=True, help="student model dir with its tokenizer")
    p.add_argument("--data", required=True, help="corpus directory (train split for KD and trimming, test prompts)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed KD steps (after one warm-up step)")
    p.add_argument("--prompt-tokens", type=int, default=1000, help="prompt length of the decode rows")
    p.add_argument("--new-tokens", type=int, default=32, help="timed decoding steps")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--work", help="where the int8 and trimmed artifacts go (default: a temporary dir)")
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # internal: kind, path, precision
    a = p.parse_args()
    if a.one:
        kind, path, precision = a.one
        print(json.dumps(time_kd(a, precision) if kind == "kd" else time_decode(a, path, precision)))
        return
    work = Path(a.work or tempfile.mkdtemp(prefix="cpu_speed."))
    made = artifacts(a, work)
    rows = [
        ("kd fp32", "kd", a.student, "fp32"),
        ("kd bf16", "kd", a.student, "bf16"),
        ("decode fp32", "decode", a.student, "fp32"),
        ("decode bf16", "decode", a.student, "bf16"),
        ("decode int8", "decode", made["int8"], "fp32"),
        ("decode trimmed fp32", "decode", made["trimmed"], "fp32"),
        ("decode trimmed bf16", "decode", made["trimmed"], "bf16"),
        ("decode trimmed int8", "decode", made["trimmed-int8"], "fp32"),
    ]
    trim = json.loads((Path(made["trimmed"]) / "run.json").read_text())["metrics"]["trim"]
    print(
        f"student {a.student}; teacher {a.teacher}; KD batch {a.batch_size} x {a.seq_len}; decode: prompt"
        f" {a.prompt_tokens} tokens, {a.new_tokens} new; trimmed head {trim['kept']:,} of {trim['vocab_size']:,} ids,"
        f" covering {trim['heldout_coverage']:.2%} of the {trim['heldout_split']} split; artifacts in {work}"
    )
    print(f"{'row':<22} {'tokens/s':>9} {'ms/step':>9} {'ms/token':>9} {'prefill tok/s':>13} {'head share':>10}")
    argv = [sys.executable, __file__, *sys.argv[1:]]
    for name, kind, path, precision in rows:
        done = subprocess.run([*argv, "--one", kind, path, precision], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        if kind == "kd":
            print(f"{name:<22} {r['tokens_per_s']:>9.0f} {r['ms_per_step']:>9.0f}")
        else:
            print(
                f"{name:<22} {'':>9} {'':>9} {r['ms_per_token']:>9.2f} {r['prefill_tokens_per_s']:>13.0f}"
                f" {r['head_share']:>10.1%}"
            )


if __name__ == "__main__":
    main()
