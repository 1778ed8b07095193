"""Tokens/s and peak memory of one optimizer step of `train` and `distil` (frozen and in-training teacher).

    make demo        # builds runs/demo/data and runs/demo/tok
    python benchmarks/distil_throughput.py --preset tiny --teacher-layers 4 --student-layers 2
    python benchmarks/distil_throughput.py --preset codegpt-small --device cuda --batch-size 16 --seq-len 1024

Each mode runs in its own process (so peak RSS on CPU is that mode's own), through the real training step of
`distil_codegpt.distill.trainer.Trainer`, on random-initialised models of the preset's shape and the demo's
token shards: a few warm-up steps, then timed steps. Peak memory: max RSS on CPU, max allocated on CUDA.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from transformers import GPT2LMHeadModel

from distil_codegpt.config import DistilConfig, TrainConfig, build_config
from distil_codegpt.data.shards import ensure_shards
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.distill.trainer import Trainer, setup_runtime
from distil_codegpt.model.presets import count_params, gpt2_config
from distil_codegpt.model.student import copy_weights, pick_layers, student_config

MODES = ("train-teacher", "train-student", "distil-frozen", "distil-train")


def run_mode(a: argparse.Namespace) -> dict:
    """One mode, in this process: build models, warm up, time `a.steps` optimizer steps."""
    tok = load_tokenizer(a.tokenizer)
    shard_dir = ensure_shards(a.data, a.tokenizer)
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(gpt2_config(a.preset, len(tok), layers=a.teacher_layers))
    student = GPT2LMHeadModel(student_config(teacher.config, a.student_layers))
    copy_weights(teacher, student, pick_layers(a.teacher_layers, a.student_layers))
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
    }
    if a.mode.startswith("train"):
        cfg = build_config(TrainConfig, common)
        model, other = (teacher, None) if a.mode == "train-teacher" else (student, None)
    else:
        mode = "frozen" if a.mode == "distil-frozen" else "train"
        cfg = build_config(DistilConfig, {**common, "teacher": "t", "student": "s", "teacher_mode": mode})
        model, other = student, teacher
    rt = setup_runtime(cfg)
    trainer = Trainer(cfg, rt, model, shard_dir, teacher=other)
    for _ in range(a.warmup):
        trainer.train_step()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(a.steps):
        trainer.train_step()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if rt.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "mode": a.mode,
        "params": count_params(model),
        "tokens_per_s": a.steps * a.batch_size * a.seq_len / seconds,
        "ms_per_step": 1000 * seconds / a.steps,
        "peak_mb": peak_mb,
        "device": str(rt.device),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--tokenizer", default="runs/demo/tok")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    a = p.parse_args()
    if a.mode:
        print(json.dumps(run_mode(a)))
        return
    rows = []
    for mode in a.modes:
        argv = [arg for arg in sys.argv[1:] if arg != "--modes" and arg not in MODES]
        done = subprocess.run([sys.executable, __file__, *argv, "--mode", mode], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"preset {a.preset}: teacher {a.teacher_layers} layers, student {a.student_layers}; batch {a.batch_size} x"
        f" {a.seq_len} tokens; {rows[0]['device']}, {rows[0]['threads']} threads, precision {a.precision}"
    )
    print(f"{'mode':<14} {'params':>12} {'tokens/s':>10} {'ms/step':>9} {'peak MB':>9}")
    for r in rows:
        print(
            f"{r['mode']:<14} {r['params']:>12,} {r['tokens_per_s']:>10,.0f} {r['ms_per_step']:>9.1f}"
            f" {r['peak_mb']:>9.0f}"
        )


if __name__ == "__main__":
    main()
