"""The interface every engine has (prompt ids -> cached decode -> new ids), and PyTorch's engines, fp32 and int8.

An engine turns prompt ids into new ids, streamed one at a time so a server can send them as they come. The other
engines (CTranslate2, llama.cpp, a student drafting for its teacher) live beside this module; engines/load.py
picks the one an artifact needs.
"""

from __future__ import annotations

import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distil_codegpt.artifacts import check_vocab
from distil_codegpt.compress.quantize import ENGINE as INT8_ENGINE
from distil_codegpt.compress.quantize import load_int8, quantize_int8
from distil_codegpt.config import UserError
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.model import families
from distil_codegpt.model.presets import load_model
from distil_codegpt.model.shape import apply_pruned_heads

PREFILL_CHUNK = 256  # prompt tokens read per forward pass: how soon a cancelled request stops reading


class Engine(ABC):
    """What `complete`, `serve` and the latency benchmark need from a model."""

    name: str
    path: Path
    tokenizer: Any  # a transformers fast tokenizer
    context: int  # positions the model can attend to (prompt + new tokens)
    # Engines that can restrict the first new token (token healing of a half-typed word) say so and take
    # `first_allowed` in `stream`; the others are called without it.
    supports_first_allowed: bool = False
    # Engines that can end a line by the summed probability of its line-end ids (`line_end_pick`) say so
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


def line_end_pick(logits: Tensor, end: Tensor, rule: str = "mass") -> Tensor:
    """Greedy ids (B,) from logits (B, V) with "the line ends" as one outcome: the most likely id of `end` (B, V) or
    (V,) bool when the summed probability of `end` beats every other id's ("mass") or 1/2 ("majority"), else the
    plain argmax."""
    p = logits.float().softmax(-1)
    p_end = (p * end).sum(-1)
    ends = p_end > (0.5 if rule == "majority" else p.masked_fill(end, 0.0).amax(-1))
    return torch.where(ends, logits.masked_fill(~end, float("-inf")).argmax(-1), logits.argmax(-1))


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
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = families.cache_arg(self.model)
        self._keep_arg = "logits_to_keep" in params
        self.cache_slots, self.slots = cache_slots, []
        self.cached_tokens = 0  # prompt tokens the last `stream` took from the cache
        self.prefill_chunk = PREFILL_CHUNK
        self.interrupt: Callable[[], bool] | None = None  # asked between prompt chunks: stop reading now?

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> TorchEngine:
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
        `line_end_rule` (`line_end_pick`)."""
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


class QuantizedTorchEngine(TorchEngine):
    """The int8 model on CPU; decoding (KV cache through the HF forward) is TorchEngine's."""

    name = INT8_ENGINE

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> QuantizedTorchEngine:
        if torch.device(device).type != "cpu":
            raise UserError(f"device: {device!r}: int8 artifacts run on CPU only; pass --device cpu")
        model, tok = load_int8(path), load_tokenizer(path)
        check_vocab(model.config.vocab_size, tok, path)
        return cls(model, tok, Path(path), "cpu")

    @classmethod
    def from_fp32(cls, path: str | Path) -> QuantizedTorchEngine:
        """An fp32 model directory quantized as it loads: the model `compress --quantize int8` would write, in
        memory (pruned heads cut and a trimmed head rebuilt first, as `TorchEngine.load` does)."""
        fp32 = TorchEngine.load(path, "cpu")
        return cls(quantize_int8(fp32.model), fp32.tokenizer, Path(path), "cpu")
