"""Batched line completion with a KV cache: inputs in, one single-line completion per input out.

Two input modes, told apart per input: a normalised (CodeXGLUE) input starts with the text `<s>`, which the
tokenizer parses as the bos id; a raw input is source text and gets the bos id in front, as its documents did in
training. A completion ends at the end of the line: in normalised mode at `<EOL>` (every id whose text, stripped,
is `<EOL>`: our tokenizer has a bare and a spaced one, CodeGPT's one added token) or `</s>`; in raw mode at the first
token whose text holds a line break, or `</s>`. Predictions never hold a line break: the official evaluator reads
predictions.txt with universal newlines, so one inside a completion would shift every later line.

Greedy decoding runs our own loop, not `generate`: inputs, sorted longest first, fill `batch_size` slots. Newcomers
are prefilled in runs of similar length, left-padded with an attention mask and positions counted from each row's
first real token; then every step feeds each slot one token through a KV cache allocated once and written in place.
A row leaves as soon as it ends its line and the next inputs take the free slots, so no batch waits for its slowest
row. A row attends to its own tokens only: batched output equals batch-1 output, and in fp32 that of
`generate` on each input alone. Beam search goes through `generate`, on left-padded batches of one mode. Inputs
longer than the context minus `max_new_tokens` keep their last tokens: those are the ones the next line depends on.

Greedy decoding picks one token at a time, so "the line ends here" loses to any single other token even when the
model gives it more probability in all: a tokenizer that merges a line break with the next line's indentation
(`\n`, `\n    `, `\n        `, ...) splits that probability over many ids. `line_end` "mass" and "majority" take the
ids that end the completion with no more text as one outcome: the line ends when their summed probability beats
every other id ("mass"), or the rest of the vocabulary together ("majority": above 1/2).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache

from distil_codegpt.config import ConfigError
from distil_codegpt.data.tokenizer import end_ids, raw_framing
from distil_codegpt.engines.base import line_end_pick
from distil_codegpt.model import families

BOS_TEXT = "<s>"
EOL_TEXT = "<EOL>"
LINE_BREAKS = ("\n", "\r")
_LINE_BREAK = re.compile("[\r\n]")


@dataclass(frozen=True)
class StopIds:
    """Ids that end a completion, precomputed once from the vocabulary."""

    eol: frozenset[int]  # normalised mode: `<EOL>` in any spacing
    newline: frozenset[int]  # raw mode: tokens whose text holds a line break
    eos: int | None
    pad: int
    ends: frozenset[int] = frozenset()  # every special id (eos, `<|endoftext|>`, chat markers): ends a completion
    bare: frozenset[int] = frozenset()  # raw mode: newline tokens with nothing but spaces before their line break

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase) -> StopIds:
        """Decode every id on its own and classify its text (0.6 s for a vocabulary of 49,152 on these cores)."""
        texts = tok.batch_decode(
            [[i] for i in range(len(tok))], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        eol = frozenset(i for i, t in enumerate(texts) if t.strip() == EOL_TEXT)
        newline = frozenset(i for i, t in enumerate(texts) if any(b in t for b in LINE_BREAKS))
        bare = frozenset(i for i in newline if not _LINE_BREAK.split(texts[i], maxsplit=1)[0].strip())
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        if pad is None:
            raise ConfigError("tokenizer: has neither a pad nor an eos token; save it with one (e.g. <pad>)")
        return cls(eol, newline, eos, pad, frozenset(end_ids(tok)), bare)

    @property
    def fill(self) -> int:
        """What `generate` feeds a finished row: eos, a stop id, so it never reads as text (and transformers does
        not take it for unmasked padding and warn, as it does with the pad id)."""
        return self.eos if self.eos is not None else self.pad

    def for_mode(self, raw: bool) -> list[int]:
        ids = set(self.newline if raw else self.eol) | self.ends
        if self.eos is not None:
            ids.add(self.eos)
        return sorted(ids)

    def line_end(self, raw: bool) -> list[int]:
        """The ids that end a completion with no more text: what the line-end rules sum (eos, special ids, and in
        raw mode the bare newline tokens, in normalised mode `<EOL>`)."""
        ids = set(self.bare if raw else self.eol) | self.ends
        if self.eos is not None:
            ids.add(self.eos)
        return sorted(ids)


LINE_END_RULES = ("token", "mass", "majority")


def check_line_end(rule: str, beam: int = 1) -> None:
    if rule not in LINE_END_RULES:
        raise ConfigError(f"line_end: {rule!r} is not one of {', '.join(LINE_END_RULES)}")
    if rule != "token" and beam != 1:
        raise ConfigError(f"line_end: {rule!r} is a rule of greedy decoding, and beam is {beam}; use beam 1")


def is_raw(text: str) -> bool:
    """Raw inputs are source text; normalised ones start with `<s>` (ours and CodeXGLUE's test.json alike)."""
    return not text.startswith(BOS_TEXT)


def encode_inputs(tok: PreTrainedTokenizerBase, inputs: list[str], max_len: int) -> list[list[int]]:
    """Ids of each input (bos in front of raw ones), keeping only the last `max_len` ids of a longer one."""
    encoded = tok(inputs, add_special_tokens=False)["input_ids"]
    before = raw_framing(tok)[0]
    out = []
    for text, ids in zip(inputs, encoded):
        if is_raw(text):
            ids = [*before, *ids]
        out.append(ids[-max_len:])
    return out


def finish(tok: PreTrainedTokenizerBase, new_ids: list[int], raw: bool, stops: StopIds) -> str:
    """The text of one row's new ids, up to its first stop; never with a line break."""
    stop_set = stops.newline if raw else stops.eol
    keep = new_ids
    for k, i in enumerate(new_ids):
        if i == stops.eos or i in stops.ends or i in stop_set:
            # a raw newline token may carry code before its line break (`):\n`): keep it, cut the text below
            keep = new_ids[: k + 1] if raw and i in stop_set else new_ids[:k]
            break
    text = tok.decode(keep, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for brk in LINE_BREAKS:
        text = text.split(brk, 1)[0]
    if raw:
        return text.rstrip()
    return text.split(EOL_TEXT, 1)[0].strip()  # also when the model spelt `<EOL>` out in pieces


def _context(model: PreTrainedModel) -> int:
    n = families.context(model)
    if not n:
        raise ConfigError(f"model: its config states no context length ({families.family(model).context}); fix it")
    return n


def complete(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    inputs: list[str],
    batch_size: int = 32,
    beam: int = 1,
    max_new_tokens: int = 100,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    stops: StopIds | None = None,
    line_end: str = "token",
) -> list[str]:
    """One completion per input, in input order (greedy for beam 1, else beam search; deterministic).

    Args:
        inputs: normalised inputs (`<s> tok tok ...`) or raw source text, mixed freely.
        batch_size: inputs decoded together; the output does not depend on it.
        max_new_tokens: longest completion in tokens; inputs are cut to the context minus this.
        autocast_dtype: bf16 (CUDA or CPU) or fp16 (CUDA) autocast; None = the model's own dtype.
        stops: precomputed `StopIds.of(tok)`, to save the vocabulary pass on repeated calls.
        line_end: "token" = plain greedy; "mass" = the line ends when the ids that end it outweigh every other id
            together; "majority" = when they take over half the probability (greedy only; see the module's docstring).
    Returns:
        completions without line breaks (normalised: stripped; raw: right-stripped).
    """
    context = _context(model)
    if max_new_tokens >= context:
        raise ConfigError(
            f"max_new_tokens: {max_new_tokens} leaves no room for input in the model's context of {context};"
            f" use at most {context - 1}"
        )
    check_line_end(line_end, beam)
    stops = stops or StopIds.of(tok)
    device = torch.device(device)
    raw = [is_raw(x) for x in inputs]
    ids = encode_inputs(tok, inputs, context - max_new_tokens)
    order = sorted(range(len(inputs)), key=lambda i: -len(ids[i]))  # longest first (see _Greedy)
    out: list[str] = [""] * len(inputs)
    amp = autocast_dtype is not None
    bar = tqdm(total=len(inputs), desc="complete", unit="ex", disable=not progress)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=amp):
        if beam == 1:
            seqs, modes = [ids[i] for i in order], [raw[i] for i in order]
            greedy = _Greedy(model, seqs, modes, stops, max_new_tokens, device, line_end)
            for k, new in greedy.run(batch_size):
                out[order[k]] = finish(tok, new, raw[order[k]], stops)
                bar.update(1)
        for mode in (False, True) if beam > 1 else ():  # a batch holds one mode: the two stop at different ids
            group = [i for i in order if raw[i] == mode]
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                rows = _beam_search(model, [ids[i] for i in batch], stops, mode, beam, max_new_tokens, device)
                for i, row in zip(batch, rows):
                    out[i] = finish(tok, row, mode, stops)
                bar.update(len(batch))
    bar.close()
    return out


class _Slots(Cache):
    """The KV cache of the rows being decoded: (rows, heads, width, head_dim) per layer, allocated once and written
    in place at one column shared by all rows (HF's DynamicCache concatenates: it copies itself every step).

    Row r owns the columns marked in `valid[r]`, all at `first[r]` or right of it; a step attends to `start:col + 1`.
    """

    NONE = 1 << 62  # `first` of a row that owns no column (a free slot): far right, also after a move left

    def __init__(self, prefill: DynamicCache, rows: int, width: int) -> None:
        super().__init__(layers=[])  # the tensors below are the whole cache
        self.k = [x.keys.new_zeros(rows, x.keys.shape[1], width, x.keys.shape[3]) for x in prefill.layers]
        self.v = [x.values.new_zeros(rows, x.values.shape[1], width, x.values.shape[3]) for x in prefill.layers]
        self.valid = torch.zeros(rows, width, dtype=torch.bool, device=self.k[0].device)
        self.first = torch.zeros(rows, dtype=torch.long, device=self.k[0].device)
        self.col = 0  # the column the next step writes
        self.start = 0  # the first column any row owns

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        k, v = self.k[layer_idx], self.v[layer_idx]
        k[:, :, self.col] = key_states[:, :, 0]  # (B, H, 1, D) -> column col
        v[:, :, self.col] = value_states[:, :, 0]
        return k[:, :, self.start : self.col + 1], v[:, :, self.start : self.col + 1]

    def place(self, slots: Tensor, prefill: DynamicCache, real: Tensor) -> None:
        """Copy a prefill of (k, H, w, D) into rows `slots`, ending at column `col`; `real` (k, w) marks non-padding."""
        w = real.shape[1]
        self.col = max(self.col, w)  # only the first prefill moves it: later sequences are no longer
        for k, v, x in zip(self.k, self.v, prefill.layers):
            k[slots, :, self.col - w : self.col] = x.keys
            v[slots, :, self.col - w : self.col] = x.values
        self.valid[slots] = False
        self.valid[slots, self.col - w : self.col] = real
        self.first[slots] = self.col - real.sum(-1)

    def step_mask(self) -> Tensor:
        """Give every row column `col` (moving all left first if the buffer is full); (rows, 1, 1, n) True = attend."""
        if self.col == self.valid.shape[1]:
            self.compact(torch.arange(len(self.first), device=self.first.device))
        self.valid[:, self.col] = True
        return self.valid[:, None, None, self.start : self.col + 1]

    def compact(self, keep: Tensor) -> None:
        """Keep only rows `keep`, their columns moved to the front."""
        lo = int(self.first[keep].min())
        n = self.col - lo
        for buf in (self.k, self.v):
            for i, old in enumerate(buf):
                buf[i] = old.new_zeros(len(keep), *old.shape[1:])
                buf[i][:, :, :n] = old[keep, :, lo : self.col]
        valid = self.valid.new_zeros(len(keep), self.valid.shape[1])
        valid[:, :n] = self.valid[keep, lo : self.col]
        self.valid, self.first, self.col, self.start = valid, self.first[keep] - lo, n, 0

    def refresh(self) -> None:
        """Attend from the first column any row owns (after rows came or went)."""
        self.start = int(self.first.min())


class _Greedy:
    """Greedy decoding of many sequences, longest first, in a fixed number of slots: a step feeds one token to every
    slot; a row that ends its line leaves at once and the next sequences take the free slots, so no batch waits for
    its slowest row. Once the queue has run dry, free slots are dropped.

    Newcomers are seated a few at a time (a forward call costs as much overhead as a step) and prefilled in runs of
    similar length (left-padded, with an attention mask and positions counted from each row's first real token);
    their keys and values are copied into their slots to end at the shared column: the longest come first, so that
    column is always far enough right. A free slot decodes garbage until it is filled or dropped; nothing reads it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        seqs: list[list[int]],
        raw: list[bool],
        stops: StopIds,
        max_new_tokens: int,
        device: torch.device,
        line_end: str = "token",
    ) -> None:
        self.model, self.seqs, self.raw, self.max_new, self.device = model, seqs, raw, max_new_tokens, device
        self.pad, self.width = stops.pad, _context(model) + max_new_tokens
        vocab = model.config.vocab_size
        self.is_stop = torch.zeros(2, vocab, dtype=torch.bool, device=device)  # [raw mode, id]: ends the line
        for mode in (0, 1):
            self.is_stop[mode, [i for i in stops.for_mode(bool(mode)) if i < vocab]] = True
        self.is_end = None  # [raw mode, id]: ends the line with no more text, summed by the line-end rules
        self.line_end = line_end
        if line_end != "token":
            self.is_end = torch.zeros_like(self.is_stop)
            for mode in (0, 1):
                self.is_end[mode, [i for i in stops.line_end(bool(mode)) if i < vocab]] = True
        self.additive = getattr(model.config, "_attn_implementation", "sdpa") == "eager"  # eager adds its mask
        self.cache_arg = families.cache_arg(model)

    def run(self, slots: int) -> Iterator[tuple[int, list[int]]]:
        """(sequence index, its new ids up to and with its stop token) of every sequence, in the order they end."""
        n = min(slots, len(self.seqs))
        self.taken = 0  # sequences seated so far: the queue is seqs[taken:]
        self.rows: list[int | None] = [None] * n  # the sequence each slot decodes, None = free
        self.live = torch.zeros(n, dtype=torch.bool, device=self.device)  # the same, as a mask
        self.nxt = torch.zeros(n, dtype=torch.long, device=self.device)  # the id each slot feeds next...
        self.pos = torch.zeros_like(self.nxt)  # ...at this position
        self.mode = torch.zeros_like(self.nxt)  # 1 = raw
        self.count = torch.zeros_like(self.nxt)  # new ids so far
        self.new = torch.zeros(n, self.max_new, dtype=torch.long, device=self.device)  # (slot, step)
        self.done = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.cache: _Slots | None = None
        gather = max(1, n // 8)  # free slots to wait for before seating newcomers, or dropping slots
        free, ended = list(range(n)), []
        while True:
            for s, k, ids in zip(ended, self.count[ended].tolist(), self.new[ended].tolist()):
                yield self.rows[s], ids[:k]
                self.rows[s] = None
            if ended:
                self.live[ended], self.count[ended], self.cache.first[ended] = False, 0, _Slots.NONE
                self.cache.refresh()
                free += ended
            waiting = len(self.seqs) - self.taken
            if free and waiting and len(free) >= min(gather, waiting):
                seat, free = free[:waiting], free[waiting:]
                ended = self._seat(seat)  # newcomers whose first token ends the line
                if ended:
                    continue
            if len(free) == len(self.rows):
                return
            if free and not waiting and len(free) >= gather:
                self._keep([s for s, r in enumerate(self.rows) if r is not None])
                free = []
            self._step()
            ended = self.done.nonzero()[:, 0].tolist()

    def _step(self) -> None:
        mask = self.cache.step_mask()
        self.nxt = self._pick(self._forward(self.nxt[:, None], self.pos[:, None], mask, self.cache), self.mode)
        self.cache.col += 1
        self.pos += self.live  # a free slot stays put, inside the context
        self._record(torch.arange(len(self.rows), device=self.device))

    def _record(self, slots: Tensor) -> None:
        """Append each live slot's next token to its ids; done = a stop id, or max_new_tokens reached."""
        live = self.live[slots]
        self.new[slots, self.count[slots]] = self.nxt[slots]
        self.count[slots] += live
        stop = self.is_stop[self.mode[slots], self.nxt[slots]] | (self.count[slots] == self.max_new)
        self.done[slots] = stop & live

    def _seat(self, slots: list[int]) -> list[int]:
        """Prefill the next sequences into `slots`; the slots whose first token ends the line already."""
        take = range(self.taken, self.taken + len(slots))
        self.taken += len(slots)
        lo = 0
        while lo < len(take):  # runs of similar length (longest first): padding stays under 1/8 of a row
            hi = lo + 1
            while hi < len(take) and 8 * len(self.seqs[take[hi]]) >= 7 * len(self.seqs[take[lo]]):
                hi += 1
            self._prefill(take[lo:hi], slots[lo:hi])
            lo = hi
        at = torch.tensor(slots, device=self.device)
        self.count[at], self.live[at] = 0, True
        self.mode[at] = torch.tensor([self.raw[i] for i in take], dtype=torch.long, device=self.device)
        for s, i in zip(slots, take):
            self.rows[s] = i
        self._record(at)
        self.cache.refresh()
        return at[self.done[at]].tolist()

    def _prefill(self, seqs: range, slots: list[int]) -> None:
        """Run sequences `seqs` left-padded in one batch, copy their keys and values into `slots`, and set the slots'
        first new token and its position."""
        width = max(len(self.seqs[i]) for i in seqs)
        x = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        real = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, i in enumerate(seqs):
            x[r, width - len(self.seqs[i]) :] = torch.tensor(self.seqs[i], dtype=torch.long)
            real[r, width - len(self.seqs[i]) :] = True
        x, real = x.to(self.device), real.to(self.device)
        pos = (real.cumsum(-1) - 1).clamp(min=0)  # (k, w); padding sits at 0, masked out
        mask = None  # no padding: plain causal attention, as `generate` runs a single row
        if not real.all():  # a padding query attends to itself only: no row of the mask is empty (NaN)
            causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
            mask = (causal & (real[:, None, :] | torch.eye(width, dtype=torch.bool, device=self.device)))[:, None]
        prefill = DynamicCache(config=self.model.config)
        modes = torch.tensor([self.raw[i] for i in seqs], dtype=torch.long, device=self.device)
        first = self._pick(self._forward(x, pos, mask, prefill), modes)
        if self.cache is None:
            self.cache = _Slots(prefill, len(self.rows), self.width)
        at = torch.tensor(slots, device=self.device)
        self.cache.place(at, prefill, real)
        self.pos[at], self.nxt[at] = real.sum(-1), first

    def _keep(self, seated: list[int]) -> None:
        """Drop the free slots (the queue has run dry)."""
        keep = torch.tensor(seated, device=self.device)
        self.cache.compact(keep)
        self.rows = [self.rows[s] for s in seated]
        for name in ("live", "nxt", "pos", "mode", "count", "new", "done"):
            setattr(self, name, getattr(self, name)[keep])

    def _pick(self, logits: Tensor, modes: Tensor) -> Tensor:
        """The next id of each row (B,) from its logits (B, V), by the line-end rule."""
        if self.is_end is None:
            return logits.argmax(-1)
        return line_end_pick(logits, self.is_end[modes], self.line_end)

    def _forward(self, x: Tensor, pos: Tensor, mask: Tensor | None, cache: Cache) -> Tensor:
        """(B, V) logits of each row's last position; `mask` (B, 1, q, kv) True = attend, None = plain causal."""
        if mask is not None and self.additive:
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        kw = {self.cache_arg: cache}
        out = self.model(input_ids=x, position_ids=pos, attention_mask=mask, use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1]


def _beam_search(
    model: PreTrainedModel,
    seqs: list[list[int]],
    stops: StopIds,
    raw: bool,
    beam: int,
    max_new_tokens: int,
    device: torch.device,
) -> list[list[int]]:
    """New ids per row for one left-padded batch through `generate` ((B, T) in, (B, T + new) out)."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), stops.pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    gen = GenerationConfig(
        do_sample=False,
        num_beams=beam,
        max_new_tokens=max_new_tokens,
        eos_token_id=stops.for_mode(raw),
        pad_token_id=stops.fill,
        use_cache=True,
    )
    result = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gen)
    return result[:, width:].tolist()  # (B, new)


def engine_complete(
    engine: Any,
    tok: PreTrainedTokenizerBase,
    inputs: list[str],
    max_new_tokens: int = 100,
    progress: bool = True,
    stops: StopIds | None = None,
    line_end: str = "token",
) -> list[str]:
    """One completion per input through an `Engine` (exported engines), one input at a time, greedy.

    Same inputs, truncation, stops, line-end rule and text as `complete`: a raw-mode newline token is kept (it may
    carry code before its line break), so the engine is asked to stop only at eos and the loop stops at the newline.
    """
    check_line_end(line_end)
    if line_end != "token" and not getattr(engine, "supports_line_end", False):
        raise ConfigError(f"line_end: the {engine.name} engine decodes by plain greedy only; use line_end token")
    stops = stops or StopIds.of(tok)  # a pass over the vocabulary (0.6 s for SmolLM2's): pass it on repeated calls
    out = []
    for text in tqdm(inputs, desc="complete", unit="ex", disable=not progress):
        raw = is_raw(text)
        ids = encode_inputs(tok, [text], engine.context - max_new_tokens)[0]
        stop_now = set(stops.for_mode(raw)) - (stops.newline if raw else set())
        new: list[int] = []
        kw = {"line_end": frozenset(stops.line_end(raw)), "line_end_rule": line_end} if line_end != "token" else {}
        for i in engine.stream(ids, max_new_tokens, stop_now, **kw):
            new.append(i)
            if raw and i in stops.newline:
                break
        out.append(finish(tok, new, raw, stops))
    return out
