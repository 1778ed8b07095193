"""Which engine runs a model, and loading it: PyTorch fp32, PyTorch int8, exported engines, llama.cpp.

`load_engine(path)` reads `engine.json` in an artifact directory to know which engine built it; a plain
Hugging Face model directory (no engine.json) is the PyTorch fp32 engine, except that `quantize="auto"` (what
`serve` and `complete` default to) runs a student this toolkit made (`student`, `distil` or `compress` in its
run.json) as PyTorch int8 on CPU: at SmolLM2 width the fastest student engine at the same ES (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from distil_codegpt.artifacts import read_json
from distil_codegpt.compress.quantize import load_int8
from distil_codegpt.config import UserError
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.engines.base import Engine, QuantizedTorchEngine, TorchEngine
from distil_codegpt.engines.ctranslate2_engine import CTranslate2Engine
from distil_codegpt.engines.llamacpp_engine import LlamaCppEngine
from distil_codegpt.model.presets import load_model, looks_local, resolve_model
from distil_codegpt.model.shape import apply_pruned_heads
from distil_codegpt.runinfo import ENGINE_FILE

QUANTIZE = ("auto", "int8", "none")  # what load_engine does to a plain fp32 model directory
STUDENT_STAGES = ("student", "distil", "compress")  # run.json stages that made a student
# engine name (engine.json's "engine") -> the class with a `load(path, device)` classmethod; onnx is a name the
# export reserves, with no engine built yet
ENGINES: dict[str, type[Engine] | None] = {
    "torch": TorchEngine,
    "torch-int8": QuantizedTorchEngine,
    "ctranslate2": CTranslate2Engine,
    "onnx": None,
}
RUNTIMES = ("auto", "torch", "llamacpp")  # --engine: auto = llamacpp for a .gguf file, else what engine_kind says


def engine_kind(path: str | Path) -> str:
    """The engine an artifact directory was built for: engine.json's "engine", or "torch" for an HF model dir."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model: {p} is not a directory; pass a model or an artifact from `compress`/`export`")
    spec = p / ENGINE_FILE
    if not spec.is_file():
        if not (p / "config.json").is_file():
            raise UserError(f"model: {p} holds neither a model (config.json) nor an engine artifact (engine.json)")
        return "torch"
    kind = read_json(spec, fix="export or compress the model again").get("engine", "")
    if kind not in ENGINES:
        raise UserError(f"model: {spec} names engine {kind!r}; known: {', '.join(ENGINES)}")
    return kind


def is_student(path: str | Path) -> bool:
    """Whether a model directory is a student this toolkit made: its run.json names a `STUDENT_STAGES` stage."""
    info = Path(path) / "run.json"
    if not info.is_file():
        return False
    stage = read_json(info, fix="rerun the stage that wrote it, or delete the file").get("stage")
    return stage in STUDENT_STAGES


def int8_in_memory(path: str | Path, device: str, quantize: str) -> bool:
    """Whether `load_engine` quantizes the fp32 model at `path` to int8 as it loads it (`QUANTIZE`)."""
    if quantize not in QUANTIZE:
        raise UserError(f"quantize: {quantize!r}; use one of {', '.join(QUANTIZE)}")
    if quantize == "int8" and torch.device(device).type != "cpu":
        raise UserError(f"quantize: int8 runs on CPU only, not on {device!r}; pass --quantize none or --device cpu")
    auto = quantize == "auto" and torch.device(device).type == "cpu" and is_student(path)
    return engine_kind(path) == "torch" and (quantize == "int8" or auto)


def runtime_for(path: str | Path, engine: str = "auto") -> str:
    """What `--engine` runs `path` on: "llamacpp" or "torch" (the latter also covers the artifacts of `compress` and
    `export`, each loaded by the engine its engine.json names). auto: llamacpp for a .gguf file, torch otherwise."""
    if engine not in RUNTIMES:
        raise UserError(f"engine: {engine!r}; use one of {', '.join(RUNTIMES)}")
    gguf_file = str(path).lower().endswith(".gguf")
    if engine == "llamacpp" and not gguf_file and (Path(path) / ENGINE_FILE).is_file():
        kind = engine_kind(path)
        raise UserError(f"engine: llamacpp runs a .gguf file or an HF model directory, not a {kind} artifact ({path})")
    return "llamacpp" if engine == "llamacpp" or (engine == "auto" and gguf_file) else "torch"


def load_engine(
    path: str | Path, device: str = "cpu", cache_slots: int = 0, quantize: str = "none", engine: str = "auto"
) -> Engine:
    """The engine for a model directory, an exported/compressed artifact or (`engine`, `runtime_for`) a GGUF file
    run by llama.cpp; PyTorch and llama.cpp engines keep the KV cache of `cache_slots` prompts (llama.cpp: one, the
    context's), the others read every prompt in full. `quantize` (`QUANTIZE`) applies to a plain fp32 model
    directory on torch only: "int8" quantizes it as it loads, "auto" does so for a student on CPU, "none" never."""
    if runtime_for(path, engine) == "llamacpp":
        if quantize == "int8":
            raise UserError("quantize: int8 is the torch engine's; for llama.cpp export --format gguf --quant q8_0")
        cpp = LlamaCppEngine.load(path, device)
        cpp.cache_slots = cache_slots
        return cpp
    if str(path).lower().endswith(".gguf"):  # torch runs a .gguf file imported once (cached by its hash)
        path = resolve_model(str(path))
    kind = engine_kind(path)
    if int8_in_memory(path, device, quantize):
        engine: Engine = QuantizedTorchEngine.from_fp32(path)
    else:
        engine_cls = ENGINES[kind]
        if engine_cls is None:
            raise UserError(
                f"model: {path} is an {kind} artifact, which no engine runs yet; export it with --format"
                " ctranslate2 or gguf"
            )
        engine = engine_cls.load(path, device)
    if isinstance(engine, TorchEngine):
        engine.cache_slots = cache_slots
    return engine


def load_for_evaluation(path: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) for any model or `compress` artifact, as a module HF `generate` can drive.

    An int8 artifact is rebuilt on CPU; a model with pruned heads (config `distil_pruned_heads`) has them cut out of
    its matrices, so it runs as fast as its size says; anything else (a hub id too) loads as `load_model` does.
    """
    if looks_local(path) and (Path(path) / ENGINE_FILE).is_file():
        kind = engine_kind(path)
        if kind != QuantizedTorchEngine.name:
            raise UserError(f"model: {path} is a {kind!r} engine artifact, which only `complete`/`serve` can run")
        return load_int8(path), load_tokenizer(path)
    model = apply_pruned_heads(load_model(path, role="model", dtype=torch.float32))
    tok = load_tokenizer(path) if looks_local(path) else AutoTokenizer.from_pretrained(path)
    return model, tok
