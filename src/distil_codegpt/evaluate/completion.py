"""Batched line completion with a KV cache: inputs in, one single-line completion per input out.

Two input modes, told apart per input: a normalised (CodeXGLUE) input starts with the text `<s>`, which the
tokenizer parses as the bos id; a raw input is source text and gets the bos id in front, as its documents did in
training. A completion ends at the end of the line: in normalised mode at `<EOL>` (every id whose text, stripped,
is `<EOL>`: our tokenizer has a bare and a spaced one, CodeGPT's one added token) or `</s>`; in raw mode at the first
token whose text holds a line break, or `</s>`. Predictions never hold a line break: the official evaluator reads
predictions.txt with universal newlines, so one inside a completion would shift every later line.

Inputs are sorted by length so a batch wastes little on padding, left-padded (the new tokens of every row then start
at the same column) with an attention mask, from which `generate` derives each row's positions; batched output equals
batch-1 output. Inputs longer than the context minus `max_new_tokens` keep their last tokens: those are the ones the
next line depends on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from distil_codegpt.config import ConfigError

BOS_TEXT = "<s>"
EOL_TEXT = "<EOL>"
LINE_BREAKS = ("\n", "\r")


@dataclass(frozen=True)
class StopIds:
    """Ids that end a completion, precomputed once from the vocabulary."""

    eol: frozenset[int]  # normalised mode: `<EOL>` in any spacing
    newline: frozenset[int]  # raw mode: tokens whose text holds a line break
    eos: int | None
    pad: int

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase) -> StopIds:
        """Decode every id on its own (the Rust backend does 50k in milliseconds) and classify its text."""
        texts = tok.batch_decode(
            [[i] for i in range(len(tok))], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        eol = frozenset(i for i, t in enumerate(texts) if t.strip() == EOL_TEXT)
        newline = frozenset(i for i, t in enumerate(texts) if any(b in t for b in LINE_BREAKS))
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        if pad is None:
            raise ConfigError("tokenizer: has neither a pad nor an eos token; save it with one (e.g. <pad>)")
        return cls(eol, newline, eos, pad)

    @property
    def fill(self) -> int:
        """What `generate` feeds a finished row: eos, a stop id, so it never reads as text (and transformers does
        not take it for unmasked padding and warn, as it does with the pad id)."""
        return self.eos if self.eos is not None else self.pad

    def for_mode(self, raw: bool) -> list[int]:
        ids = set(self.newline if raw else self.eol)
        if self.eos is not None:
            ids.add(self.eos)
        return sorted(ids)


def is_raw(text: str) -> bool:
    """Raw inputs are source text; normalised ones start with `<s>` (ours and CodeXGLUE's test.json alike)."""
    return not text.startswith(BOS_TEXT)


def encode_inputs(tok: PreTrainedTokenizerBase, inputs: list[str], max_len: int) -> list[list[int]]:
    """Ids of each input (bos in front of raw ones), keeping only the last `max_len` ids of a longer one."""
    encoded = tok(inputs, add_special_tokens=False)["input_ids"]
    out = []
    for text, ids in zip(inputs, encoded):
        if is_raw(text):
            ids = [tok.bos_token_id, *ids] if tok.bos_token_id is not None else ids
        out.append(ids[-max_len:])
    return out


def finish(tok: PreTrainedTokenizerBase, new_ids: list[int], raw: bool, stops: StopIds) -> str:
    """The text of one row's new ids, up to its first stop; never with a line break."""
    stop_set = stops.newline if raw else stops.eol
    keep = new_ids
    for k, i in enumerate(new_ids):
        if i == stops.eos or i in stop_set:
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
    cfg = model.config
    n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if not n:
        raise ConfigError("model: its config states no context length (n_positions); pass a GPT-2-family model")
    return int(n)


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
) -> list[str]:
    """One completion per input, in input order (greedy for beam 1, else beam search; deterministic).

    Args:
        inputs: normalised inputs (`<s> tok tok ...`) or raw source text, mixed freely.
        batch_size: inputs decoded together; the output does not depend on it.
        max_new_tokens: longest completion in tokens; inputs are cut to the context minus this.
        autocast_dtype: bf16/fp16 autocast on CUDA (None = the model's own dtype).
        stops: precomputed `StopIds.of(tok)`, to save the vocabulary pass on repeated calls.
    Returns:
        completions without line breaks (normalised: stripped; raw: right-stripped).
    """
    context = _context(model)
    if max_new_tokens >= context:
        raise ConfigError(
            f"max_new_tokens: {max_new_tokens} leaves no room for input in the model's context of {context};"
            f" use at most {context - 1}"
        )
    stops = stops or StopIds.of(tok)
    device = torch.device(device)
    raw = [is_raw(x) for x in inputs]
    ids = encode_inputs(tok, inputs, context - max_new_tokens)
    order = sorted(range(len(inputs)), key=lambda i: -len(ids[i]))  # longest first: memory peaks at once
    out: list[str] = [""] * len(inputs)
    amp = device.type == "cuda" and autocast_dtype is not None
    bar = tqdm(total=len(inputs), desc="complete", unit="ex", disable=not progress)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=amp):
        for mode in (False, True):  # a batch holds one mode: the two stop at different ids
            group = [i for i in order if raw[i] == mode]
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                rows = _generate(model, [ids[i] for i in batch], stops, mode, beam, max_new_tokens, device)
                for i, row in zip(batch, rows):
                    out[i] = finish(tok, row, mode, stops)
                bar.update(len(batch))
    bar.close()
    return out


def _generate(
    model: PreTrainedModel,
    seqs: list[list[int]],
    stops: StopIds,
    raw: bool,
    beam: int,
    max_new_tokens: int,
    device: torch.device,
) -> list[list[int]]:
    """New ids per row for one left-padded batch ((B, T) in, (B, T + new) out of `generate`)."""
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
    engine: Any, tok: PreTrainedTokenizerBase, inputs: list[str], max_new_tokens: int = 100, progress: bool = True
) -> list[str]:
    """One completion per input through an `Engine` (exported engines), one input at a time, greedy.

    Same inputs, truncation, stops and text as `complete`: a raw-mode newline token is kept (it may carry code
    before its line break), so the engine is asked to stop only at eos and the loop stops at the newline.
    """
    stops = StopIds.of(tok)
    out = []
    for text in tqdm(inputs, desc="complete", unit="ex", disable=not progress):
        raw = is_raw(text)
        ids = encode_inputs(tok, [text], engine.context - max_new_tokens)[0]
        stop_now = set(stops.for_mode(raw)) - (stops.newline if raw else set())
        new: list[int] = []
        for i in engine.stream(ids, max_new_tokens, stop_now):
            new.append(i)
            if raw and i in stops.newline:
                break
        out.append(finish(tok, new, raw, stops))
    return out
