"""Training checkpoints that resume exactly: weights, optimizers, schedulers, step, token count and RNG states.

One file, OUT/checkpoints/last.pt, replaced atomically (write to a temporary name, then rename), so an
interruption at any moment leaves either the previous checkpoint or the new one, never a broken file.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distil_codegpt.config import UserError


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / "checkpoints" / "last.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str | Path, state: dict[str, Any]) -> Path:
    path = checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({**state, "rng": rng_state()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(out: str | Path) -> dict[str, Any]:
    path = checkpoint_path(out)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from; run without --resume to start afresh")
    # Our own file: it holds optimizer states and RNG states (numpy arrays, tuples), not just tensors.
    return torch.load(path, map_location="cpu", weights_only=False)
