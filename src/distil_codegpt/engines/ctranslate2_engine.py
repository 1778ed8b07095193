"""CTranslate2 as an engine: an artifact of `export` (compress/export.py) decoded in C++ with a KV cache, fp32 or int8
weights on CPU, behind the same `Engine` interface as PyTorch."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distil_codegpt.artifacts import first_line, read_json
from distil_codegpt.compress.export import ctranslate2_module
from distil_codegpt.config import UserError
from distil_codegpt.data.tokenizer import load_tokenizer
from distil_codegpt.engines.base import Engine
from distil_codegpt.runinfo import ENGINE_FILE


def _cpu_threads() -> int:
    """Cores this process may use (the affinity mask, which containers and `taskset` narrow), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _release(box: list[Any], streams: weakref.WeakSet) -> None:
    for steps in list(streams):
        steps.close()  # stops its decoding thread and waits for it
    box.clear()


class CTranslate2Engine(Engine):
    """An exported artifact run by CTranslate2: C++ decoding with a KV cache, fp32 or int8 weights.

    CTranslate2 takes token strings, not ids; `vocabulary.json` (checked at export to equal the tokenizer's list)
    maps them both ways, so special and added tokens such as `<s>` and ` <EOL>` pass through unchanged.
    """

    name = "ctranslate2"

    def __init__(self, generator: Any, vocab: list[str], tokenizer: Any, path: Path, context: int) -> None:
        # A CTranslate2 Generator, or one of its token streams, still alive during Python's final teardown aborts
        # the process ("terminate called without an active exception"). So the generator lives in a one-item box
        # and its open streams in a weak set, which a finalizer closes and empties when the engine dies or, at the
        # latest, at exit (before the teardown).
        self._box, self._streams = [generator], weakref.WeakSet()
        weakref.finalize(self, _release, self._box, self._streams)
        self.vocab, self.tokenizer, self.path, self.context = vocab, tokenizer, Path(path), context

    @property
    def generator(self) -> Any:
        return self._box[0]

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> CTranslate2Engine:
        """Weights keep the type they were exported with (int8 stays int8); on CPU, every allowed core."""
        ct2, p = ctranslate2_module("model"), Path(path)
        spec = read_json(p / ENGINE_FILE, fix="export the model again with `distil-codegpt export`")
        again = f"export it again with `distil-codegpt export --model {spec.get('source', 'MODEL')} --out NEW_DIR`"
        if not isinstance(spec.get("context"), int):
            raise UserError(f"model: {p / ENGINE_FILE} has no integer context; {again}")
        vocab = read_json(p / "vocabulary.json", fix=again, kind=list)
        tok = load_tokenizer(p)
        if len(vocab) != len(tok):
            raise UserError(
                f"model: {p / 'vocabulary.json'} lists {len(vocab):,} tokens, the tokenizer in {p} {len(tok):,};"
                f" {again}"
            )
        try:
            generator = ct2.Generator(str(p), device=device, intra_threads=_cpu_threads() if device == "cpu" else 0)
        except (RuntimeError, ValueError) as e:
            raise UserError(
                f"model: CTranslate2 cannot load {p / 'model.bin'} on {device} ({first_line(e)}); {again}"
            ) from e
        return cls(generator, vocab, tok, p, spec["context"])

    def stream(
        self,
        ids: list[int],
        max_new_tokens: int,
        stop_ids: set[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[int]:
        """As `Engine.stream`, with two limits of CTranslate2.

        - A seed seeds CTranslate2's random generators, but each worker thread seeds its own at its first sampled
          token and never again: the same seed gives the same samples for the same sequence of requests in a
          fresh process, not for every request.
        - Without stop ids, generation still ends at the model's end-of-sequence token (yielded, then stop).
        """
        if max_new_tokens <= 0:
            return
        sample = temperature > 0
        if sample and seed is not None:
            ctranslate2_module("model").set_random_seed(seed)
        steps = self.generator.generate_tokens(
            [self.vocab[i] for i in ids],
            max_length=max_new_tokens,  # counts new tokens only (the prompt is not part of the result)
            sampling_topk=0 if sample else 1,  # 0: the whole vocabulary, cut by top_p; 1: greedy
            sampling_topp=top_p if sample else 1.0,
            sampling_temperature=temperature if sample else 1.0,
            end_token=sorted(stop_ids) or None,
        )
        self._streams.add(steps)
        for step in steps:
            if step.token_id in stop_ids:  # CTranslate2 returns the end token it stopped at; we never do
                return
            yield step.token_id
