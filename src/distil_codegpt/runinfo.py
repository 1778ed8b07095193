"""The run.json manifest every stage writes, the engine.json that marks an artifact, and small file helpers shared by
the stages."""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from distil_codegpt import __version__
from distil_codegpt.config import UserError

_LIBS = ("torch", "transformers", "tokenizers", "numpy")
ENGINE_FILE = "engine.json"  # in an artifact directory: the engine that loads it (engines/load.py reads it)


def git_commit() -> str | None:
    """The commit of the package's source tree, when it runs from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return out.stdout.strip()


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for lib in _LIBS:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def cpu_model() -> str:
    """The processor's model name (Linux's /proc/cpuinfo; the platform's word elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a stage ran: wall-clock figures (a budget of minutes, tokens/s, latency) compare only within one machine.
    `isa` is the widest vector instructions PyTorch's CPU kernels use here (AVX2, AVX512, ...)."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0))
                            if hasattr(os, "sched_getaffinity") else os.cpu_count()}  # fmt: skip
    torch = sys.modules.get("torch")  # every stage that times anything has loaded it; none loads it for this
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
        info["isa"] = capability() if capability else None
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


# Files this process moved into place, in order: after an error the CLI says what a run did and did not write.
WRITTEN: list[Path] = []
# Storage faults: an error while writing one of these is the disk's, not the code's, and is reported as such.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable: without this a power cut may undo it even after the file's own fsync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_into(tmp: str | Path, path: str | Path) -> None:
    """Move a finished temporary file onto `path`: its bytes reach the disk first, then the rename, then the dir."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
    WRITTEN.append(Path(path))


def raise_storage_error(path: str | Path, e: OSError) -> None:
    """One line for a write that failed on the storage side (full disk...); the previous `path` is still in place.

    Returns quietly for any other OSError, which the caller re-raises as it is.
    """
    if e.errno not in _STORAGE_ERRNOS:
        return
    fix = {
        errno.ENOSPC: "free disk space",
        errno.EDQUOT: "free space under your quota",
        errno.EROFS: "pass an --out on a writable disk",
    }.get(e.errno, "check the disk")
    raise UserError(
        f"{path}: not written ({e.strerror}); the previous version, if any, is unchanged; {fix} and rerun"
    ) from e


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a half-written one."""
    with atomic_open(path) as f:
        f.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to `path`; only if the block succeeds is it synced and moved into place.

    A crash or a full disk mid-write leaves the previous `path` as it was and at most a stray `.NAME.*.tmp`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    kw: dict[str, Any] = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
        replace_into(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise_storage_error(path, e)
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_files(out: str | Path) -> Iterator[Path]:
    """A scratch directory inside `out` to write a set of files into (a model, its tokenizer); on success each
    file is synced and renamed over its namesake in `out`, weights before config, so every file in `out` is
    always a whole one. On failure the scratch is removed and `out` keeps its previous files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".staged."))
    try:
        yield stage
        files = sorted((f for f in stage.iterdir() if f.is_file()), key=lambda f: (f.suffix == ".json", f.name))
        for f in files:
            replace_into(f, out / f.name)
    except OSError as e:
        raise_storage_error(out / Path(e.filename).name if e.filename else out, e)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def open_log(path: str | Path) -> Any:
    """A JSON-lines log opened for appending. A last line cut short by a hard kill is dropped first, so that a
    resumed run's lines do not run on from it and every line of the log still parses."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")  # the caller closes it


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_manifest(
    out_dir: str | Path,
    stage: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    seconds: float,
    seed: int | None = None,
) -> Path:
    """run.json: what ran, with which code and libraries, how long it took and what it measured."""
    path = Path(out_dir) / "run.json"
    write_json(
        path,
        {
            "stage": stage,
            "config": config,
            "seed": seed,
            "package_version": __version__,
            "git_commit": git_commit(),
            "versions": library_versions(),
            "machine": machine_info(),
            "argv": sys.argv,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 3),
            "metrics": metrics,
        },
    )
    return path


def manifest_stage(out_dir: str | Path) -> str | None:
    """The stage that wrote a directory's run.json (`student`, `train`, `distil`, ...), or None where there is none
    or it cannot be read: a hub id, a model from elsewhere."""
    try:
        stage = json.loads((Path(out_dir).expanduser() / "run.json").read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        return None
    return stage if isinstance(stage, str) else None


def write_engine_spec(out: str | Path, engine: str, **details: Any) -> None:
    """Mark an artifact directory with the engine that loads it (and how it was made)."""
    write_json(Path(out) / ENGINE_FILE, {"engine": engine, **details})
