"""Fill-in-the-middle prompts: split whatever template an editor client built back into prefix, suffix and
context, build a model's own template when it was trained with one, and cut a completion where it would repeat
the code after the cursor.

Editor clients (Continue above all) wrap the code around the cursor in the template they guess from the model's
name: StarCoder's `<fim_prefix>P<fim_suffix>S<fim_middle>` for an unknown name, Qwen-coder's `<|fim_...|>`,
CodeLlama's `<PRE> P <SUF>S <MID>`, DeepSeek's `<｜fim▁begin｜>P<｜fim▁hole｜>S<｜fim▁end｜>`, Codestral's
`[SUFFIX]S[PREFIX]P`, CodeGeeX's `<|code_suffix|>S<|code_prefix|>P<|code_middle|>`, and, for names with "gpt" in
them, a chat instruction around `P{{FILL_HERE}}S` or `P[BLANK]S`. A model that never saw those markers would read
them as code, so the server takes the template apart first; a model trained with one (`--fim NAME`) gets its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from distil_codegpt.config import ConfigError
from distil_codegpt.fim_templates import TEMPLATES, Template

_HOLE = re.compile(r"<QUERY>\n(.*)\{\{FILL_HERE\}\}(.*)\n</QUERY>\nTASK: Fill the \{\{FILL_HERE\}\} hole", re.S)
_BLANK = re.compile(r"^```\n(.*)\[BLANK\](.*)\n```\n\nFill in the blank to complete the code block", re.S)
_CODEGEEX_HEADER = re.compile(r"\n*###PATH:[^\n]*\n###LANGUAGE:[^\n]*\n###MODE:[^\n]*\n$")
_CODESTRAL_FILE = re.compile(r"(?m)^\+\+\+\+\+ (.*)\n")


@dataclass
class Parts:
    """The code around the cursor, as the client meant it."""

    prefix: str
    suffix: str = ""
    extra: list[tuple[str, str]] = field(default_factory=list)  # (file name, text) of other files
    template: str = ""  # the template the prompt was built with ("" for plain code)


def split_prompt(prompt: str) -> Parts:
    """Prefix, suffix and context of a prompt in any known template; a plain prompt is all prefix."""
    last_query = prompt.rfind("<QUERY>\n")  # the hole filler shows examples first; the real query is the last
    if (m := _HOLE.match(prompt, max(last_query, 0))) or (m := _BLANK.search(prompt)):
        return Parts(m.group(1), m.group(2), template="instruction")
    for name, t in TEMPLATES.items():
        if t.spm:
            if t.suf in prompt and t.pre in prompt and prompt.index(t.suf) < prompt.rindex(t.pre):
                head, rest = prompt.split(t.suf, 1)
                suffix, prefix = rest.rsplit(t.pre, 1)
                prefix = prefix.split(t.mid, 1)[0] if t.mid else prefix
                return _with_context(Parts(prefix, suffix, template=name), head, t)
        elif t.pre in prompt and t.suf in prompt.split(t.pre, 1)[1]:
            head, rest = prompt.split(t.pre, 1)
            prefix, rest = rest.split(t.suf, 1)
            suffix = rest.split(t.mid, 1)[0] if t.mid.strip() and t.mid in rest else rest.removesuffix(t.mid.strip())
            return _with_context(Parts(prefix, suffix, template=name), head, t)
    return Parts(prompt)


def _with_context(parts: Parts, head: str, t: Template) -> Parts:
    """Other files the client put before the markers become extra context; repository names and chat text go."""
    if parts.template == "codegeex":  # `###PATH:f\n###LANGUAGE:..\n###MODE:BLOCK\n` headers, references before
        refs = _CODEGEEX_HEADER.sub("", head).split("###REFERENCE:\n")[1:]
        parts.extra = [_path_and_text(r) for r in refs]
        return parts
    if parts.template == "codestral" and _CODESTRAL_FILE.search(parts.prefix):  # `+++++ path\n` blocks
        chunks = _CODESTRAL_FILE.split(parts.prefix)  # [before, path1, text1, path2, text2, ...]
        files = [(chunks[i], chunks[i + 1]) for i in range(1, len(chunks) - 1, 2)]
        parts.prefix = files[-1][1]
        parts.extra = [(name, text.rstrip("\n")) for name, text in files[:-1]]
        return parts
    if t.file_sep and t.file_sep in head:
        chunks = head.split(t.file_sep)[1:]  # what precedes the first separator is the repository name
        files = [_first_line_name(c) for c in chunks if c.strip()]
        parts.extra = [(name, text) for name, text in files if text.strip()]  # the last names the current file
    return parts


def _path_and_text(ref: str) -> tuple[str, str]:
    if ref.startswith("###PATH:"):
        name, _, text = ref[len("###PATH:") :].partition("\n")
        return name, text.rstrip("\n")
    return "", ref.rstrip("\n")


def _first_line_name(chunk: str) -> tuple[str, str]:
    """StarCoder2/Qwen repository context: `<file_sep>path\\ncode`; a chunk whose first line has a blank or no
    dot is code with no name (Continue's snippets)."""
    first, sep, rest = chunk.partition("\n")
    if sep and first and " " not in first and "." in first:
        return first, rest
    return "", chunk


def repo_context(t: Template, extra: list[tuple[str, str]]) -> str:
    """Other files as a model trained with template `t` reads them before the cursor's file (repository-level
    context, as llama.cpp's `/infill` builds it); "" for a template without a file separator."""
    if not t.file_sep:
        return ""
    return "".join(f"{t.file_sep}{name}\n{text}\n" if name else f"{t.file_sep}{text}\n" for name, text in extra)


def build_prompt(t: Template, prefix: str, suffix: str, extra: list[tuple[str, str]]) -> str:
    """The text a model trained with template `t` reads for this cursor."""
    context = repo_context(t, extra)
    if t.spm:
        return f"{context}{t.suf}{suffix}{t.pre}{prefix}{t.mid}"
    return f"{context}{t.pre}{prefix}{t.suf}{suffix}{t.mid}"


_CLOSERS = set(")]}'\"`,;: ")


def suffix_overlap(line: str, suffix: str) -> int:
    """How many characters at the end of a completed `line` repeat what the code after the cursor starts with.

    The whole rest of the cursor's line (stripped) is always an overlap; a shorter start of it counts only while
    it is closing brackets, quotes and punctuation (so `f(a` + `)` after the cursor cuts a written `)`, but a
    written word is never cut because the suffix happens to start with its last letter)."""
    rest = suffix.split("\n", 1)[0].strip()
    body = line.rstrip()
    if not rest or not body:
        return 0
    if body.endswith(rest):
        return len(line) - len(body) + len(rest)
    for k in range(min(len(rest), len(body)) - 1, 0, -1):
        if body.endswith(rest[:k]) and set(rest[:k]) <= _CLOSERS:
            return len(line) - len(body) + k
    return 0


def next_suffix_line(suffix: str) -> str:
    """The first non-blank line after the cursor's line, stripped: a completion stops before writing it again."""
    for line in suffix.split("\n")[1:]:
        if line.strip():
            return line.strip()
    return ""


def template_for(name: str, vocab_has: set[str]) -> Template:
    """The model's own template by name, refused when the tokenizer lacks its markers as single tokens."""
    if name not in TEMPLATES:
        raise ConfigError(f"fim: unknown template {name!r}; use one of: none, {', '.join(TEMPLATES)}")
    t = TEMPLATES[name]
    missing = [m for m in (t.pre, t.suf, t.mid) if m.strip() and m.strip() not in vocab_has]
    if missing:
        raise ConfigError(
            f"fim: the tokenizer has no {', '.join(missing)} token, so the model was not trained with the {name!r}"
            " template; pass --fim none (prefix completion, the suffix cuts the answer)"
        )
    return t
