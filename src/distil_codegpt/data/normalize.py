"""CodeXGLUE py150 normalisation of Python source, and its (lossy) inverse.

The forward direction follows CodeXGLUE's published py150 preprocessing: Python's `tokenize`; comments,
INDENT/DEDENT and encoding tokens dropped; NEWLINE/NL become `<EOL>` (runs collapsed, none at the start or
end); every token's inner whitespace collapsed to single spaces; strings keep prefix and quotes around
`<STR_LIT>` or `<STR_LIT:body>` (body in the literal list, spaces written U+0020, commas U+002C); numbers
become `<NUM_LIT>` or `<NUM_LIT:value>`.

Python 3.12 tokenizes f-strings into several tokens and accepts or rejects some malformed code differently
from 3.11. To give identical output on every version, f-strings are re-assembled from the source text into
one string token, and a file is rejected (NormalizeError) on all versions when any version would reject it:
error tokens, operators that are not Python 3 operators, malformed numbers, inconsistent tabs.

This module uses only the standard library so that it can run under any interpreter (tests compare versions).
"""

from __future__ import annotations

import io
import json
import re
import token as _token
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

BOS, EOS, EOL = "<s>", "</s>", "<EOL>"
STR_LIT, NUM_LIT, CHAR_LIT = "<STR_LIT>", "<NUM_LIT>", "<CHAR_LIT>"
SPECIAL_CHARS = {" ": "U+0020", ",": "U+002C"}
_QUOTES = ("'''", '"""', "'", '"')
_PREFIX = re.compile(r"^[a-zA-Z]+")

# Python 3 operators as 3.11's tokenize knows them. 3.12 also reports `!`, `$`, `?`, backticks and `<>` as OP;
# those are rejected so that both versions skip the same files.
_OPERATORS = frozenset(_token.EXACT_TOKEN_TYPES) - {"!"}
_NUMBER = re.compile(tokenize.Number)
# 3.11's tokenize takes identifiers as \w+; 3.12 takes more (and some non-identifiers) as NAME.
_NAME = re.compile(r"\w+")
_KEYWORDS = frozenset(__import__("keyword").kwlist)
_FSTRING_START = {getattr(_token, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(_token, n)}
_FSTRING_END = {getattr(_token, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(_token, n)}


class NormalizeError(ValueError):
    """The source does not tokenize (on some supported Python version)."""


class NoCodeError(NormalizeError):
    """The source tokenizes but holds no code (empty, blank or only comments)."""


@dataclass(frozen=True)
class Literals:
    """Literal values kept verbatim (`<STR_LIT:body>`, `<NUM_LIT:value>`); bodies in their encoded form."""

    str: frozenset[str]
    num: frozenset[str]
    char: frozenset[str] = frozenset()
    # Order of the source file, so that tokenizers list the literal tokens deterministically.
    ordered: tuple[str, ...] = ()

    def tokens(self) -> list[str]:
        """Every `<X_LIT:value>` token this list can produce, in file order."""
        return list(self.ordered)


def default_literals_path() -> Path:
    return Path(str(resources.files("distil_codegpt") / "resources" / "py150_literals.json"))


def load_literals(path: str | Path | None = None) -> Literals:
    """Load a literal list in CodeXGLUE's format: {"str": [...], "num": [...], "char": [...]}."""
    path = Path(path) if path else default_literals_path()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"literals: cannot read {str(path)!r} ({e}); pass a JSON file like py150_literals.json")
    if not isinstance(data, dict) or not all(isinstance(data.get(k, []), list) for k in ("str", "num", "char")):
        raise ValueError(f"literals: {str(path)!r} must be a JSON object with lists 'str' and 'num'")
    strs = [str(s) for s in data.get("str", [])]
    nums = [str(n) for n in data.get("num", [])]
    chars = [str(c) for c in data.get("char", [])]
    ordered = [f"<STR_LIT:{s}>" for s in strs] + [f"<NUM_LIT:{n}>" for n in nums] + [f"<CHAR_LIT:{c}>" for c in chars]
    return Literals(frozenset(strs), frozenset(nums), frozenset(chars), tuple(dict.fromkeys(ordered)))


# ---------------------------------------------------------------- forward: source -> tokens


def _line_starts(text: str) -> list[int]:
    """Character offset of each physical line as tokenize numbers them (split on \\n only)."""
    starts, pos = [0], 0
    for line in io.StringIO(text).readlines():
        pos += len(line)
        starts.append(pos)
    return starts


def _indent_cols(ws: str) -> tuple[int, int]:
    """Indentation width with tab size 8 and tab size 1: Python rejects lines where the two disagree."""
    col = alt = 0
    for ch in ws:
        if ch == "\t":
            col = (col // 8 + 1) * 8
            alt += 1
        elif ch == "\f":
            col = alt = 0
        else:
            col += 1
            alt += 1
    return col, alt


class _TabCheck:
    """CPython's tab-consistency rule, which 3.12's tokenize enforces and 3.11's does not."""

    def __init__(self) -> None:
        self.stack = [(0, 0)]

    def line(self, ws: str) -> None:
        col, alt = _indent_cols(ws)
        top, top_alt = self.stack[-1]
        if col > top:
            if alt <= top_alt:
                raise NormalizeError("inconsistent use of tabs and spaces in indentation")
            self.stack.append((col, alt))
            return
        while col < self.stack[-1][0]:
            self.stack.pop()
        if (col, alt) != self.stack[-1]:
            raise NormalizeError("inconsistent use of tabs and spaces in indentation")


def python_tokens(text: str) -> list[tuple[int, str, int]]:
    """(type, string, start offset in text) of each token, with 3.11's view of f-strings on every version.

    A leading byte-order mark is ignored (offsets still count it).
    Raises NormalizeError where any supported Python version would fail to tokenize the text.
    """
    bom = 1 if text.startswith("\ufeff") else 0
    text = text[bom:]
    starts = _line_starts(text)
    out: list[tuple[int, str, int]] = []
    depth = 0
    fstart: tokenize.TokenInfo | None = None
    prev: tokenize.TokenInfo | None = None
    tabs = _TabCheck()
    new_logical_line = True
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in _FSTRING_START:
                if depth == 0:
                    fstart = tok
                depth += 1
                continue
            if depth:
                if tok.type in _FSTRING_END:
                    depth -= 1
                    if depth == 0:
                        assert fstart is not None
                        begin = starts[fstart.start[0] - 1] + fstart.start[1]
                        string = text[begin : starts[tok.end[0] - 1] + tok.end[1]]
                        tok = tok._replace(type=tokenize.STRING, string=string, start=fstart.start)
                if depth:
                    continue
            _check_token(tok, prev)
            if new_logical_line and tok.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
                if tok.type != tokenize.ENDMARKER:
                    row, col = tok.start
                    tabs.line(text[starts[row - 1] : starts[row - 1] + col])
                new_logical_line = False
            if tok.type == tokenize.NEWLINE:
                new_logical_line = True
            out.append((tok.type, tok.string, bom + starts[tok.start[0] - 1] + tok.start[1]))
            prev = tok
    except (tokenize.TokenError, SyntaxError) as e:
        raise NormalizeError(f"{type(e).__name__}: {e}") from None
    if depth:
        raise NormalizeError("unterminated f-string")
    return out


def _check_token(tok: tokenize.TokenInfo, prev: tokenize.TokenInfo | None) -> None:
    if tok.type == tokenize.ERRORTOKEN and tok.string.strip():
        raise NormalizeError(f"error token {tok.string!r} at line {tok.start[0]}")
    if tok.type == tokenize.OP and tok.string not in _OPERATORS:
        raise NormalizeError(f"not a Python 3 operator {tok.string!r} at line {tok.start[0]}")
    if tok.type == tokenize.NAME and not _NAME.fullmatch(tok.string):
        raise NormalizeError(f"not an identifier {tok.string!r} at line {tok.start[0]}")
    if tok.type == tokenize.NUMBER and not _NUMBER.fullmatch(tok.string):
        raise NormalizeError(f"malformed number {tok.string!r} at line {tok.start[0]}")
    if prev is not None and prev.string == "<" and tok.string == ">" and prev.end == tok.start:
        raise NormalizeError(f"not a Python 3 operator '<>' at line {tok.start[0]}")
    if (
        prev is not None
        and prev.type == tokenize.NUMBER
        and prev.end == tok.start
        and (tok.type == tokenize.NUMBER or (tok.type == tokenize.NAME and tok.string not in _KEYWORDS))
    ):
        raise NormalizeError(f"malformed number {prev.string + tok.string!r} at line {tok.start[0]}")


def normalize_string(tok: str, literals: Literals) -> str:
    """`rb'abc'` -> `rb'<STR_LIT>'`; a body in the literal list is kept: `"<STR_LIT:__main__>"`."""
    m = _PREFIX.match(tok)
    prefix = m.group(0) if m else ""
    rest = tok[len(prefix) :]
    start = end = ""
    body = rest
    for q in _QUOTES:
        if rest.startswith(q):
            start, body = q, body[len(q) :]
            if rest.endswith(q):
                end, body = q, body[: -len(q)]
            break
    for ch, code in SPECIAL_CHARS.items():
        body = body.replace(ch, code)
    lit = f"<STR_LIT:{body}>" if body in literals.str else STR_LIT
    return f"{prefix}{start}{lit}{end}"


def normalize_number(tok: str, literals: Literals) -> str:
    return f"<NUM_LIT:{tok}>" if tok in literals.num else NUM_LIT


def normalize_code(text: str, literals: Literals) -> list[str]:
    """Source text -> CodeXGLUE py150 tokens, `<s>` ... `</s>` included.

    Raises NormalizeError if the text does not tokenize, or holds no token at all.
    """
    out: list[str] = []
    prev_eol = False
    for kind, s, _ in python_tokens(text):
        s = " ".join(s.split())
        if kind == tokenize.STRING:
            out.append(normalize_string(s, literals))
        elif kind == tokenize.NUMBER:
            out.append(normalize_number(s, literals))
        elif kind in (tokenize.NEWLINE, tokenize.NL):
            if not prev_eol:
                out.append(EOL)
                prev_eol = True
            continue
        elif kind in (tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER) or not s:
            continue
        else:
            out.append(s)
        prev_eol = False
    if out and out[0] == EOL:
        out = out[1:]
    if out and out[-1] == EOL:
        out = out[:-1]
    if not out:
        raise NoCodeError("no code (empty, or only comments)")
    return [BOS, *out, EOS]


# ---------------------------------------------------------------- inverse: tokens -> readable code

_LIT = re.compile(r"^([a-zA-Z]*)('''|\"\"\"|'|\")?<(STR|NUM|CHAR)_LIT(?::(.*))?>('''|\"\"\"|'|\")?$", re.S)
_OPEN, _CLOSE = "([{", ")]}"
_DEDENT_AFTER = {"return", "pass", "break", "continue", "raise"}
_CONTINUES = {"elif": {"if", "elif"}, "else": {"if", "elif", "for", "while", "try", "except"},
              "except": {"try", "except"}, "finally": {"try", "except", "else"}}  # fmt: skip
_OP_PAIRS = frozenset(op[:2] for op in _OPERATORS | {"<>"} if len(op) >= 2)
_UNARY_AFTER = frozenset(_OPERATORS - set(_CLOSE)) | _KEYWORDS - {"True", "False", "None"}


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
    """One normalised token back to source text; `<STR_LIT>` becomes an empty string, `<NUM_LIT>` a 0."""
    m = _LIT.match(tok)
    if not m:
        return tok
    prefix, q1, kind, body, q2 = m.groups()
    if body is None:
        if unresolved is not None:
            unresolved.append(tok)
        body = "0" if kind == "NUM" else ""
    for ch, code in SPECIAL_CHARS.items():
        body = body.replace(code, ch)
    if kind == "CHAR" and not q1:
        q1 = q2 = "'"
    return f"{prefix}{q1 or ''}{body}{q2 or ''}"


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
    if b in ("(", "[") and (_word_char(a[-1]) or a[-1] in ")]}'\"") and a not in _KEYWORDS:
        return False  # call or subscript
    if b == ":":
        return False
    in_brackets = brackets[-1] if brackets else ""
    if a == ":" and in_brackets == "[":
        return False  # slice
    if "=" in (a, b) and in_brackets == "(":
        return False  # keyword argument
    return True


def _format_line(tokens: list[str], brackets: list[str]) -> str:
    """Join one physical line's tokens; `brackets` carries the open brackets across lines."""
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
            out.append(indent * (level + 1) + _format_line(line, brackets))
        else:
            first = line[0]
            level, openers = _place(first, level, openers)
            out.append(indent * level + _format_line(line, brackets))
        if brackets:
            continue
        if line[-1] == ":":
            openers = [o for o in openers if o[0] < level] + [(level, first)]
            level += 1
        elif first in _DEDENT_AFTER and level:
            level -= 1
            openers = [o for o in openers if o[0] <= level]
    return Denormalized("\n".join(out) + ("\n" if out else ""), unresolved)
