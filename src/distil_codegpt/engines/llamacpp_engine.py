"""llama.cpp as an engine (through llama-cpp-python, the optional `.[llamacpp]` extra): a GGUF file decoded behind
the same `Engine` interface as PyTorch, so `complete`, `serve` and `evaluate` run it with the same completion core.

Token ids are the project tokenizer's, not llama.cpp's: prompts are built and new ids decoded by the Hugging Face
tokenizer the model was trained with, as for every other engine, so FIM templates, token healing and stops behave
the same; llama.cpp only reads ids and gives logits, and the next id is picked from those logits by
`base.pick_next` (greedy, the line-end rule, or seeded nucleus sampling, exactly as TorchEngine picks).

Where the files come from:
- a `.gguf` file runs as it is; its tokenizer is the one `import` writes out of it (once, cached by its SHA-256);
- a Hugging Face model directory is exported to an f32 GGUF on first use (`model/gguf_export.py`, llama/mistral/
  qwen2 families) into $DISTIL_CODEGPT_CACHE/gguf-export/<hash of the directory's files>/, reused afterwards, and
  its own tokenizer is used.

The prefix cache is llama.cpp's own KV cache, one sequence: a new prompt reads only the ids after its common prefix
with what the context already holds (the previous prompt and what was generated after it), as llama-server's slot
does; the last prompt id is always read again for its logits. `cache_slots` 0 reads every prompt in full.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from distil_codegpt.artifacts import check_vocab
from distil_codegpt.config import UserError
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.engines.base import PREFILL_CHUNK, Engine, Interrupted, common_prefix, pick_next, restrict
from distil_codegpt.model.gguf import cache_root, cached_import
from distil_codegpt.model.gguf_export import write_gguf
from distil_codegpt.model.presets import load_model

EXPORT_QUANT = "f32"  # HF directories exported on first use: llama.cpp then computes what PyTorch computes
EXPORT_DIR = "gguf-export"


def llama_cpp_module() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(
            "engine: llamacpp needs llama-cpp-python, which is not installed; pip install -e '.[llamacpp]' "
            "(it compiles llama.cpp once: 10-20 minutes on 2 cores) or pass --engine torch"
        ) from e
    return llama_cpp


def dir_hash(path: Path) -> str:
    """SHA-256 over the names and contents of a model directory's files (not its subdirectories): a model saved
    again with other weights, config or tokenizer gets a new export."""
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def exported_gguf(model_dir: str | Path) -> Path:
    """The f32 GGUF of an HF model directory, exported on first use into the cache and reused afterwards."""
    src = Path(model_dir).expanduser()
    out = cache_root() / EXPORT_DIR / dir_hash(src)[:16] / f"model-{EXPORT_QUANT}.gguf"
    if out.is_file():
        return out
    print(f"engine: exporting {src} once to {out} (llama.cpp reads GGUF)", file=sys.stderr)
    model = load_model(str(src), dtype=torch.float32)
    write_gguf(model, load_tokenizer(src), out, EXPORT_QUANT, src.resolve().name)  # atomic: whole or nothing
    return out


def _kv_type(gguf_path: Path, llama_cpp: Any) -> int | None:
    """An f32 KV cache for an f32 file (llama.cpp's default f16 cache alone moves logits by ~1e-2, enough to flip a
    near tie against PyTorch), llama.cpp's default for the others."""
    field = gguf.GGUFReader(gguf_path).fields.get("general.file_type")
    f32 = field is not None and int(field.contents()) == gguf.LlamaFileType.ALL_F32
    return llama_cpp.GGML_TYPE_F32 if f32 else None


class LlamaCppEngine(Engine):
    """A GGUF model run by llama.cpp on the CPU (all layers offloaded with --device cuda and a CUDA build)."""

    name = "llamacpp"
    supports_first_allowed = True
    supports_line_end = True

    def __init__(self, llm: Any, tokenizer: Any, path: Path, gguf_path: Path, cache_slots: int = 0) -> None:
        self.llm, self.tokenizer, self.path, self.gguf_path = llm, tokenizer, Path(path), Path(gguf_path)
        self.context = llm.n_ctx()
        self.cache_slots = cache_slots
        self.held: list[int] = []  # the ids whose keys and values llama.cpp's context holds, in order
        self.cached_tokens = 0  # prompt ids the last `stream` took from the cache
        self.prefill_chunk = PREFILL_CHUNK
        self.interrupt: Callable[[], bool] | None = None  # asked between prompt chunks: stop reading now?

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> LlamaCppEngine:
        """A `.gguf` file, or an HF model directory exported on first use (see the module docstring)."""

        llama_cpp = llama_cpp_module()
        p = Path(path).expanduser()
        if p.suffix.lower() == ".gguf":
            gguf_path, tok_dir = p, cached_import(p)
        elif p.is_dir() and (p / "config.json").is_file():
            gguf_path, tok_dir = exported_gguf(p), p
        else:
            raise UserError(f"model: {path} is neither a .gguf file nor an HF model directory; pass one of them")
        kv = _kv_type(gguf_path, llama_cpp)
        llm = llama_cpp.Llama(
            str(gguf_path),
            n_ctx=0,  # the model's own context
            n_batch=PREFILL_CHUNK,
            n_threads=torch.get_num_threads(),
            n_gpu_layers=-1 if torch.device(device).type == "cuda" else 0,
            logits_all=False,
            verbose=False,
            **({"type_k": kv, "type_v": kv} if kv is not None else {}),
        )
        tok = load_tokenizer(tok_dir)
        check_vocab(llm.n_vocab(), tok, gguf_path)
        return cls(llm, tok, tok_dir, gguf_path)

    def disk_mb(self) -> float:
        return self.gguf_path.stat().st_size / 1e6

    @property
    def n_params(self) -> int:
        return int(self.llm._model.n_params())

    def _read(self, x: list[int]) -> torch.Tensor:
        """Logits (V,) after reading `x` on top of what the context holds; `held` follows every chunk read, so a
        read stopped by `interrupt` (Interrupted) leaves the ids and the KV cache in step."""
        for start in range(0, len(x), self.prefill_chunk):
            chunk = x[start : start + self.prefill_chunk]
            self.llm.eval(chunk)  # drops every position from llm.n_tokens on first, then reads the chunk
            self.held += chunk
            if start + len(chunk) < len(x) and self.interrupt is not None and self.interrupt():
                raise Interrupted
        row = self.llm._ctx.get_logits_ith(-1)  # the last id read (logits_all=False keeps only that row)
        return torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.llm.n_vocab(),)).copy())

    def _reuse(self, ids: list[int]) -> int:
        """Keep the longest common prefix of `ids` with the context (all but the last id), forget the rest."""
        reuse = min(common_prefix(self.held, ids), len(ids) - 1) if self.cache_slots else 0
        self.held = self.held[:reuse]
        self.llm.n_tokens = reuse  # the next eval removes positions reuse.. from the KV cache
        return reuse

    def stream(
        self,
        ids: list[int],
        max_new_tokens: int,
        stop_ids: set[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        first_allowed: frozenset[int] | None = None,
        line_end: frozenset[int] | None = None,
        line_end_rule: str = "mass",
    ) -> Iterator[int]:
        """As `TorchEngine.stream`: the same picking from llama.cpp's logits."""
        if not ids:
            return
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        reuse = self._reuse(ids)
        self.cached_tokens = reuse
        x = ids[reuse:]
        try:
            if max_new_tokens <= 0:  # a warm-up: read the prompt into the cache, write nothing
                if self.cache_slots:
                    self._read(x)
                return
            logits = self._read(x)
        except Interrupted:
            return
        end = None
        for step in range(max_new_tokens):
            if step:
                logits = self._read(x)
            if step == 0 and first_allowed:
                logits = restrict(logits, first_allowed)
            if step == 0 and line_end:
                end = torch.zeros(logits.shape[-1], dtype=torch.bool)
                end[[i for i in line_end if i < len(end)]] = True
            nxt = pick_next(logits, temperature, top_p, gen, end, line_end_rule)
            if nxt in stop_ids:
                return
            yield nxt
            x = [nxt]
