"""Settings of the local-use stages: `compress`, `export` (CTranslate2, GGUF), `complete` and `serve`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from distil_codegpt.config.base import ENGINE_HELP, _check, _require, opt
from distil_codegpt.fim_templates import TEMPLATES


@dataclass
class CompressConfig:
    """Make a model smaller for local use: lower-precision weights, int8 quantization, pruning."""

    model: str = opt("", "model directory (gpt2, llama, mistral, qwen2, gpt_neox)", required=True)
    out: str = opt("", "output artifact directory (loadable by evaluate, complete, serve)", required=True)
    dtype: Literal["fp32", "fp16", "bf16"] = opt("fp32", "weight dtype of the saved model")
    quantize: Literal["none", "int8"] = opt(
        "none", "int8: dynamic quantization of every linear layer, LM head included"
    )
    prune: str = opt(
        "", "magnitude:FRACTION (global unstructured) or heads:N (the N least important heads; KV groups with GQA)"
    )
    heal_steps: int = opt(0, "after pruning: this many KD steps from the unpruned model (needs --data)")
    data: str = opt("", "corpus directory for healing and for head-importance scores")
    trim_vocab: str = opt(
        "",
        "corpus directory or its shards dir (DATA/shards/ID): the output head keeps only the ids its train split"
        " uses, plus the special tokens (logits of the others are -inf); the input embedding stays whole",
    )
    min_count: int = opt(1, "with --trim-vocab: keep an id seen at least this many times in the train split")

    def validate(self) -> None:
        _require(self.model, "model", "pass --model DIR")
        _require(self.out, "out", "pass --out DIR")
        if self.prune:
            kind, _, value = self.prune.partition(":")
            ok = (kind == "magnitude" and _is_float(value) and 0 < float(value) < 1) or (
                kind == "heads" and value.isdigit() and int(value) > 0
            )
            _check(ok, "prune", self.prune, "use magnitude:0.3 (fraction in (0, 1)) or heads:N (N >= 1)")
        _check(self.heal_steps >= 0, "heal_steps", self.heal_steps, "use 0 or more")
        _check(self.min_count >= 1, "min_count", self.min_count, "use 1 or more (occurrences in the train split)")
        _check(not self.heal_steps or bool(self.data), "data", self.data, "healing needs --data DIR (a corpus)")
        _check(
            not (self.quantize == "int8" and self.dtype != "fp32"),
            "dtype",
            self.dtype,
            "int8 quantization starts from fp32 weights; drop --dtype",
        )


@dataclass
class ExportConfig:
    """A CTranslate2 artifact directory, or (--format gguf) one .gguf file for llama.cpp, Ollama and LM Studio with an
    Ollama Modelfile beside it."""

    model: str = opt(
        "", "model directory (ctranslate2: gpt2, llama, mistral, qwen2; gguf: llama, mistral, qwen2)", required=True
    )
    out: str = opt("", "output artifact directory (ctranslate2) or FILE.gguf (gguf)", required=True)
    format: Literal["ctranslate2", "onnx", "gguf"] = opt("ctranslate2", "target engine or file format")
    quantize: Literal["none", "int8"] = opt("none", "ctranslate2: int8 weights in the exported engine")
    quant: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] = opt(
        "f16", "gguf: weight type of the matrices (norms and biases stay f32; q4_0 keeps the output head q8_0)"
    )

    def validate(self) -> None:
        _require(self.model, "model", "pass --model DIR")
        _require(self.out, "out", "pass --out DIR" + (" or --out FILE.gguf" if self.format == "gguf" else ""))
        if self.format == "gguf":
            _check(self.out.endswith(".gguf"), "out", self.out, "name the file FILE.gguf")
            _check(self.quantize == "none", "quantize", self.quantize, "for --format gguf pass --quant q8_0 or q4_0")
        else:
            _check(
                self.quant == "f16",
                "quant",
                self.quant,
                f"--quant is for --format gguf; for {self.format} use --quantize",
            )


QUANTIZE_HELP = (
    "a plain fp32 model directory: int8 = quantize it to PyTorch int8 as it loads (CPU), auto = do so for a student"
    " made here (student/distil/compress) on CPU, the fastest student engine at the same ES; none = run it as it is"
)


@dataclass
class CompleteConfig:
    """Complete the current line of real Python code (FILE[:LINE[:COL]], or code on stdin)."""

    model: str = opt("", "model directory, compressed/exported artifact, or .gguf file", required=True)
    file: str = opt("-", "FILE, FILE:LINE or FILE:LINE:COL (1-based; default: end of file); - = stdin")
    max_new_tokens: int = opt(64, "longest completion in tokens")
    temperature: float = opt(0.0, "0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling mass (with temperature > 0)")
    seed: int = opt(0, "sampling seed")
    device: Literal["cpu", "cuda"] = opt("cpu", "where the PyTorch engines run")
    draft: str = opt(
        "",
        "a student of the model (same vocabulary) that drafts for it: speculative greedy decoding,"
        " the output stays the model's own",
    )
    draft_tokens: int = opt(0, "tokens the draft proposes per teacher pass (0 = adaptive)")
    quantize: Literal["auto", "int8", "none"] = opt(
        "none",
        QUANTIZE_HELP + " (default none here: quantizing at load costs more than it saves on one completion)",
    )
    engine: Literal["auto", "torch", "llamacpp"] = opt("auto", ENGINE_HELP)

    def validate(self) -> None:
        _require(self.model, "model", "pass --model DIR")
        _check(self.draft_tokens >= 0, "draft_tokens", self.draft_tokens, "use 0 (adaptive) or more")
        _check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "use 1 or more")
        _check(self.temperature >= 0, "temperature", self.temperature, "use 0 (greedy) or more")
        _check(0 < self.top_p <= 1, "top_p", self.top_p, "use a value in (0, 1]")


@dataclass
class ServeConfig:
    """Serve completions over HTTP to editor plugins: OpenAI /v1/completions, llama.cpp /infill and /completion,
    Ollama /api/generate; any model name is served."""

    model: str = opt("", "model directory, compressed/exported artifact, or .gguf file", required=True)
    host: str = opt("127.0.0.1", "interface to bind (loopback by default; 0.0.0.0 exposes it to the network)")
    port: int = opt(8000, "TCP port")
    model_name: str = opt(
        "", "model id listed by /v1/models and /api/tags (default: directory name; any name is served)"
    )
    max_prompt_chars: int = opt(200_000, "longest prompt accepted (longer: 413)")
    max_tokens_limit: int = opt(256, "most new tokens per request (a larger max_tokens / n_predict is clamped to it)")
    queue_size: int = opt(32, "requests waiting for the model at most (more: 503)")
    device: Literal["cpu", "cuda"] = opt("cpu", "where the PyTorch engines run")
    cache_slots: int = opt(
        2,
        "prompts whose KV cache is kept (a new prompt reads only what follows the longest "
        "common prefix; each slot holds up to the context's keys and values); 0 = off",
    )
    fim: str = opt(
        "none",
        "fill-in-the-middle template the model was trained with (starcoder, qwen, codellama, "
        "deepseek, codestral, codegeex); none = complete the prefix, the suffix cuts the answer",
    )
    max_lines: int = opt(1, "lines a completion may span (raw-mode models); 1 = the rest of the cursor's line")
    max_predict_ms: int = opt(
        0,
        "after this many ms of generation, end at the next line break (a request's "
        "t_max_predict_ms wins); 0 = no deadline",
    )
    draft: str = opt(
        "",
        "a student of the model (same vocabulary) that drafts for it: speculative greedy decoding,"
        " the output stays the model's own",
    )
    draft_tokens: int = opt(0, "tokens the draft proposes per teacher pass (0 = adaptive)")
    quantize: Literal["auto", "int8", "none"] = opt("auto", QUANTIZE_HELP + "; torch only")
    engine: Literal["auto", "torch", "llamacpp"] = opt(
        "auto", ENGINE_HELP + "; llamacpp keeps the last prompt's KV cache (cache_slots above 1 count as 1)"
    )

    def validate(self) -> None:
        _require(self.model, "model", "pass --model DIR")
        _check(0 < self.port < 65536, "port", self.port, "use a port in 1..65535")
        for name in ("max_prompt_chars", "max_tokens_limit", "queue_size", "max_lines"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "use 1 or more")
        for name in ("cache_slots", "max_predict_ms"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "use 0 (off) or more")

        _check(self.fim in ("none", *TEMPLATES), "fim", self.fim, f"use none or one of {', '.join(TEMPLATES)}")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
