"""CodeXGLUE line-completion metrics (EM, ES), computed as the official evaluator computes them.

The reference is CodeXGLUE's `Code-Code/CodeCompletion-line/evaluator/evaluator.py`. Written from knowledge of that
script (it cannot be fetched here); these are the assumptions, each mirrored below:

- Predictions are read with `readlines()` and `.strip()`ed; answers are the `gt` fields of test.json, unstripped.
- Both pass through `post_process`: `<NUM_LIT>` -> `0`, `<STR_LIT>` -> ``, `<CHAR_LIT>` -> `` (plain replaces),
  then every `<(STR|NUM|CHAR)_LIT:(.*?)>` found (non-greedy, re.S) is replaced, one by one, by its value.
- ES: the mean over pairs of fuzzywuzzy's `fuzz.ratio(pred, gt)`. fuzzywuzzy returns an int per pair:
  equal strings -> 100, one empty string -> 0, else `int(round(100 * ratio))` (Python's round: halves to even),
  where `ratio` is python-Levenshtein's `(len1 + len2 - indel_distance) / (len1 + len2)` when that package is
  installed (the setup this project assumes; without it fuzzywuzzy falls back to difflib, whose
  Ratcliff-Obershelp matching can score a little lower). rapidfuzz computes the same indel distance, but its
  `fuzz.ratio` returns the unrounded float, so the per-pair rounding is redone here: our ES equals the official
  script's, not a rounding-free variant that would differ by up to ~0.5 points on small sets.
- EM: percent of pairs whose whitespace-split token lists are equal (`pred.split() == gt.split()`).
- The script logs both rounded to 2 decimals; `line_metrics` keeps full precision and leaves rounding to printing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from rapidfuzz.distance import Indel

_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def post_process(code: str) -> str:
    """Literal placeholders to the text the official evaluator scores (a replace loop, exactly as it has it)."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in _LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` (python-Levenshtein backend): an int in 0..100, rounded per pair."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    total = len(a) + len(b)
    return int(round(100 * ((total - Indel.distance(a, b)) / total)))


def pair_scores(preds: Sequence[str], gts: Sequence[str]) -> list[tuple[int, bool]]:
    """(ES, exact match) of each aligned pair, as the official evaluator scores it before averaging.

    `preds` are raw completions (one per line of predictions.txt), `gts` the test file's `gt` fields.
    """
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} answers; they must pair up one to one")
    scores = []
    for pred, gt in zip(preds, gts):
        p, g = post_process(pred.strip()), post_process(gt)
        scores.append((fuzz_ratio(p, g), p.split() == g.split()))
    return scores


def line_metrics(preds: Sequence[str], gts: Sequence[str]) -> dict[str, float | int]:
    """{"exact_match", "edit_sim", "n"}: EM and ES in percent (0-100, full precision) over aligned pairs."""
    scores = pair_scores(preds, gts)
    if not scores:
        return {"exact_match": 0.0, "edit_sim": 0.0, "n": 0}
    n = len(scores)
    return {"exact_match": sum(em for _, em in scores) / n * 100, "edit_sim": sum(es for es, _ in scores) / n, "n": n}
