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
OPERATORS = frozenset(_token.EXACT_TOKEN_TYPES) - {"!"}
_NUMBER = re.compile(tokenize.Number)
# 3.11's tokenize takes identifiers as \w+; 3.12 takes more (and some non-identifiers) as NAME.
_NAME = re.compile(r"\w+")
KEYWORDS = frozenset(__import__("keyword").kwlist)
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


def python_tokens(text: str, strict: bool = True) -> list[tuple[int, str, int]]:
    """(type, string, start offset in text) of each token, with 3.11's view of f-strings on every version.

    A leading byte-order mark is ignored (offsets still count it).
    strict: raise NormalizeError where any supported Python version would fail to tokenize the text.
    Lenient (strict=False, for code being typed): error tokens are dropped, tabs are not checked, and a
    tokenize error (an open bracket or string at the end) ends the list with the tokens read so far.
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
            if not strict:
                if tok.type != tokenize.ERRORTOKEN:
                    out.append((tok.type, tok.string, bom + starts[tok.start[0] - 1] + tok.start[1]))
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
        if not strict:
            return out
        raise NormalizeError(f"{type(e).__name__}: {e}") from None
    if depth and strict:
        raise NormalizeError("unterminated f-string")
    return out


def _check_token(tok: tokenize.TokenInfo, prev: tokenize.TokenInfo | None) -> None:
    if tok.type == tokenize.ERRORTOKEN and tok.string.strip():
        raise NormalizeError(f"error token {tok.string!r} at line {tok.start[0]}")
    if tok.type == tokenize.OP and tok.string not in OPERATORS:
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
        and (tok.type == tokenize.NUMBER or (tok.type == tokenize.NAME and tok.string not in KEYWORDS))
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
    out = normalize_tokens(python_tokens(text), literals)
    if out and out[0] == EOL:
        out = out[1:]
    if out and out[-1] == EOL:
        out = out[:-1]
    if not out:
        raise NoCodeError("no code (empty, or only comments)")
    return [BOS, *out, EOS]


def normalize_tokens(tokens: Iterable[tuple[int, str, int]], literals: Literals) -> list[str]:
    """Python tokens -> normalised tokens, `<EOL>` runs collapsed (but not stripped at the ends)."""
    out: list[str] = []
    prev_eol = False
    for kind, s, _ in tokens:
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
    return out
