"""Checks run on an artifact before anything reads it, so a damaged file ends in one line, not a traceback.

A half-copied model, a config edited by hand, a file from another tokenizer: the libraries that read them fail deep
inside (a safetensors header error, a dataclass validation error, an index out of range halfway through a decode).
Each check here reads only what it must (a header, a size, a JSON file) and raises `UserError` naming what is
wrong, the file, and what to do. Writing (temporary name, fsync, rename) lives in runinfo.py. `disk_mb` is what a
model directory's weights take on disk (compress and evaluate report it).
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path
from typing import Any

from distil_codegpt.config import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")

try:  # huggingface_hub validates config fields (transformers 5) and raises its own error type
    from huggingface_hub.errors import StrictDataclassError as HubConfigError
except ImportError:  # an older hub: configs are not validated there
    HubConfigError = ValueError  # type: ignore[assignment,misc]


def first_line(e: BaseException) -> str:
    """The most telling line of a library's (often multi-line) error message."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__  # its first sentence


def read_json(path: str | Path, *, fix: str, kind: type = dict) -> Any:
    """A JSON file of the expected top-level type, or one line: missing, not JSON (where), or the wrong shape."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; {fix}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {fix}") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise UserError(f"{path}: not a JSON text file ({type(e).__name__}); {fix}") from None
    if not isinstance(data, kind):
        raise UserError(f"{path}: holds a JSON {type(data).__name__}, not a {kind.__name__}; {fix}")
    return data


def check_size(path: str | Path, expected: int, *, fix: str) -> None:
    """A file of a fixed layout (a token shard, a cache array) holds exactly the bytes its header promises."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; {fix}")
    size = path.stat().st_size
    if size < expected:
        raise UserError(f"{path}: truncated ({size:,} bytes, its header says {expected:,}); {fix}")
    if size > expected:
        raise UserError(f"{path}: {size - expected:,} bytes longer than its header says ({expected:,}); {fix}")


def check_safetensors(path: str | Path, *, fix: str, role: str = "") -> None:
    """A .safetensors file is whole: its header parses and its tensors end exactly where the file does.

    Reads the header only (8 bytes of length, then JSON), so a gigabyte file is checked in microseconds.
    """
    path = Path(path)
    where = f"{role}: {path}" if role else str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise UserError(f"{where}: truncated or not a safetensors file ({size:,} bytes, no whole header); {fix}")
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise UserError(f"{where}: corrupt safetensors header; {fix}") from None
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "longer than its header says"
        raise UserError(f"{where}: {what} ({size:,} bytes, its tensors need {8 + n + end:,}); {fix}")


def check_config(path: str | Path, *, role: str) -> dict[str, Any]:
    """config.json parses and every field has a value transformers accepts; returns it as a dict."""
    from transformers import AutoConfig

    path = Path(path)
    fix = "fix it, or copy config.json again from where the model came from"
    config = read_json(path / "config.json", fix=fix)
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
    except (HubConfigError, ValueError, TypeError, KeyError) as e:
        detail = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        detail = detail.split(": ", 1)[-1] if detail.startswith(("TypeError: ", "ValueError: ")) else detail
        raise UserError(f"{role}: {path / 'config.json'}: {detail}; {fix}") from None
    return config


def check_weights(path: str | Path, *, role: str) -> None:
    """A model directory has its weight files, and every safetensors file among them is whole."""
    path = Path(path)
    fix = "copy the model again, or rewrite it (`distil-codegpt train --resume` rewrites a training run's model)"
    present = [name for name in WEIGHT_FILES if (path / name).is_file()]
    if not present:
        raise UserError(f"{role}: {path} has no weights ({' or '.join(WEIGHT_FILES[:3])}); {fix}")
    if present[0] == "model.safetensors":
        check_safetensors(path / "model.safetensors", fix=fix, role=role)
    elif present[0] == SAFETENSORS_INDEX:
        index = read_json(path / SAFETENSORS_INDEX, fix=fix)
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if not (path / shard).is_file():
                raise UserError(f"{role}: {path / shard}: missing (listed in {SAFETENSORS_INDEX}); {fix}")
            check_safetensors(path / shard, fix=fix, role=role)


def check_model_dir(path: str | Path, *, role: str = "model") -> dict[str, Any]:
    """Everything `from_pretrained` will read from a local model directory, checked first; returns config.json."""
    config = check_config(path, role=role)
    check_weights(path, role=role)
    return config


def check_vocab(model_vocab: int, tokenizer: Any, path: str | Path, *, role: str = "model") -> None:
    """A tokenizer may be no larger than the model's vocabulary: a larger one makes ids the embedding lacks.

    The failure would otherwise come mid-decode, as an index error, for the first prompt that uses such an id.
    """
    n = len(tokenizer)
    if n > model_vocab:
        raise UserError(
            f"{role}: {path} holds a tokenizer of {n:,} tokens but a model with a vocabulary of {model_vocab:,};"
            " put the tokenizer the model was trained with next to it"
        )


# what torch.load raises on a cut or overwritten file (a zip without its directory, a pickle cut short...)
TORCH_LOAD_ERRORS = (RuntimeError, EOFError, ValueError, KeyError, AttributeError, pickle.UnpicklingError)


def load_torch_file(path: str | Path, *, fix: str, weights_only: bool = True) -> Any:
    """torch.load on CPU, or one line naming the damaged file and the fix."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except TORCH_LOAD_ERRORS as e:
        raise UserError(f"{path}: damaged ({first_line(e)}); {fix}") from e


def looks_local(name_or_path: str) -> bool:
    """A path the user meant as a path (so a typo is reported as a missing directory, not a hub lookup)."""
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith(("/", "~", "."))


def disk_mb(model_dir: str | Path) -> float | None:
    """Weight files (*.safetensors, *.bin) directly in a local model directory, in MB; None for a hub id.

    Only the top level counts: `checkpoints/` under a trained model holds resume state, not the model.
    """
    p = Path(model_dir).expanduser()
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)) / 1e6
