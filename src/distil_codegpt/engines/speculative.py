"""Speculative completion: a distilled student drafts, its teacher verifies, and the output is the teacher's own.

Greedy decoding only: the draft proposes up to k tokens greedily, the teacher reads them all in one forward pass
(with its KV cache), and the longest run it agrees with is kept, plus the teacher's own next token, so every pass
of the teacher yields at least one token and the text is token for token what the teacher alone writes. Both
models keep their prefix KV caches (serve's `--cache-slots`), so an editor's next keystroke reads only what
changed, in both. k adapts: it grows by 2 after a draft fully accepted and falls to what was accepted plus one
after a miss (`--draft-tokens K` fixes it). A request that samples (temperature > 0) runs on the teacher alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from distil_codegpt.config import UserError
from distil_codegpt.engines.base import Engine, Interrupted, TorchEngine, pick_next, restrict
from distil_codegpt.engines.load import load_engine

MAX_DRAFT = 16


@dataclass
class DraftStats:
    """Counts over every completion so far: what acceptance and speed-up are computed from."""

    teacher_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.teacher_passes if self.teacher_passes else 0.0


class SpeculativeEngine(Engine):
    """The teacher's engine, drafted for by a student with the same vocabulary."""

    supports_first_allowed = True

    def __init__(self, teacher: Engine, draft: Engine, draft_tokens: int = 0) -> None:
        if not isinstance(teacher, TorchEngine) or not isinstance(draft, TorchEngine):
            kinds = f"{teacher.name} and {draft.name}"
            raise UserError(f"draft: speculative completion needs two PyTorch models (got {kinds}); pass model dirs")
        if teacher.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise UserError(f"draft: {draft.path} has another vocabulary than {teacher.path}; use a student of it")
        self.teacher, self.draft, self.fixed_k = teacher, draft, draft_tokens
        self.name, self.path, self.tokenizer = f"{teacher.name}+draft", teacher.path, teacher.tokenizer
        self.context = min(teacher.context, draft.context)
        self.stats = DraftStats()

    @property
    def cached_tokens(self) -> int:
        return self.teacher.cached_tokens

    @property
    def interrupt(self) -> Callable[[], bool] | None:
        return self.teacher.interrupt

    @interrupt.setter
    def interrupt(self, check: Callable[[], bool] | None) -> None:
        self.teacher.interrupt = self.draft.interrupt = check

    def disk_mb(self) -> float:
        return self.teacher.disk_mb() + self.draft.disk_mb()

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
    ) -> Iterator[int]:
        if temperature > 0 or max_new_tokens <= 0:
            yield from self.teacher.stream(ids, max_new_tokens, stop_ids, temperature, top_p, seed, first_allowed)
            if max_new_tokens <= 0:  # a warm-up reads the prompt into both caches
                list(self.draft.stream(ids, 0, stop_ids))
            return
        t, d = self.teacher, self.draft
        t_slot, t_reuse = t._slot(ids)
        t.cached_tokens = t_reuse
        d_slot, d_reuse = d._slot(ids)
        t_past, d_past = (t_slot.cache if t_slot else None), (d_slot.cache if d_slot else None)
        seq = list(ids)  # prompt + every token yielded; the caches hold seq[:t_len] and seq[:d_len]
        try:
            logits, t_past = t._forward(t_slot, t_past, seq[t_reuse:])
        except Interrupted:
            return
        self.stats.teacher_passes += 1
        nxt = int(torch.argmax(restrict(logits[0], first_allowed) if first_allowed else logits[0]))
        t_len, d_len, k, made = len(seq), d_reuse, self.fixed_k or 4, 0
        pending = [nxt]  # tokens the teacher has settled on: the accepted draft, then its own next one
        while True:
            for token in pending:
                if token in stop_ids or made >= max_new_tokens:
                    return
                yield token
                seq.append(token)
                made += 1
                self.stats.tokens += 1
            if made >= max_new_tokens:
                return
            room = min(k, max_new_tokens - made, self.context - len(seq) - 1)
            if room <= 0:  # no room to draft: the teacher goes on alone, one token per pass
                logits, t_past = t._forward(t_slot, t_past, seq[t_len:])
                t_len = len(seq)
                self.stats.teacher_passes += 1
                pending = [pick_next(logits[0], 0.0, 1.0, None)]
                continue
            proposal: list[int] = []
            for _ in range(room):  # the draft writes greedily from what it has not read yet
                d_logits, d_past = d._forward(d_slot, d_past, proposal[-1:] if proposal else seq[d_len:])
                d_len = len(seq) + len(proposal)
                guess = int(torch.argmax(d_logits[0]))
                proposal.append(guess)
                if guess in stop_ids:
                    break
            fed = seq[t_len:] + proposal  # the teacher's one pass: what it has not read, then the whole draft
            rows = len(proposal) + 1
            logits, t_past = t._forward(t_slot, t_past, fed, rows=rows)
            self.stats.teacher_passes += 1
            own = logits.argmax(-1).tolist()  # own[i]: the teacher's token after seq + proposal[:i]
            n = 0
            while n < len(proposal) and proposal[n] == own[n]:
                n += 1
            self.stats.drafted += len(proposal)
            self.stats.accepted += n
            t_len = len(seq) + n  # the teacher's cache keeps seq + the accepted draft
            t._crop(t_slot, t_past, t_len)
            d_len = min(d_len, t_len)
            d._crop(d_slot, d_past, d_len)
            pending = proposal[:n] + [own[n]]
            if not self.fixed_k:
                k = min(k + 2, MAX_DRAFT) if n == len(proposal) else max(1, n + 1)


def with_draft(
    engine: Engine, draft: str, device: str = "cpu", draft_tokens: int = 0, cache_slots: int = 0, quantize: str = "none"
) -> Engine:
    """`engine` drafted for by the student at `draft` (a path, loaded with `quantize` as `load_engine` does), or
    `engine` itself when `draft` is empty."""
    if not draft:
        return engine
    if not isinstance(engine, TorchEngine):  # before the draft loads: the answer does not depend on it
        raise UserError(
            f"draft: the {engine.name} engine runs no draft model (the teacher verifies drafts with PyTorch's KV"
            " cache); drop --draft, or pass the model directory with --engine torch"
        )
    return SpeculativeEngine(engine, load_engine(draft, device, cache_slots, quantize), draft_tokens)
