"""Complete the current line of real code with any engine: raw code in, the rest of the line out.

Raw-mode models (ours trained on raw text, or a real teacher with its own tokenizer) read the code as it is, framed
as their training documents were (`raw_framing`); the completion is the decoded new text up to its first line
break, and a token may carry code before its break (`):` and the break in one token), which is kept. It also ends
at the end of a document and at any special token (a chat template's, a file marker), so none ever shows.

Normalised (CodeXGLUE) models need the code normalised first, and
the code at a cursor is unfinished, so this is done leniently: an open bracket is fine (the tokens so far
are used), a string still open at the cursor is closed (a normalised model cannot see or write string
contents: the completion starts with the closing quote), and a half-typed name is handed to the model as
text so that it finishes the word. The model's tokens are then turned back into code with PEP 8 spacing
and known literals; a literal it can only write as `<STR_LIT>`/`<NUM_LIT>` comes out as `""`/`0`, and
a note says so. Nothing here raises on odd code: the worst case is an empty completion with a note.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distil_codegpt.config import UserError
from distil_codegpt.data.denormalize import denormalize_token, format_line
from distil_codegpt.data.normalize import (
    BOS,
    EOL,
    load_literals,
    normalize_string,
    normalize_tokens,
    python_tokens,
)
from distil_codegpt.data.tokenizer import raw_framing, tokenizer_meta
from distil_codegpt.engines.base import Engine
from distil_codegpt.engines.load import load_engine
from distil_codegpt.engines.speculative import with_draft
from distil_codegpt.evaluate.completion import StopIds
from distil_codegpt.fim_templates import MARKERS
from distil_codegpt.serve.fim import next_suffix_line, repo_context, suffix_overlap
from distil_codegpt.serve.fim import template_for as fim_template

_STRING_START = re.compile(r"(?i:[rbuft]{0,2})('''|\"\"\"|'|\")")
_TRAILING_NAME = re.compile(r"[^\W\d]\w*$")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of line, end of text, or a stop string) | "length"
    notes: list[str] = field(default_factory=list)


@dataclass
class Job:
    """One completion request, whichever protocol it came by: the code around the cursor and the limits."""

    prefix: str  # the code before the cursor
    suffix: str = ""  # the code after it: cuts a completion that would repeat it
    extra: list[tuple[str, str]] = field(default_factory=list)  # (file name, text) of other files, read first
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    max_lines: int = 1  # raw mode: lines a completion may span (the cursor's line is the first)
    predict_ms: float = 0.0  # after this many ms of generation, end at the next line break (0: no deadline)
    min_indent: int = 0  # a later line indented less than this ends the completion (llama.cpp's n_indent)


def scan_end_state(code: str) -> tuple[str, int, str]:
    """Where the end of `code` is: ("code" | "comment" | "string", start of the open string, its quote)."""
    i, n = 0, len(code)
    state, start, quote = "code", -1, ""
    while i < n:
        c = code[i]
        if state == "code":
            if c == "#":
                state = "comment"
            elif c in "'\"" or c.isalpha() or c == "_":
                # a quote opens a string; letters do only when they are a whole prefix (rb'...), not a name's end
                m = _STRING_START.match(code, i)
                if m:
                    state, start, quote = "string", i, m.group(1)
                    i = m.end()
                    continue
                while i < n and (code[i].isalnum() or code[i] == "_"):  # skip the whole name
                    i += 1
                continue
        elif state == "comment":
            if c == "\n":
                state = "code"
        elif c == "\\":
            i += 2  # an escaped character, the quote included (also in raw strings)
            continue
        elif code.startswith(quote, i):
            state = "code"
            i += len(quote)
            continue
        elif c == "\n" and len(quote) == 1:
            state = "code"  # an unterminated one-line string ends with its line
        i += 1
    return state, start, quote


@dataclass
class _Prompt:
    ids: list[int]
    line: list[str]  # normalised tokens of the current line before the completion (codexglue)
    word: str  # a half-typed name the completion continues
    lead: str  # text the completion starts with (a closing quote)
    notes: list[str]
    space_typed: bool = False  # the code ends with a space: the completion does not start with one
    healed: str = ""  # text cut from the prompt that the new text must start with (token healing)
    allowed: frozenset[int] | None = None  # ids the first new token may take
    truncated: bool = False  # the start of the code (or of the extra context) did not fit the context


@dataclass
class _End:
    """A completion's text so far and what ended it: None while it may grow, else a `stop_type`."""

    text: str = ""
    why: str | None = None
    word: str = ""  # the stop string that ended it


class Completer:
    """Completes raw code with an engine; knows from the tokenizer whether the model was trained normalised.

    `fim` names the fill-in-the-middle template the model was trained with (serve/fim.py); with none, the model
    completes the prefix and the suffix only cuts the answer.
    """

    def __init__(self, engine: Engine, fim: str = "none") -> None:
        self.engine, self.tok = engine, engine.tokenizer
        meta = tokenizer_meta(engine.path) or {}
        self.mode = meta.get("format") or ("codexglue" if EOL in self.tok.get_vocab() else "raw")
        literals = meta.get("literals")
        try:
            self.literals = load_literals(literals or None)
        except ValueError:  # recorded on another machine: the packaged default is the same list unless changed
            self.literals = load_literals(None)
        # every id's text, for token healing: the first new token must agree with a half-typed word
        self.texts = self.tok.batch_decode(
            [[i] for i in range(len(self.tok))], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        self.fim = None if fim == "none" else fim_template(fim, set(self.texts))
        stops = StopIds.of(self.tok)
        ends = set(stops.ends)  # every special token (`end_ids`)
        # raw mode stops at the first line break in the decoded text (`stream`), not at the ids that hold one:
        # such a token may carry code before its break (`):\n`)
        self.stop_ids = ends if self.mode == "raw" else set(stops.eol) | ends

    # ------------------------------------------------------------ prompts

    def _heal(self, text: str, word: str) -> tuple[str, str, frozenset[int] | None]:
        """(prompt text, healed text, allowed first ids): cut a half-typed word, and one blank before it, off the
        prompt so the model can write the word as it learnt it (`Ġpath`, not `Ġpa` + `th`)."""
        if not word or not self.engine.supports_first_allowed:
            return text, "", None
        healed = word
        if text[: -len(word)].endswith(" "):
            healed = " " + word
        allowed = frozenset(
            i for i, t in enumerate(self.texts) if t.startswith(healed) or (len(t) > 1 and healed.startswith(t))
        )
        return (text[: -len(healed)], healed, allowed) if allowed else (text, "", None)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _raw_prompt(self, job: Job, room: int) -> _Prompt:
        """The code as the model saw documents in training (a real teacher: `<|endoftext|>` in front), the other
        files first as documents of their own; the end of the file always fits, the extra context takes what is
        left (its most recent files first)."""
        head = raw_framing(self.tok)[0]
        if self.fim is not None:
            return self._fim_prompt(job, room, head)
        m = _TRAILING_NAME.search(job.prefix) if scan_end_state(job.prefix)[0] == "code" else None
        text, healed, allowed = self._heal(job.prefix, m.group(0) if m else "")
        ids = head + self._encode(text)
        truncated = len(ids) > room
        if truncated:  # the start drops by whole blocks, so that the next prompt still shares it (the KV cache)
            block = max(room // 8, 1)
            drop = -(-(len(ids) - room) // block) * block
            ids = head + ids[len(head) + drop :] if room > len(head) + block else ids[-room:]
        for name, chunk in reversed(job.extra):
            doc = head + self._encode(f"# {name}\n{chunk}\n" if name else f"{chunk}\n")
            if len(doc) + len(ids) > room:
                truncated = True
                break
            ids = doc + ids
        return _Prompt(ids, [], "", "", [], healed=healed, allowed=allowed, truncated=truncated)

    def _fim_prompt(self, job: Job, room: int, head: list[int]) -> _Prompt:
        """The model's own template: the end of the prefix and the start of the suffix (at most a quarter of the
        room) between its markers, which are never cut; other files in front while room is left."""
        t = self.fim
        assert t is not None
        pre_m, suf_m, mid_m = (self._encode(m) if m else [] for m in (t.pre, t.suf, t.mid))
        fixed = len(head) + len(pre_m) + len(suf_m) + len(mid_m)
        pre, suf = self._encode(job.prefix), self._encode(job.suffix)
        truncated = fixed + len(pre) + len(suf) > room
        suf = suf[: max((room - fixed) // 4, 0)] if truncated else suf
        pre = pre[len(pre) - max(room - fixed - len(suf), 0) :] if truncated else pre
        body = suf_m + suf + pre_m + pre + mid_m if t.spm else pre_m + pre + suf_m + suf + mid_m
        context = self._encode(repo_context(t, job.extra)) if job.extra else []
        if len(head) + len(context) + len(body) > room:
            context, truncated = [], True
        return _Prompt(head + context + body, [], "", "", [], truncated=truncated)

    def _prompt(self, job: Job) -> _Prompt | None:
        notes: list[str] = []
        room = max(self.engine.context - job.max_tokens, 1)
        if self.mode == "raw":
            return self._raw_prompt(job, room)
        code = job.prefix
        state, start, quote = scan_end_state(code)
        if state == "comment":
            return None
        body, closed, word, lead = code, "", "", ""
        if state == "string":
            body, closed, lead = code[:start], code[start:] + quote, quote
            notes.append("the cursor is inside a string: a normalised model cannot write its contents; closed it")
        elif m := _TRAILING_NAME.search(code):
            body, word = code[: m.start()], m.group(0)
        tokens = normalize_tokens(python_tokens(body, strict=False), self.literals)
        at_line_start = body.rstrip(" \t").endswith("\n") or not body.strip()
        while tokens and tokens[0] == EOL:
            tokens.pop(0)
        if tokens and tokens[-1] == EOL and not at_line_start:
            tokens.pop()  # the NEWLINE tokenize adds at the end of the text, not one the user typed
        if closed:
            tokens.append(normalize_string(" ".join(closed.split()), self.literals))
        line = tokens[len(tokens) - tokens[::-1].index(EOL) :] if EOL in tokens else list(tokens)
        text, healed, allowed = self._heal(" ".join([BOS, *tokens] + ([word] if word else [])), word)
        ids = self._encode(text)
        space_typed = code.endswith((" ", "\t"))
        return _Prompt(ids[-room:], line, word, lead, notes, space_typed, healed, allowed, len(ids) > room)

    # ------------------------------------------------------------ turning new text back into code

    def _render(self, p: _Prompt, new_text: str, final: bool, notes: list[str] | None) -> str:
        """The completion text for the model's new text so far (raw: as it is, lines are cut by `_lines`)."""
        if p.healed:  # the new text starts with the cut word; without that, the model did not agree with it
            new_text = new_text[len(p.healed) :] if new_text.startswith(p.healed) else ""
        if self.mode == "raw":
            return new_text
        toks = (p.word + new_text).split()
        if not final and toks and not new_text.endswith(" "):
            toks = toks[:-1]  # the last token may still grow
        toks = [t for t in toks if t != EOL]
        unresolved: list[str] = []
        line = [denormalize_token(t) for t in p.line]
        comp = [denormalize_token(t, unresolved) for t in toks]
        if notes is not None and unresolved:
            notes.append(
                f"{len(unresolved)} literal(s) the model can only write as a placeholder"
                f' ({", ".join(sorted(set(unresolved)))}) came out as "" or 0'
            )
        base, full = format_line(line), format_line(line + comp)
        suffix = full[len(base) :] if full.startswith(base) else " " + format_line(comp)
        if p.word and comp:
            suffix = suffix.lstrip(" ")[len(p.word) :] if suffix.lstrip(" ").startswith(p.word) else suffix
        if p.space_typed and not p.lead:
            suffix = suffix.lstrip(" ")
        return p.lead + suffix

    @staticmethod
    def _lines(text: str, job: Job, final: bool, late: bool) -> _End:
        """Raw text cut to the job's lines: at most `max_lines`, only one once `late` (past the deadline) or when
        the cursor's line goes on after it, and never a later line that is indented less than `min_indent` or that
        repeats the next line of the suffix. Trailing blanks wait until more text (or nothing) follows them."""
        parts = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        limit = 1 if job.suffix.split("\n", 1)[0].strip() else job.max_lines
        again = next_suffix_line(job.suffix)
        kept: list[str] = []
        for i, line in enumerate(parts):
            ended = i < len(parts) - 1  # a line break follows it
            if i and line.strip() and len(line) - len(line.lstrip()) < job.min_indent:
                return _End("\n".join(kept), "indent")
            if i and again and (ended or final) and line.strip() == again:
                return _End("\n".join(kept), "suffix")
            if ended or line.strip() or not kept:  # a blank start of a line waits for what follows it
                kept.append(line.rstrip())
            if ended and (len(kept) >= limit or late):
                return _End("\n".join(kept), "eol")
        return _End("\n".join(kept))

    # ------------------------------------------------------------ public

    def stream(self, job: Job, result: dict[str, Any] | None = None) -> Iterator[str]:
        """Text pieces of the completion, as the model produces them; ends at the end of the line(s) or a stop.

        `result`, when given, is filled as the stream runs: finish_reason ("stop" | "length"), stop_type ("eol",
        "eos", "word", "limit", "suffix", "indent"), stopping_word, notes, prompt_tokens, cached_tokens,
        completion_tokens, truncated, prompt_ms and predict_ms (final once the stream is exhausted).
        """
        result = result if result is not None else {}
        result.update(finish_reason="stop", stop_type="eos", stopping_word="", notes=[], completion_tokens=0)
        result.update(prompt_tokens=0, cached_tokens=0, truncated=False, prompt_ms=0.0, predict_ms=0.0)
        p = self._prompt(job)
        if p is None:
            result["notes"].append("the cursor is inside a comment: a normalised model does not write comments")
            return
        result["notes"] += p.notes
        result.update(prompt_tokens=len(p.ids), truncated=p.truncated)
        stops = [s for s in job.stop if s] + list(MARKERS)
        # held back: a tail that may begin a stop string, or the rest of the cursor's line (then a repeat to drop)
        held = [*stops, job.suffix.split("\n", 1)[0].strip()]
        again = next_suffix_line(job.suffix) if self.mode == "raw" else ""
        sent, ids, end = "", [], _End()
        kw: dict[str, Any] = {"temperature": job.temperature, "top_p": job.top_p, "seed": job.seed}
        if p.allowed:
            kw["first_allowed"] = p.allowed
        t0 = time.perf_counter()
        first = None
        for i in self.engine.stream(p.ids, job.max_tokens, self.stop_ids, **kw):
            first = first or time.perf_counter()
            ids.append(i)
            end = self._cut(p, job, stops, ids, first, final=False)
            if end.why is not None:
                break
            tail = _tail_of_a_start(end.text, held)
            if again and (nl := end.text.rfind("\n")) >= 0 and again.startswith(end.text[nl + 1 :].strip()):
                tail = max(tail, len(end.text) - nl)  # a line that may turn out to repeat the suffix's next one
            ready = end.text[: len(end.text) - tail]
            if ready.startswith(sent) and len(ready) > len(sent):
                yield ready[len(sent) :]
                sent = ready
        now = time.perf_counter()
        result.update(prompt_ms=1000 * ((first or now) - t0), predict_ms=1000 * (now - (first or now)))
        result["cached_tokens"] = getattr(self.engine, "cached_tokens", 0)
        limit = end.why is None and len(ids) >= job.max_tokens
        end = self._cut(p, job, stops, ids, first, final=True, notes=result["notes"])
        why = end.why or ("limit" if limit else "eos")
        result.update(stop_type=why, stopping_word=end.word, completion_tokens=len(ids))
        result["finish_reason"] = "length" if why == "limit" else "stop"
        if end.text.startswith(sent) and len(end.text) > len(sent):
            yield end.text[len(sent) :]

    def _cut(
        self,
        p: _Prompt,
        job: Job,
        stops: list[str],
        ids: list[int],
        first: float | None,
        final: bool,
        notes: list[str] | None = None,
    ) -> _End:
        """The completion so far and what ended it, if anything: stop strings, lines, the suffix's overlap."""
        new_text = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        end = _End(self._render(p, new_text, final, notes))
        if (cut := _first_stop(end.text, stops)) is not None:
            end = _End(end.text[:cut], "word", next(s for s in stops if end.text.find(s) == cut))
        if self.mode == "raw":
            late = bool(job.predict_ms) and first is not None and 1000 * (time.perf_counter() - first) > job.predict_ms
            lines = self._lines(end.text, job, final or end.why is not None, late)
            end = lines if lines.why is not None else _End(lines.text, end.why, end.word)
        if final and (k := _partial_marker(end.text)):  # cut off at the token limit inside a template marker
            end = _End(end.text[:-k], end.why, end.word)
        if final or end.why is not None:  # the cursor's line is complete: drop what the code after the cursor holds
            head, sep, tail = end.text.partition("\n")
            if overlap := suffix_overlap(head, job.suffix):
                end = _End(head[: len(head) - overlap] + sep + tail, end.why or "suffix", end.word)
        return end

    def complete(self, prompt: str, max_tokens: int = 64, **kw: Any) -> Completion:
        """The completion of `prompt`, the code before the cursor (Job's fields as keywords)."""
        result: dict[str, Any] = {}
        text = "".join(self.stream(Job(prompt, max_tokens=max_tokens, **kw), result))
        return Completion(text, result["finish_reason"], result["notes"])


def _tail_of_a_start(text: str, strings: list[str], shortest: int = 1) -> int:
    """The length of the longest end of `text` that is a start (`shortest` characters or more) of one of `strings`."""
    return max((k for s in strings for k in range(len(s), shortest - 1, -1) if text.endswith(s[:k])), default=0)


def _partial_marker(text: str) -> int:
    """Length of the start of a template marker (3 characters or more) that `text` ends with, else 0."""
    return _tail_of_a_start(text, [m[:-1] for m in MARKERS], shortest=3)


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


def read_cursor(spec: str, stdin: Any = None) -> str:
    """The code before the cursor: FILE (its end), FILE:LINE (end of that line), FILE:LINE:COL (1-based), or -."""
    if spec == "-":
        return (stdin or sys.stdin).read()
    path, line, col = spec, 0, 0
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        path, line, col = parts[0], int(parts[1]), int(parts[2])
    elif len(parts) >= 2 and parts[-1].isdigit():
        path, line = spec.rsplit(":", 1)[0], int(parts[-1])
    p = Path(path)
    if not p.is_file():
        raise UserError(f"file: {path} not found; pass FILE, FILE:LINE or FILE:LINE:COL, or - for stdin")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not line:
        return text
    lines = text.splitlines(keepends=True)
    if not 1 <= line <= len(lines):
        raise UserError(f"file: line {line} is outside {path} (1..{len(lines)}); pass a line that exists")
    current = lines[line - 1].rstrip("\r\n")
    if col and not 1 <= col <= len(current) + 1:
        raise UserError(f"file: column {col} is outside line {line} (1..{len(current) + 1})")
    return "".join(lines[: line - 1]) + (current[: col - 1] if col else current)


def run_complete(cfg: Any) -> Completion:
    """The `complete` verb: print the completion of the code at the cursor; notes go to stderr."""
    code = read_cursor(cfg.file)
    engine = load_engine(cfg.model, cfg.device, quantize=cfg.quantize, engine=cfg.engine)
    completer = Completer(with_draft(engine, cfg.draft, cfg.device, cfg.draft_tokens, quantize=cfg.quantize))
    result = completer.complete(code, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    print(result.text)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return result
