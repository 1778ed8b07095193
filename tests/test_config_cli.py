"""Configs (defaults < YAML < flags, typed, unknown keys rejected) and the CLI table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distil_codegpt.cli import POSITIONAL_CONFIG, POSITIONAL_FIELDS, VERBS, make_parser
from distil_codegpt.config import ConfigError, CorpusConfig, TokenizerConfig, build_config


def test_precedence_defaults_yaml_flags(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("out: from_yaml\nseed: 7\nsrc: [a, b]\ndev_fraction: 0.1\n")
    cfg = build_config(CorpusConfig, {"seed": "9"}, y)
    assert (cfg.out, cfg.seed, cfg.src, cfg.dev_fraction, cfg.format) == ("from_yaml", 9, ["a", "b"], 0.1, "codexglue")


def test_unknown_key_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key 'vocab' for TokenizerConfig"):
        build_config(TokenizerConfig, {"data": "d", "out": "o", "vocab": 5})


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"out": "o", "seed": "x"}, "seed: 'x' is not an integer"),
        ({"out": "o", "seed": True}, "seed: True is not an integer"),
        ({"out": "o", "dev_fraction": "half"}, "dev_fraction: 'half' is not a number"),
        ({"out": "o", "format": "json"}, "format: 'json' is not one of codexglue, raw"),
        ({"out": "o", "max_file_bytes": 0}, "max_file_bytes: 0 is not allowed; use a positive byte count"),
        ({}, "out: missing; pass --out DIR"),
    ],
)
def test_bad_values_fail_with_one_line(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        build_config(CorpusConfig, values)
    assert "\n" not in str(e.value)


def test_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        build_config(CorpusConfig, {}, y)
    with pytest.raises(ConfigError, match="not found"):
        build_config(CorpusConfig, {}, tmp_path / "missing.yaml")


def test_flags_parse_into_fields() -> None:
    args = make_parser().parse_args(
        ["corpus", "--out", "o", "--src", "a", "b", "--src", "c", "--format", "raw", "--max-input-tokens", "50"]
    )
    assert args.src == ["a", "b", "c"] and args.format == "raw" and args.max_input_tokens == "50"
    cfg = build_config(CorpusConfig, {k: v for k, v in vars(args).items() if k not in ("verb", "config")})
    assert cfg.max_input_tokens == 50


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_help_for_every_verb(verb: str) -> None:
    r = subprocess.run([sys.executable, "-m", "distil_codegpt.cli", verb, "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    cls = VERBS[verb][0]
    for name in cls.__dataclass_fields__:
        shown = name.upper() if POSITIONAL_FIELDS.get(verb) == name else "--" + name.replace("_", "-")
        assert shown in r.stdout
    assert ("CONFIG.yaml" if verb in POSITIONAL_CONFIG else "--config FILE.yaml") in r.stdout


def test_bad_flag_value_exits_2(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "distil_codegpt.cli", "corpus", "--out", str(tmp_path), "--seed", "abc"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "distil-codegpt corpus: error: seed: 'abc' is not an integer"
