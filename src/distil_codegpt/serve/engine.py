"""One interface over every way of running a model locally: PyTorch fp32, PyTorch int8, exported engines.

An engine turns prompt ids into new ids, streamed one at a time so a server can send them as they come.
`load_engine(path)` reads `engine.json` in an artifact directory to know which engine built it; a plain
Hugging Face model directory (no engine.json) is the PyTorch fp32 engine, except that `quantize="auto"` (what
`serve` and `complete` default to) runs a student this toolkit made (`student`, `distil` or `compress` in its
run.json) as PyTorch int8 on CPU: at SmolLM2 width the fastest student engine at the same ES (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import importlib
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distil_codegpt.artifacts import read_json
from distil_codegpt.config import UserError
from distil_codegpt.model import families
from distil_codegpt.model.presets import resolve_model

ENGINE_FILE = "engine.json"
QUANTIZE = ("auto", "int8", "none")  # what load_engine does to a plain fp32 model directory
STUDENT_STAGES = ("student", "distil", "compress")  # run.json stages that made a student
PREFILL_CHUNK = 256  # prompt tokens read per forward pass: how soon a cancelled request stops reading
# engine name -> "module:Class" with a `load(path, device)` classmethod; imported only when used
ENGINES = {
    "torch": "distil_codegpt.serve.engine:TorchEngine",
    "torch-int8": "distil_codegpt.compress.quantize:QuantizedTorchEngine",
    "ctranslate2": "distil_codegpt.compress.export:CTranslate2Engine",
    "onnx": "distil_codegpt.compress.export:OnnxEngine",
}
RUNTIMES = ("auto", "torch", "llamacpp")  # --engine: auto = llamacpp for a .gguf file, else what engine_kind says


class Engine(ABC):
    """What `complete`, `serve` and the latency benchmark need from a model."""

    name: str
    path: Path
    tokenizer: Any  # a transformers fast tokenizer
    context: int  # positions the model can attend to (prompt + new tokens)
    # Engines that can restrict the first new token (token healing of a half-typed word) say so and take
    # `first_allowed` in `stream`; the others are called without it.
    supports_first_allowed: bool = False
    # Engines that can end a line by the summed probability of its line-end ids (`completion.line_end_pick`) say so
    # and take `line_end` in `stream`.
    supports_line_end: bool = False

    @abstractmethod
    def stream(
        self,
        ids: list[int],
        max_new_tokens: int,
        stop_ids: set[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[int]:
        """Yield new ids one by one; stops before a stop id (not yielded) or after max_new_tokens.

        temperature 0 is greedy (deterministic); otherwise sample from softmax(logits / temperature) cut to the
        smallest set of tokens whose probability reaches top_p. The caller keeps len(ids) + max_new_tokens
        within `context`.
        """

    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int], **kw: Any) -> list[int]:
        return list(self.stream(ids, max_new_tokens, stop_ids, **kw))

    def disk_mb(self) -> float:
        """Size of the artifact's weight files on disk (MB = 1e6 bytes)."""
        exts = (".safetensors", ".bin", ".pt", ".onnx", ".data")
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file() and f.suffix in exts) / 1e6


def pick_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    line_end: torch.Tensor | None = None,
    line_end_rule: str = "mass",
) -> int:
    """Next id from one row of logits (V,): argmax at temperature 0 (by the line-end rule when `line_end`, a (V,)
    bool mask of the ids that end the line, is given), else nucleus sampling."""
    if temperature <= 0:
        if line_end is not None:
            from distil_codegpt.evaluate.completion import line_end_pick  # evaluate imports this module

            return int(line_end_pick(logits[None], line_end, line_end_rule)[0])
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Slot:
    """One cached prompt: the ids whose keys and values `cache` holds, in order."""

    ids: list[int] = field(default_factory=list)
    cache: Any = None
    used: float = 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def restrict(logits: torch.Tensor, allowed: frozenset[int]) -> torch.Tensor:
    """Logits (V,) with every id outside `allowed` at -inf; unchanged when no allowed id has a finite logit (a
    trimmed head may lack them all)."""
    mask = torch.full_like(logits, float("-inf"))
    mask[list(allowed)] = 0.0
    masked = logits + mask
    return masked if torch.isfinite(masked).any() else logits


class Interrupted(Exception):
    """The request was cancelled while its prompt was being read."""


class TorchEngine(Engine):
    """A Hugging Face model of a supported family run by PyTorch, with its KV cache, one sequence at a time.

    With `cache_slots`, the KV cache of the last prompts (and what was generated after them) is kept, one slot per
    prompt, and a new prompt reads only the tokens after its longest common prefix with a slot, as llama.cpp's
    server does: an editor sends the whole file again on every pause in typing. The last prompt token is always
    read again (its logits give the first new token, and a token the user was still typing may have changed).
    Memory: at most `cache_slots` x context positions of keys and values.
    """

    name = "torch"
    supports_first_allowed = True
    supports_line_end = True

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, path: Path, device: str = "cpu", cache_slots: int = 0
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer, self.path, self.device = tokenizer, Path(path), torch.device(device)
        self.context = families.context(model)
        # transformers 5 calls the KV cache `cache` (`past_key_values` before, deprecated since)
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = "logits_to_keep" in params
        self.cache_slots, self.slots = cache_slots, []
        self.cached_tokens = 0  # prompt tokens the last `stream` took from the cache
        self.prefill_chunk = PREFILL_CHUNK
        self.interrupt: Callable[[], bool] | None = None  # asked between prompt chunks: stop reading now?

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> TorchEngine:
        from distil_codegpt.artifacts import check_vocab
        from distil_codegpt.data.tokenizer import load_tokenizer
        from distil_codegpt.model.presets import load_model
        from distil_codegpt.model.shape import apply_pruned_heads

        model = apply_pruned_heads(load_model(str(path), dtype=torch.float32))  # pruned heads cut: runs faster
        tok = load_tokenizer(path)
        check_vocab(model.config.vocab_size, tok, path)
        return cls(model, tok, Path(path), device)

    def _slot(self, ids: list[int]) -> tuple[_Slot | None, int]:
        """The slot to run `ids` in and how many of its leading ids it already holds (at most all but one)."""
        if not self.cache_slots:
            return None, 0
        best = max(self.slots, key=lambda s: common_prefix(s.ids, ids), default=None)
        reuse = common_prefix(best.ids, ids) if best is not None else 0
        if not reuse:  # nothing in common: a free slot, else the one used longest ago
            if len(self.slots) < self.cache_slots:
                self.slots.append(_Slot())
                best = self.slots[-1]
            else:
                best = min(self.slots, key=lambda s: s.used)
        assert best is not None
        reuse = min(reuse, len(ids) - 1)
        if reuse:
            self._crop(best, best.cache, reuse)  # a negative crop: every transformers version has it
        else:
            best.ids, best.cache = [], None
        best.used = time.monotonic()
        return best, reuse

    def _forward(self, slot: _Slot | None, past: Any, x: list[int], rows: int = 1) -> tuple[torch.Tensor, Any]:
        """Logits (rows, V) of the last `rows` positions after reading `x` (the head runs on those alone: over a
        prompt it would cost as much as several blocks).

        A long `x` is read in chunks of `prefill_chunk`, and `interrupt()` is asked between them: a request
        cancelled while its prompt is read stops within one chunk (raising Interrupted), and what was read stays
        in the slot for the next request. The slot is emptied while its cache is being extended, so a run stopped
        half-way cannot leave ids and keys out of step."""
        for start in range(0, len(x) - self.prefill_chunk, self.prefill_chunk):
            _, past = self._read(slot, past, x[start : start + self.prefill_chunk], 1)
            if self.interrupt is not None and self.interrupt():
                raise Interrupted
        tail = x[(max(len(x) - 1, 0) // self.prefill_chunk) * self.prefill_chunk :]
        return self._read(slot, past, tail, rows)

    def _read(self, slot: _Slot | None, past: Any, x: list[int], rows: int) -> tuple[torch.Tensor, Any]:
        ids = slot.ids if slot is not None else []
        if slot is not None:
            slot.ids, slot.cache = [], None
        kw = {self._cache_arg: past} | ({"logits_to_keep": rows} if self._keep_arg else {})
        out = self.model(input_ids=torch.tensor([x], device=self.device), use_cache=True, **kw)
        past = out.get(self._cache_arg)
        if slot is not None:
            slot.ids, slot.cache = ids + x, past
        return out.logits[0, -rows:].float().cpu(), past  # (1, T, V) -> (rows, V)

    def _crop(self, slot: _Slot | None, past: Any, keep: int) -> None:
        """Forget all but the first `keep` positions (a draft's rejected tokens)."""
        if past is not None and past.get_seq_length() > keep:
            past.crop(keep - past.get_seq_length())
        if slot is not None:
            slot.ids = slot.ids[:keep]

    @torch.inference_mode()
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
        """As `Engine.stream`; `line_end`: the ids that end the line, taken as one outcome by greedy decoding under
        `line_end_rule` (`completion.line_end_pick`)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        slot, reuse = self._slot(ids) if ids else (None, 0)
        self.cached_tokens = reuse
        past = slot.cache if slot is not None else None
        x = ids[reuse:]
        try:
            if max_new_tokens <= 0:  # a warm-up: read the prompt into the cache, write nothing
                if slot is not None and x:
                    self._forward(slot, past, x)
                return
            logits, past = self._forward(slot, past, x)
        except Interrupted:
            return
        for step in range(max_new_tokens):
            if step:
                logits, past = self._forward(slot, past, x)
            logits = logits[0]
            if step == 0 and first_allowed:
                logits = restrict(logits, first_allowed)
            if step == 0 and line_end:
                end = torch.zeros(logits.shape[-1], dtype=torch.bool)
                end[[i for i in line_end if i < len(end)]] = True
            nxt = pick_next(logits, temperature, top_p, gen, end if line_end else None, line_end_rule)
            if nxt in stop_ids:
                return
            yield nxt
            x = [nxt]


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
        from distil_codegpt.serve.llamacpp_engine import LlamaCppEngine

        cpp = LlamaCppEngine.load(path, device)
        cpp.cache_slots = cache_slots
        return cpp
    if str(path).lower().endswith(".gguf"):  # torch runs a .gguf file imported once (cached by its hash)
        path = resolve_model(str(path))
    kind = engine_kind(path)
    if int8_in_memory(path, device, quantize):
        from distil_codegpt.compress.quantize import QuantizedTorchEngine

        engine: Engine = QuantizedTorchEngine.from_fp32(path)
    else:
        module, cls = ENGINES[kind].split(":")
        try:
            engine_cls = getattr(importlib.import_module(module), cls)
        except ImportError as e:
            raise UserError(f"model: {path} needs {e.name}, which is not installed; pip install {e.name}") from e
        engine = engine_cls.load(path, device)
    if isinstance(engine, TorchEngine):
        engine.cache_slots = cache_slots
    return engine


def write_engine_spec(out: str | Path, engine: str, **details: Any) -> None:
    """Mark an artifact directory with the engine that loads it (and how it was made)."""
    from distil_codegpt.runinfo import write_json

    write_json(Path(out) / ENGINE_FILE, {"engine": engine, **details})
