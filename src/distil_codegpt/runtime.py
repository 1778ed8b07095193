"""Device and precision choices shared by training and evaluation: one policy, one set of error messages."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from distil_codegpt.config import ConfigError

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of CPUs with native bf16 matrix instructions (AVX-512 BF16, AMX); without them bf16 autocast
# is emulated and slower than fp32.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# "1" or "0" overrides the detection (tests pin fp32; a user can force either way)
CPU_BF16_ENV = "DISTIL_CODEGPT_CPU_BF16"


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


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The feature flags the kernel reports for the first CPU (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: a BF16 flag in /proc/cpuinfo, or torch's own report of AMX.

    `DISTIL_CODEGPT_CPU_BF16=1|0` overrides the detection (read on each call, so tests can set it).
    """
    return bool(cpu_flags() & set(BF16_FLAGS)) or "AMX" in torch.backends.cpu.get_cpu_capability()


def cpu_bf16() -> bool:
    """`cpu_has_bf16`, unless the environment says otherwise (CPU_BF16_ENV)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_has_bf16()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for a precision name; `auto` is bf16 on CUDA and on a CPU with native bf16 (`cpu_bf16`), fp32
    (none) on any other CPU, where emulated bf16 would only be slower. fp16 needs CUDA."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision: 'fp16' needs CUDA; use fp32 or bf16")
    return AUTOCAST[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return {v: k for k, v in AUTOCAST.items()}[dtype]
