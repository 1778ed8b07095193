"""Tokens/s and peak memory of one optimizer step: the naive KD step against ours, side by side, in one run.

    make demo        # builds runs/demo/data and runs/demo/tok
    python benchmarks/distil_throughput.py --preset tiny --teacher-layers 4 --student-layers 2
    python benchmarks/distil_throughput.py --preset small-cpu --teacher-layers 12 --student-layers 6
    python benchmarks/distil_throughput.py --preset small-cpu --vocab 50257 --modes naive frozen
    python benchmarks/distil_throughput.py --preset codegpt-small --device cuda --batch-size 16 --seq-len 1024

Modes, each through the real step of `distil_codegpt.distill.trainer.Trainer`, on random-initialised models of
the preset's shape (the student built from the teacher's layers) and the demo's token shards:

  naive        KD with a frozen teacher on full logits: teacher forward, student forward and backward, both
               [B, T, V] fp32 log-softmaxes materialised, then KL (--loss-chunk 0 --pad-vocab 1)
  frozen       our online KD with a frozen teacher (chunked head loss, head padded to 64: the defaults)
  in-training  our online KD with the teacher trained in the same steps
  cache        our KD from a teacher cache (top-k; built once before the timing, its cost printed apart)
  clm          plain causal-LM training of the student: the floor of any KD step

Every KD mode optimises the same objective (alpha_ce 5, alpha_clm 2, alpha_cos --alpha-cos, default 0 since the
cache has no hidden states). Each mode runs in its own process, so its memory is its own: `peak MB` is the peak
RSS on CPU (max allocated on CUDA), `step MB` that peak minus the memory held before the first step (models,
optimizer state excluded; what the step itself needs). --vocab overrides the tokenizer's vocabulary size (the
model's head grows; the data keep their ids) to show the cost of CodeGPT's 50k vocabulary.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from distil_codegpt.config import CacheTeacherConfig, DistilConfig, TrainConfig, build_config
from distil_codegpt.data.shards import ensure_shards
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill.trainer import Trainer, setup_runtime
from distil_codegpt.model import families
from distil_codegpt.model.families import count_params
from distil_codegpt.model.presets import preset_config
from distil_codegpt.model.student import copy_weights, pick_layers

MODES = ("naive", "frozen", "in-training", "cache", "clm")


def models(a: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedModel]:
    tok = load_tokenizer(a.tokenizer)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(preset_config(a.preset, a.vocab or len(tok), layers=a.teacher_layers))
    picked = pick_layers(a.teacher_layers, a.student_layers)
    student = AutoModelForCausalLM.from_config(families.with_depth(teacher.config, picked))
    copy_weights(teacher, student, picked)
    return teacher, student


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_mode(a: argparse.Namespace) -> dict:
    """One mode, in this process: build models, warm up, time `a.steps` optimizer steps."""
    shard_dir = ensure_shards(a.data, a.tokenizer)
    teacher, student = models(a)
    common = {
        "data": a.data,
        "out": "unused",
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "micro_batch_size": a.micro_batch_size,
        "device": a.device,
        "precision": a.precision,
        "compile": a.compile,
        "threads": a.threads,
        "loss_chunk": a.loss_chunk,
        "pad_vocab": a.pad_vocab,
    }
    kd = {"teacher": "t", "student": "s", "alpha_ce": 5.0, "alpha_clm": 2.0, "alpha_cos": a.alpha_cos}
    cache = None
    if a.mode == "clm":
        cfg = build_config(TrainConfig, common)
        teacher = None
    elif a.mode == "cache":
        from distil_codegpt.distill.teacher_cache import TeacherCache

        cfg = build_config(DistilConfig, {**common, **kd, "teacher": "", "teacher_cache": a.cache_dir})
        cache, teacher = TeacherCache(a.cache_dir), None
    else:
        mode = {"naive": "frozen", "frozen": "frozen", "in-training": "train"}[a.mode]
        naive = {"loss_chunk": 0, "pad_vocab": 1} if a.mode == "naive" else {}
        cfg = build_config(DistilConfig, {**common, **kd, "teacher_mode": mode, **naive})
    rt = setup_runtime(cfg)
    params = count_params(student)  # before the trainer pads the head
    trainer = Trainer(cfg, rt, student, shard_dir, teacher=teacher, teacher_cache=cache)
    cuda = rt.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base_mb = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base_mb = rss_mb()
    for _ in range(a.warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(a.steps):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "mode": a.mode,
        "params": params,
        "tokens_per_s": a.steps * a.batch_size * a.seq_len / seconds,
        "ms_per_step": 1000 * seconds / a.steps,
        "peak_mb": peak_mb,
        "step_mb": peak_mb - base_mb,
        "device": str(rt.device),
        "threads": torch.get_num_threads(),
    }


def build_cache(a: argparse.Namespace, root: Path) -> dict:
    """A teacher cache of the random teacher over enough windows for the timed steps (not timed with them)."""
    from distil_codegpt.distill.teacher_cache import build_cache as build

    teacher, _ = models(a)
    teacher.save_pretrained(root / "teacher")
    values = {"teacher": str(root / "teacher"), "tokenizer": a.tokenizer, "data": a.data, "out": str(root / "cache"),
              "top_k": a.top_k, "seq_len": a.seq_len, "max_windows": a.cache_windows, "device": a.device,
              "precision": a.precision, "threads": a.threads}  # fmt: skip
    return build(build_config(CacheTeacherConfig, values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=0, help="model vocabulary (0 = the tokenizer's)")
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--tokenizer", default="runs/demo/tok")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=0)
    p.add_argument("--alpha-cos", type=float, default=0.0)
    p.add_argument("--loss-chunk", type=int, default=-1, help="tokens per chunk of our modes' head loss (-1 = auto)")
    p.add_argument("--pad-vocab", type=int, default=0, help="our modes: pad the head (0 = 64 on CUDA, off on CPU)")
    p.add_argument("--top-k", type=int, default=64, help="teacher cache: log-probs kept per token")
    p.add_argument("--cache-windows", type=int, default=256, help="teacher cache: windows cached (and sampled)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache_note = ""
        argv = [arg for arg in sys.argv[1:] if arg != "--modes" and arg not in MODES]
        if "cache" in a.modes:
            made = build_cache(a, Path(tmp))
            argv += ["--cache-dir", str(Path(tmp) / "cache")]
            cache_note = (
                f"teacher cache: top-{a.top_k}, {made['bytes_per_token']} bytes/token, built at"
                f" {made['tokens_per_s']:,.0f} tokens/s ({made['n_rows']:,} tokens in {made['seconds']:.1f} s)"
            )
        rows = []
        for mode in a.modes:
            done = subprocess.run([sys.executable, __file__, *argv, "--mode", mode], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    vocab = a.vocab or len(load_tokenizer(a.tokenizer))
    print(
        f"preset {a.preset}: teacher {a.teacher_layers} layers, student {a.student_layers} ({rows[0]['params']:,}"
        f" params); vocab {vocab:,}; batch {a.batch_size} x {a.seq_len} tokens; {rows[0]['device']},"
        f" {rows[0]['threads']} threads, precision {a.precision}{', compiled' if a.compile else ''};"
        f" our modes: --loss-chunk {a.loss_chunk} --pad-vocab {a.pad_vocab}"
    )
    if cache_note:
        print(cache_note)
    naive = next((r for r in rows if r["mode"] == "naive"), None)
    print(f"{'mode':<12} {'tokens/s':>10} {'ms/step':>9} {'peak MB':>9} {'step MB':>9} {'speed vs naive':>15}")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / naive['tokens_per_s']:.2f}x" if naive else "-"
        print(
            f"{r['mode']:<12} {r['tokens_per_s']:>10,.0f} {r['ms_per_step']:>9.1f} {r['peak_mb']:>9.0f}"
            f" {r['step_mb']:>9.0f} {ratio:>15}"
        )
    by = {r["mode"]: r for r in rows}
    if "cache" in by and "frozen" in by:
        print(f"cache / online frozen: {by['cache']['tokens_per_s'] / by['frozen']['tokens_per_s']:.2f}x tokens/s")
    if naive and "frozen" in by:
        print(f"online frozen step memory / naive: {by['frozen']['step_mb'] / max(naive['step_mb'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
