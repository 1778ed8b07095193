"""The `export` verb: a Hugging Face model in, an artifact for a fast local inference engine out.

CTranslate2 is the engine: it runs GPT-2, Llama (SmolLM2), Mistral and Qwen2 models with a KV cache in C++ (fp32
or int8 weights on CPU, streaming one token at a time), so a student completes code on a laptop without PyTorch in
the loop. gpt_neox (Pythia) is refused with one line: CTranslate2 4.8's converter reads `config.rotary_pct` and
`model.embed_out`, which transformers 5 moved (to `rope_parameters` and `lm_head`). The artifact holds the
converted weights (`model.bin`, `vocabulary.json`), the model's tokenizer, `engine.json` (what `load_engine`
reads) and `run.json`; engines/ctranslate2_engine.py runs it. ONNX Runtime is registered as an engine name but not
built yet.

`--format gguf` writes one GGUF file instead (model/gguf_export.py) with an Ollama Modelfile beside it, for
llama.cpp, Ollama and LM Studio.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from distil_codegpt.config import ExportConfig, UserError, to_dict
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.model import families
from distil_codegpt.model.families import count_params, model_size_mb
from distil_codegpt.model.gguf_export import commands, write_gguf
from distil_codegpt.model.presets import load_model, looks_local
from distil_codegpt.runinfo import write_engine_spec, write_manifest

# our --quantize -> CTranslate2's weight type; "none" is pinned to float32 so an fp16 checkpoint exports at full
# precision and the artifact computes exactly what PyTorch fp32 does
CT2_QUANTIZATION = {"none": "float32", "int8": "int8"}
INSTALL = "pip install 'distil-codegpt[ctranslate2]'"
# the families CTranslate2 4.8's converter turns out exactly under transformers 5 (gpt_neox: module docstring)
CT2_FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


def ctranslate2_module(field: str) -> ModuleType:
    """Imported on use: the engine is an optional dependency, and its absence must read as one line with the fix."""
    try:
        import ctranslate2
    except ImportError as e:
        raise UserError(f"{field}: the CTranslate2 engine is not installed; {INSTALL}") from e
    return ctranslate2


def _weights_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".bin", ".safetensors")) / 1e6


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Convert `cfg.model` into a CTranslate2 artifact at `cfg.out`; the summary is also run.json's metrics.

    The artifact is built next to `out` and moved into place at the end, so an interrupted export never leaves
    a directory that looks finished.
    """
    t0 = time.perf_counter()
    if cfg.format == "onnx":
        raise UserError("format: the onnx export is not built yet; use --format ctranslate2 or gguf")
    if cfg.format == "gguf":
        return _export_gguf(cfg, t0)
    out = Path(cfg.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out: {out} already exists and is not empty; pass a new --out or remove it")
    model = load_model(cfg.model, role="model", dtype=torch.float32)  # clear errors for a bad dir, and the shape
    fam = families.family(model).name
    if fam not in CT2_FAMILIES:
        raise UserError(
            f"model: {cfg.model} is a {fam} model, which CTranslate2 cannot convert under transformers 5; export a"
            f" model of {', '.join(CT2_FAMILIES)}, or run this one as it is or as `compress --quantize int8`"
        )
    tok = load_tokenizer(cfg.model) if looks_local(cfg.model) else None
    ct2 = ctranslate2_module("format")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export
    try:
        converter = ct2.converters.TransformersConverter(cfg.model)
        try:
            converter.convert(str(tmp), quantization=CT2_QUANTIZATION[cfg.quantize])
        except (ValueError, NotImplementedError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"model: CTranslate2 cannot convert {cfg.model} ({first}); export a model of {', '.join(CT2_FAMILIES)}"
            ) from e
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(cfg.model)
        _check_vocabulary(tmp, tok)
        tok.save_pretrained(tmp)
        summary: dict[str, Any] = {
            "format": "ctranslate2",
            "quantize": cfg.quantize,
            "source": str(Path(cfg.model).resolve()) if looks_local(cfg.model) else cfg.model,
            "context": families.context(model),
            "vocab_size": len(tok),
            "params": count_params(model),
            "source_mb": model_size_mb(model),
            "disk_mb": _weights_mb(tmp),
        }
        write_engine_spec(
            tmp,
            "ctranslate2",
            quantization=cfg.quantize,
            weights=CT2_QUANTIZATION[cfg.quantize],
            context=summary["context"],
            source=summary["source"],
        )
        summary["seconds"] = time.perf_counter() - t0
        write_manifest(tmp, "export", to_dict(cfg), summary, summary["seconds"])
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _export_gguf(cfg: ExportConfig, t0: float) -> dict[str, Any]:
    """One .gguf file (written whole or not at all) and its Modelfile; the summary is what `print_export` shows."""
    out = Path(cfg.out).expanduser()
    if out.exists():
        raise UserError(f"out: {out} already exists; pass a new --out FILE.gguf or remove it")
    model = load_model(cfg.model, role="model", dtype=torch.float32)
    fam = families.family(model).name
    if not looks_local(cfg.model):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(cfg.model)
    else:
        tok = load_tokenizer(cfg.model)
    summary: dict[str, Any] = {
        "format": "gguf",
        "quant": cfg.quant,
        "family": fam,
        "source": str(Path(cfg.model).resolve()) if looks_local(cfg.model) else cfg.model,
        "params": count_params(model),
        "source_mb": model_size_mb(model),
        **write_gguf(model, tok, out, cfg.quant, cfg.model.rstrip("/")),
    }
    summary["disk_mb"] = summary["bytes"] / 1e6
    summary["commands"] = commands(out)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _check_vocabulary(path: Path, tok: Any) -> None:
    """The engine is fed token strings, so CTranslate2's vocabulary must list exactly the tokenizer's, id by id.

    A gap or a duplicate would shift ids silently: every completion would be garbage with no error.
    """
    vocab = json.loads((path / "vocabulary.json").read_text(encoding="utf-8"))
    if vocab != tok.convert_ids_to_tokens(list(range(len(tok)))):
        raise UserError(
            f"model: the converted vocabulary ({len(vocab)} tokens) does not match the tokenizer's ({len(tok)}) id by "
            "id; save the model with the tokenizer it was trained with"
        )


def print_export(summary: dict[str, Any], out: str | Path) -> None:
    """Two lines a person reads after `distil-codegpt export` (the full summary is in run.json); a GGUF export
    also prints how to run the file in llama.cpp, Ollama and LM Studio."""
    if summary["format"] == "gguf":
        types = ", ".join(f"{k} x{v}" for k, v in sorted(summary["tensor_types"].items()))
        fim = f"FIM {summary['fim']}" if summary["fim"] else "no FIM tokens"
        print(
            f"export: gguf {summary['quant']} ({summary['architecture']}, {types}), {summary['params']:,} params, "
            f"{summary['disk_mb']:.2f} MB (source {summary['source_mb']:.2f} MB fp32), context {summary['context']}, "
            f"pre-tokenizer {summary['pre_tokenizer']}, {fim}, {summary['seconds']:.1f} s\n  written to {out}\n"
            f"  Ollama Modelfile: {summary['modelfile']}\n  run it with:\n"
            + "\n".join(f"    {c}" for c in summary["commands"])
        )
        return
    print(
        f"export: {summary['format']} ({'int8' if summary['quantize'] == 'int8' else 'fp32'} weights), "
        f"{summary['params']:,} params, {summary['disk_mb']:.2f} MB on disk (source {summary['source_mb']:.2f} MB "
        f"fp32), context {summary['context']}, {summary['seconds']:.1f} s\n  written to {out}"
    )
