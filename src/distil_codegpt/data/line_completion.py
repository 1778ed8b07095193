"""Line-level completion sets in CodeXGLUE's format: JSON lines {"input": ..., "gt": ...}.

Normalised mode: `input` is a file's tokens from `<s>` up to a random cut (which may fall mid-line) and
`gt` the tokens from the cut up to the next `<EOL>` (excluded), never empty. Raw mode: `input` is the
source text up to a cut at the start of a Python token and `gt` the rest of that physical line (trailing
whitespace dropped), never blank. Cuts are drawn round-robin over the files (one per file while there
are more files than examples, as CodeXGLUE did), without repeated examples, deterministically from the seed.
"""

from __future__ import annotations

import json
import random
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from distil_codegpt.config import UserError
from distil_codegpt.data.formats import decode_document
from distil_codegpt.data.normalize import EOL, EOS, NormalizeError, python_tokens
from distil_codegpt.runinfo import atomic_open

_NOT_A_CUT = {tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


@dataclass(frozen=True)
class LineExample:
    input: str
    gt: str


def token_cuts(tokens: list[str], max_input_tokens: int) -> list[int]:
    """Cut positions i (input = tokens[:i]) with a non-empty line rest and at most max_input_tokens of input."""
    last = min(len(tokens) - 1, max_input_tokens)
    return [i for i in range(1, last + 1) if tokens[i] not in (EOL, EOS)]


def token_example(tokens: list[str], cut: int) -> LineExample:
    end = cut
    while end < len(tokens) and tokens[end] not in (EOL, EOS):
        end += 1
    return LineExample(" ".join(tokens[:cut]), " ".join(tokens[cut:end]))


def raw_cuts(text: str, max_input_tokens: int) -> list[int]:
    """Character offsets at the start of Python tokens (among the first max_input_tokens) whose line rest is code."""
    try:
        toks = python_tokens(text)
    except NormalizeError:
        return []
    cuts = []
    for kind, _, offset in toks[:max_input_tokens]:
        if kind not in _NOT_A_CUT and raw_example(text, offset).gt:
            cuts.append(offset)
    return cuts


def raw_example(text: str, cut: int) -> LineExample:
    end = text.find("\n", cut)
    rest = text[cut : len(text) if end < 0 else end]
    return LineExample(text[:cut], rest.rstrip())


def make_examples(docs: list[str], fmt: str, n: int, max_input_tokens: int, seed: int) -> list[LineExample]:
    """Up to n examples from the documents of one split (fewer when the files do not hold n distinct cuts)."""
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    cuts_of: dict[int, list[int]] = {}  # doc index -> its unused cuts in random order, filled on first visit
    parsed: dict[int, list[str] | str] = {}  # doc index -> its tokens (codexglue) or source text (raw)
    out: list[LineExample] = []
    seen: set[LineExample] = set()
    active = order
    while active and len(out) < n:
        still = []
        for i in active:
            if len(out) >= n:
                break
            if i not in cuts_of:
                parsed[i] = docs[i].split(" ") if fmt == "codexglue" else decode_document(docs[i], fmt)
                cuts = _cuts(parsed[i], max_input_tokens)
                rng.shuffle(cuts)
                cuts_of[i] = cuts
            while cuts_of[i]:
                ex = _example(parsed[i], cuts_of[i].pop())
                if ex not in seen:  # identical files or lines would repeat an example
                    seen.add(ex)
                    out.append(ex)
                    break
            if cuts_of[i]:
                still.append(i)
        active = still
    return out


def _cuts(doc: list[str] | str, max_input_tokens: int) -> list[int]:
    return token_cuts(doc, max_input_tokens) if isinstance(doc, list) else raw_cuts(doc, max_input_tokens)


def _example(doc: list[str] | str, cut: int) -> LineExample:
    return token_example(doc, cut) if isinstance(doc, list) else raw_example(doc, cut)


def write_examples(path: str | Path, examples: Iterable[LineExample]) -> None:
    with atomic_open(path) as f:
        for ex in examples:
            f.write(json.dumps({"input": ex.input, "gt": ex.gt}, ensure_ascii=False) + "\n")


def read_examples(path: str | Path) -> list[LineExample]:
    """Read any CodeXGLUE line-completion file (ours, py150's or javaCorpus's test.json)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such line-completion file; build one with `distil-codegpt corpus`")
    out = []
    with path.open("rb") as f:  # bytes: a line that is not UTF-8 is reported with its number, like any other
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
                out.append(LineExample(str(obj["input"]), str(obj["gt"])))
            except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise UserError(
                    f"{path}:{lineno}: not a JSON object with 'input' and 'gt'; fix that line or rebuild the file"
                    " with `distil-codegpt corpus`"
                ) from None
    return out
