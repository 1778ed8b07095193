"""Training checkpoints that resume exactly: weights, optimizers, schedulers, step, token count and RNG states.

OUT/checkpoints/last.pt is replaced atomically (written to a temporary name, synced, renamed), so an interruption
at any moment leaves the previous checkpoint or the new one, never a broken file. The one it replaces is kept as
last.prev.pt: when last.pt is damaged anyway (a disk fault, a bad copy), `--resume` names it and offers that one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distil_codegpt.artifacts import TORCH_LOAD_ERRORS, first_line
from distil_codegpt.config import UserError
from distil_codegpt.runinfo import raise_storage_error, replace_into


def checkpoint_path(out: str | Path) -> Path:
    return Path(out) / "checkpoints" / "last.pt"


def previous_path(out: str | Path) -> Path:
    """The checkpoint before last.pt, kept so that a damaged last.pt costs one save interval, not the run."""
    return Path(out) / "checkpoints" / "last.prev.pt"


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


def _keep_previous(path: Path, prev: Path) -> None:
    """last.pt becomes last.prev.pt through a hard link, so that at every moment a whole last.pt exists."""
    link = prev.with_name(f".{prev.name}.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # a file system without hard links: a copy does the same, slower
        shutil.copyfile(path, link)
    os.replace(link, prev)


def save_checkpoint(out: str | Path, state: dict[str, Any]) -> Path:
    path = checkpoint_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save({**state, "rng": rng_state()}, tmp)
        if path.is_file():
            _keep_previous(path, previous_path(out))
        replace_into(tmp, path)
    except OSError as e:
        raise_storage_error(path, e)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


_DAMAGED = (*TORCH_LOAD_ERRORS, zipfile.BadZipFile)


def _read(path: Path) -> dict[str, Any]:
    # Our own file: it holds optimizer states and RNG states (numpy arrays, tuples), not just tensors.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or not {"step", "student", "rng"} <= state.keys():
        raise ValueError("not a training checkpoint")
    return state


def _previous_offer(out: str | Path) -> str:
    """What to do instead: the kept previous checkpoint when it reads back whole, else start afresh."""
    prev = previous_path(out)
    try:
        step = _read(prev)["step"] if prev.is_file() else None
    except (*_DAMAGED, OSError):
        step = None
    if step is None:
        return "no intact previous checkpoint is kept; rerun without --resume and with a new --out to start afresh"
    return f"the previous one is intact (step {step}): `mv {prev} {checkpoint_path(out)}` and rerun with --resume"


def load_checkpoint(out: str | Path) -> dict[str, Any]:
    path = checkpoint_path(out)
    if not path.is_file():
        if previous_path(out).is_file():
            raise UserError(f"{path}: missing; {_previous_offer(out)}")
        raise UserError(f"{path}: no checkpoint to resume from; run without --resume to start afresh")
    try:
        return _read(path)
    except _DAMAGED as e:
        raise UserError(f"{path}: damaged checkpoint ({first_line(e)[:120]}); {_previous_offer(out)}") from e
