"""The fill-in-the-middle templates code models are trained with, by name: the markers around prefix, suffix and
middle (and, where the family has them, the pad, repository and file markers). One table for every room that needs
it: the settings check `--fim NAME` against it, the server builds and takes apart prompts with it (serve/fim.py),
and the GGUF export writes a model's FIM token ids and its Ollama template from it (model/gguf_export.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """A FIM layout: markers around the prefix and suffix, in the order the model reads them."""

    pre: str
    suf: str
    mid: str
    spm: bool = False  # suffix first (Codestral, CodeGeeX): SUF S PRE P [MID]
    file_sep: str = ""  # the marker before each other file of repository-level context
    repo: str = ""  # the marker before the repository name
    pad: str = ""  # the padding marker of the family's FIM training

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(m for m in (self.pre, self.suf, self.mid, self.file_sep, self.repo) if m.strip())


TEMPLATES = {
    "starcoder": Template(
        "<fim_prefix>", "<fim_suffix>", "<fim_middle>", file_sep="<file_sep>", repo="<repo_name>", pad="<fim_pad>"
    ),
    "qwen": Template(
        "<|fim_prefix|>",
        "<|fim_suffix|>",
        "<|fim_middle|>",
        file_sep="<|file_sep|>",
        repo="<|repo_name|>",
        pad="<|fim_pad|>",
    ),
    "codellama": Template("<PRE> ", " <SUF>", " <MID>"),
    "deepseek": Template("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    "codestral": Template("[PREFIX]", "[SUFFIX]", "", spm=True),
    "codegeex": Template("<|code_prefix|>", "<|code_suffix|>", "<|code_middle|>", spm=True),
}
# text that is never code: a completion is cut where the model writes one (as text, not as a special id)
MARKERS = tuple(
    dict.fromkeys(
        m.strip()
        for t in TEMPLATES.values()
        for m in (*t.markers, "<|endoftext|>", "<filename>", "<reponame>", "<gh_stars>", "<|fim_pad|>", "<EOT>")
        if m.strip().startswith("<")
    )
)
