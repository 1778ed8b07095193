"""Device and precision choices shared by training and evaluation: one policy, one set of error messages."""

from __future__ import annotations

import os

import torch

from distil_codegpt.config import ConfigError

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_threads(threads: int = 0) -> int:
    """Threads for torch's CPU kernels: `threads`, or else the cores this process may run on, shared evenly by the
    processes of a torchrun launch on this machine (two processes with all cores each would fight over them)."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def pick_device(device: str, threads: int = 0, local_rank: int = 0) -> torch.device:
    """`auto` takes CUDA when visible; asking for CUDA without one is an error, not a silent fallback."""
    torch.set_num_threads(cpu_threads(threads))
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' but no CUDA device is visible; use --device cpu")
    return torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for a precision name; `auto` is bf16 on CUDA and fp32 (none) on CPU. fp16 needs CUDA."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision: 'fp16' needs CUDA; use fp32 or bf16")
    return AUTOCAST[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return {v: k for k, v in AUTOCAST.items()}[dtype]
