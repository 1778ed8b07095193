"""Normalised CodeXGLUE tokens back to readable code: the (lossy) inverse of `normalize`.

The normalised form drops indentation, comments and the bodies of most literals. Indentation is rebuilt by
heuristics, spacing follows PEP 8 habits, known literals are restored and unknown ones become placeholders
that the caller is told about.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from distil_codegpt.data.normalize import BOS, EOL, EOS, KEYWORDS, OPERATORS, SPECIAL_CHARS

_LIT = re.compile(r"^([a-zA-Z]*)('''|\"\"\"|'|\")?<(STR|NUM|CHAR)_LIT(?::(.*))?>('''|\"\"\"|'|\")?$", re.S)
_LIT_INSIDE = re.compile(r"<(STR|NUM|CHAR)_LIT(?::([^<>]*))?>")
_OPEN, _CLOSE = "([{", ")]}"
_DEDENT_AFTER = {"return", "pass", "break", "continue", "raise"}
_CONTINUES = {"elif": {"if", "elif"}, "else": {"if", "elif", "for", "while", "try", "except"},
              "except": {"try", "except"}, "finally": {"try", "except", "else"}}  # fmt: skip
_OP_PAIRS = frozenset(op[:2] for op in OPERATORS | {"<>"} if len(op) >= 2)
_UNARY_AFTER = frozenset(OPERATORS - set(_CLOSE)) | KEYWORDS - {"True", "False", "None"}


def _place(first: str, level: int, openers: list[tuple[int, str]]) -> tuple[int, list[tuple[int, str]]]:
    """Indentation level of a logical line starting with `first`, and the openers still open before it."""
    if first in _CONTINUES:
        wanted = _CONTINUES[first]
    elif first in ("def", "@", "async"):
        wanted = {"def", "class"}
    elif first == "class":
        wanted = {"class", "def"}
    else:
        return level, openers
    for i in range(len(openers) - 1, -1, -1):
        at, kw = openers[i]
        if kw in wanted:
            if kw == "class" and first != "class":
                return at + 1, openers[: i + 1]  # a method
            return at, openers[:i]  # a sibling, or the next branch of the same statement
    return level, openers


@dataclass
class Denormalized:
    """Code rebuilt from normalised tokens; `unresolved` lists the placeholders that stand for lost literals."""

    code: str
    unresolved: list[str]


def denormalize_token(tok: str, unresolved: list[str] | None = None) -> str:
    """One normalised token back to source text; `<STR_LIT>` becomes an empty string, `<NUM_LIT>` a 0.

    A malformed token with literals glued inside (model output like `x<NUM_LIT>`) has each literal replaced.
    """
    m = _LIT.match(tok)
    if not m:
        if "_LIT" in tok:
            return _LIT_INSIDE.sub(lambda g: _literal_text(g.group(1), g.group(2), unresolved, g.group(0)), tok)
        return tok
    prefix, q1, kind, body, q2 = m.groups()
    body = _literal_text(kind, body, unresolved, tok)
    if kind == "CHAR" and not q1:
        q1 = q2 = "'"
    return f"{prefix}{q1 or ''}{body}{q2 or ''}"


def _literal_text(kind: str, body: str | None, unresolved: list[str] | None, tok: str) -> str:
    if body is None:
        if unresolved is not None:
            unresolved.append(tok)
        return "0" if kind == "NUM" else ""
    for ch, code in SPECIAL_CHARS.items():
        body = body.replace(code, ch)
    return body


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def _needs_space(a: str, b: str, brackets: list[str], unary: bool) -> bool:
    """Whether two adjacent tokens on one line are written with a space between them (PEP 8-ish)."""
    # Never glue two tokens into one: names/numbers/string prefixes, or operators like `=` `=` -> `==`.
    if _word_char(a[-1]) and (_word_char(b[0]) or b[0] in "'\""):
        return True
    if a[-1] + b[0] in _OP_PAIRS or (a[-1].isdigit() and b[0] == ".") or (a[-1] == "." and b[0].isdigit()):
        return True
    if b in (")", "]", "}", ",", ";", ".") or a in ("(", "[", "{", ".", "~", "@") or unary:
        return False
    if b in ("(", "[") and (_word_char(a[-1]) or a[-1] in ")]}'\"") and a not in KEYWORDS:
        return False  # call or subscript
    if b == ":":
        return False
    in_brackets = brackets[-1] if brackets else ""
    if a == ":" and in_brackets == "[":
        return False  # slice
    if "=" in (a, b) and in_brackets == "(":
        return False  # keyword argument
    return True


def format_line(tokens: list[str], brackets: list[str] | None = None) -> str:
    """Join one physical line's (denormalised) tokens; `brackets` carries the open brackets across lines."""
    brackets = [] if brackets is None else brackets
    tokens = [t for t in tokens if t]  # a literal the model left empty (`<STR_LIT>` on its own) writes nothing
    out = ""
    for i, tok in enumerate(tokens):
        if i:
            prev, before = tokens[i - 1], tokens[i - 2] if i >= 2 else ""
            # `-x`, `*args`: an operator that follows another operator, a keyword or an opening is unary.
            unary = prev in ("-", "+", "*", "**", "~") and (
                before in _UNARY_AFTER or before in ("", "(", "[", "{", ",")
            )
            out += " " if _needs_space(prev, tok, brackets, unary) else ""
        out += tok
        if tok in _OPEN:
            brackets.append(tok)
        elif tok in _CLOSE and brackets:
            brackets.pop()
    return out


def denormalize(tokens: str | Iterable[str], indent: str = "    ") -> Denormalized:
    """Normalised tokens -> readable code, known literals restored.

    The normalised form drops indentation, comments and the bodies of most literals, so this is lossy:
    indentation is rebuilt by heuristics (indent after a line ending in `:`, dedent after return/pass/
    break/continue/raise, `else`/`elif`/`except`/`finally` aligned with their opener), and literals not in
    the list come back as placeholders listed in `unresolved`. The result always tokenizes to the same
    normalised tokens, placeholders aside.
    """
    toks = tokens.split() if isinstance(tokens, str) else list(tokens)
    unresolved: list[str] = []
    lines: list[list[str]] = [[]]
    for t in toks:
        if t in (BOS, EOS):
            continue
        if t == EOL:
            lines.append([])
        else:
            lines[-1].append(denormalize_token(t, unresolved))
    out: list[str] = []
    level = 0
    openers: list[tuple[int, str]] = []  # (level, first keyword) of the blocks still open
    brackets: list[str] = []
    first = ""
    for line in lines:
        if not line:
            continue
        if brackets:  # continuation of a bracketed expression: hanging indent
            out.append(indent * (level + 1) + format_line(line, brackets))
        else:
            first = line[0]
            level, openers = _place(first, level, openers)
            out.append(indent * level + format_line(line, brackets))
        if brackets:
            continue
        if line[-1] == ":":
            openers = [o for o in openers if o[0] < level] + [(level, first)]
            level += 1
        elif first in _DEDENT_AFTER and level:
            level -= 1
            openers = [o for o in openers if o[0] <= level]
    return Denormalized("\n".join(out) + ("\n" if out else ""), unresolved)
