"""The machinery every stage's settings share: one source of truth for defaults, YAML files and CLI flags.

Each stage has a dataclass (in the modules beside this one). A field's `help` metadata is its documentation and its
`--flag` help text. Values come from (lowest to highest priority): the dataclass default, a YAML file, command-line
flags. A bad value fails before any work with one line naming the field, the value and the fix (`_check`,
`_require`, `_coerce`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the field, the value and the fix."""


class UserError(RuntimeError):
    """Bad input from the user (missing path, empty corpus...): reported as one line, exit code 2."""


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with documentation; lists get a fresh copy per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


PRECISION_HELP = "auto = bf16 autocast on CUDA or a CPU with AVX-512 BF16/AMX, else fp32 (losses stay fp32)"
ENGINE_HELP = (
    "what runs the model: torch (PyTorch; also the compress/export artifacts, by their engine.json), llamacpp"
    " (llama.cpp through llama-cpp-python, pip install '.[llamacpp]': a .gguf file as it is, an HF model dir exported"
    " once to an f32 GGUF in $DISTIL_CODEGPT_CACHE/gguf-export), auto = llamacpp for a .gguf file, torch otherwise"
)


def _require(value: str, name: str, fix: str) -> None:
    if not value:
        raise ConfigError(f"{name}: missing; {fix}")


def _check(ok: bool, name: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} is not allowed; {fix}")


T = TypeVar("T")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Check (and gently convert) one value against a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: {value!r} is not a list")
        return [_coerce(name, inner, v) for v in value]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, args[0], value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: {value!r} is not a boolean; use true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: {value!r} is not a string")
    return value


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_config(cls: type[T], values: dict[str, Any] | None = None, yaml_path: str | os.PathLike | None = None) -> T:
    """Make a validated config: defaults < YAML file < `values` (e.g. CLI flags). Unknown keys are errors."""
    merged: dict[str, Any] = {}
    if yaml_path:
        p = Path(yaml_path)
        if not p.is_file():
            raise ConfigError(f"config: file {str(p)!r} not found; pass an existing YAML file")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {str(p)!r} must hold a mapping of key: value")
        merged.update(loaded)
    merged.update(values or {})
    hints = field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in merged:
        if key.replace("-", "_") not in known:
            raise ConfigError(f"unknown config key {key!r} for {cls.__name__}; known keys: {', '.join(sorted(known))}")
    kwargs = {
        k.replace("-", "_"): _coerce(k.replace("-", "_"), hints[k.replace("-", "_")], v) for k, v in merged.items()
    }
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
