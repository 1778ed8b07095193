"""Typed settings for every stage: one dataclass per CLI verb, one source of truth for defaults, YAML and flags.

base.py        ConfigError, UserError, `opt` (a documented field), build_config (defaults < YAML < flags, coerced and
               validated), field_types, to_dict, the `_check`/`_require` one-line errors, shared help texts
data.py        corpus, tokenizer, shards, prepare
model.py       student (layer pick, width cuts), import and fetch-teacher (GGUF teachers)
training.py    the loop train and distil share, train, distil (with its KD recipes), cache-teacher
evaluation.py  evaluate
serving.py     compress, export, complete, serve
study.py       sweep (its variants as data, the search) and report

The settings are the bottom layer: these modules import only each other, `distil_codegpt.fim_templates` and
outside packages.
"""

from distil_codegpt.config.base import ConfigError, UserError, build_config, field_types, to_dict
from distil_codegpt.config.data import CorpusConfig, PrepareConfig, ShardsConfig, TokenizerConfig
from distil_codegpt.config.evaluation import EvaluateConfig
from distil_codegpt.config.model import FetchTeacherConfig, ImportConfig, StudentConfig
from distil_codegpt.config.serving import CompleteConfig, CompressConfig, ExportConfig, ServeConfig
from distil_codegpt.config.study import VARIANTS, ReportConfig, SweepConfig, Variant
from distil_codegpt.config.training import CacheTeacherConfig, DistilConfig, LoopConfig, TrainConfig

__all__ = [
    "VARIANTS",
    "CacheTeacherConfig",
    "CompleteConfig",
    "CompressConfig",
    "ConfigError",
    "CorpusConfig",
    "DistilConfig",
    "EvaluateConfig",
    "ExportConfig",
    "FetchTeacherConfig",
    "ImportConfig",
    "LoopConfig",
    "PrepareConfig",
    "ReportConfig",
    "ServeConfig",
    "ShardsConfig",
    "StudentConfig",
    "SweepConfig",
    "TokenizerConfig",
    "TrainConfig",
    "UserError",
    "Variant",
    "build_config",
    "field_types",
    "to_dict",
]
