"""Byte-level BPE tokenizer for a corpus, saved as a plain Hugging Face fast tokenizer directory.

Layout of the vocabulary (len(tokenizer) == vocab_size exactly):
  0 `<s>` (bos), 1 `</s>` (eos), 2 `<pad>`, 3 `<|UNKNOWN|>` (unk): HF special tokens;
  4..259 the 256 byte symbols, then the BPE merges;
  last, codexglue corpora only: `<EOL>`, `<STR_LIT>`, `<NUM_LIT>`, `<CHAR_LIT>` and every `<X_LIT:value>` token of the
  literal list, as added tokens that are not special (decode(skip_special_tokens=True) keeps them), each twice:
  bare (`<EOL>`) and with the space in front of it (` <EOL>`).

Every special and added token is one id and decodes to exactly its text, with no space stripped or inserted, so
decode(encode(doc)) == doc for every document. In normalised text an added token almost always follows a space
(`x <EOL> y`); without the spaced twin that space would be a token of its own (about 10% of all tokens), because
a bare added token cannot absorb it and still decode exactly. Matching is leftmost-longest, so ` <EOL>` wins
wherever the space is there; `<EOL>` stays a single id for text without the space (`'<STR_LIT:a>'`).

Raw corpora (source text) get only the four special tokens, and the tokenizer is saved with
split_special_tokens=True: a `</s>` written in source code is bytes, not end-of-document. Document boundaries
are added as ids by `encode_documents`, never parsed from text. Neither format adds ids in `encode` itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from distil_codegpt.artifacts import HubConfigError, check_config, looks_local, read_json
from distil_codegpt.config import ConfigError, TokenizerConfig, UserError
from distil_codegpt.data.formats import corpus_format, read_documents
from distil_codegpt.data.normalize import (
    BOS,
    CHAR_LIT,
    EOL,
    EOS,
    NUM_LIT,
    STR_LIT,
    default_literals_path,
    load_literals,
)
from distil_codegpt.runinfo import staged_files

PAD, UNK = "<pad>", "<|UNKNOWN|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK]  # ids 0..3, in this order
MARKER_TOKENS = [EOL, STR_LIT, NUM_LIT, CHAR_LIT]
META_FILE = "tokenizer_meta.json"
FAST_CLASS = "PreTrainedTokenizerFast"
# The files that decide how text becomes ids; the fingerprint covers those present.
_FINGERPRINT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    """Train on the train split, save to cfg.out and return (and write to tokenizer_meta.json) the summary."""
    start = time.perf_counter()
    data, out = Path(cfg.data), Path(cfg.out)
    fmt = corpus_format(data)
    train_file = data / "train.txt"
    if not train_file.is_file():
        raise UserError(f"{train_file}: missing; build the corpus with `distil-codegpt corpus --out {data}`")
    n_lines, corpus_fp = file_stats(train_file)
    literals_path = _literals_path(cfg, data) if fmt == "codexglue" else None
    bare = _added_tokens(literals_path) if fmt == "codexglue" else []
    added = bare + [" " + t for t in bare]
    bpe_size = cfg.vocab_size - len(added)
    if bpe_size < len(SPECIAL_TOKENS) + 256:
        need = len(SPECIAL_TOKENS) + 256 + len(added)
        raise ConfigError(
            f"vocab_size: {cfg.vocab_size} cannot hold {len(SPECIAL_TOKENS)} special + {len(added)} added"
            f" (<EOL>, literal, each bare and spaced) tokens + 256 bytes; use at least {need}"
        )

    n_docs = 0

    def documents() -> Iterator[str]:
        nonlocal n_docs
        for doc in read_documents(data, "train"):
            n_docs += 1
            yield doc

    tok = Tokenizer(models.BPE(unk_token=UNK))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # While training, cut the special and literal tokens out of the text: encoding splits the text there too,
    # so BPE learns merges for the text between them and wastes no vocabulary on pieces such as `<EOL`.
    cut = "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS + added, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(cut), "removed"), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),  # without a terminal it only prints blank lines to stdout
    )
    tok.train_from_iterator(documents(), trainer=trainer, length=n_lines)
    tok.pre_tokenizer = byte_level
    if n_docs == 0:
        raise UserError(f"{train_file}: no documents; rebuild the corpus from a source tree that has .py files")
    if tok.get_vocab_size() < bpe_size:
        raise UserError(
            f"vocab_size: {train_file} yields only {tok.get_vocab_size() + len(added)} tokens with"
            f" min_frequency {cfg.min_frequency}; lower --vocab_size to that or use a larger corpus"
        )
    tok.add_tokens([AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False) for t in added])
    if tok.get_vocab_size() != cfg.vocab_size:
        raise UserError(f"vocab_size: built {tok.get_vocab_size()} tokens, not {cfg.vocab_size}; report this bug")

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        split_special_tokens=fmt == "raw",
    )
    with staged_files(out) as stage:  # each file lands whole, or the previous one stays
        hf.save_pretrained(stage)
        # transformers 5 records its class as TokenizersBackend, a name transformers 4 cannot load; both resolve this.
        config_path = stage / "tokenizer_config.json"
        config = {**json.loads(config_path.read_text()), "tokenizer_class": FAST_CLASS}
        config_path.write_text(json.dumps(config, indent=2))
        summary = {
            "vocab_size": len(hf),
            "n_docs": n_docs,
            "seconds": round(time.perf_counter() - start, 3),
            "format": fmt,
            "literals": str(literals_path) if literals_path else None,
            "n_added_tokens": len(added),
            "min_frequency": cfg.min_frequency,
            "train_corpus_fingerprint": corpus_fp,
            "fingerprint": tokenizer_fingerprint(stage),
        }
        (stage / META_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer saved in a directory (ours or any HF one), or one clear error line."""
    p = Path(path)
    fix = f"train one with `distil-codegpt tokenizer --data DATA --out {p}`"
    if not p.is_dir():
        raise UserError(f"tokenizer: {p} is not a directory; {fix}")
    if (p / "config.json").is_file() and not any((p / name).is_file() for name in TOKENIZER_FILES):
        # a model directory alone: transformers would build an empty tokenizer from config.json, every id wrong
        raise UserError(
            f"model: {p} has no tokenizer (tokenizer.json); save the tokenizer with the model or copy the"
            " tokenizer files it was trained with into that directory"
        )
    try:
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except HubConfigError:  # a model directory whose config.json (read to pick the class) does not validate
        check_config(p, role="model")
        raise
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"tokenizer: {p} holds no loadable tokenizer ({type(e).__name__}); {fix}") from e
    if not tok.is_fast:
        raise UserError(f"tokenizer: {p} holds a slow tokenizer; save a fast one (tokenizer.json) or {fix}")
    return tok


# What a model directory carries of its tokenizer, for every family (sentencepiece's tokenizer.model too)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_tokenizer(src: str | Path, out: str | Path) -> list[str]:
    """Put a model's tokenizer files next to another model (a student, an artifact) so that directory is
    self-contained; a hub id has its tokenizer saved instead (none: nothing copied). Returns the file names."""
    if looks_local(str(src)):
        files = [name for name in TOKENIZER_FILES if (Path(src).expanduser() / name).is_file()]
        for name in files:
            shutil.copyfile(Path(src).expanduser() / name, Path(out) / name)
        return files
    try:
        AutoTokenizer.from_pretrained(src).save_pretrained(out)
    except (OSError, ValueError):  # a hub model without tokenizer files
        return []
    return [name for name in TOKENIZER_FILES if (Path(out) / name).is_file()]


def tokenizer_fingerprint(path: str | Path) -> str:
    """First 12 hex of a sha256 over the tokenizer files present: equal fingerprints encode text identically."""
    p = Path(path)
    h = hashlib.sha256()
    found = False
    for name in _FINGERPRINT_FILES:
        f = p / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
            found = True
    if not found:
        raise UserError(f"tokenizer: {p} has no tokenizer.json; train one with `distil-codegpt tokenizer --out {p}`")
    return h.hexdigest()[:12]


def tokenizer_meta(path: str | Path) -> dict | None:
    """What `train_tokenizer` recorded (format, literal list...), or None for a tokenizer made elsewhere."""
    meta = Path(path) / META_FILE
    return (
        read_json(meta, fix=f"train the tokenizer again with `distil-codegpt tokenizer --out {path}`")
        if meta.is_file()
        else None
    )


DOC_SEPARATOR = "<|endoftext|>"  # GPT-2's, and what SmolLM, StarCoder and Qwen2 put between pretraining documents


def raw_framing(tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """(ids before, ids after) a raw document, as the model saw documents in training.

    - Our tokenizers (and CodeXGLUE-style ones): `<s>` ... `</s>`.
    - A tokenizer that adds a bos itself (Llama 2/3 style): bos ... eos.
    - Otherwise, a real model's tokenizer whose pretraining joined documents with `<|endoftext|>` (GPT-2, SmolLM2,
      StarCoder, Qwen2): that separator in front and nothing after, so that a file is read after the separator as in
      pretraining, and chat tokens such as SmolLM2-Instruct's bos `<|im_start|>` never reach code.
    - Nothing known: the eos in front, if any.
    """
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if tok.bos_token == BOS and tok.eos_token == EOS:
        return [bos], [eos]
    if bos is not None and tok("x", add_special_tokens=True)["input_ids"][:1] == [bos]:
        return [bos], [eos] if eos is not None else []
    sep = separator_id(tok)
    if sep is not None:
        return [sep], []
    return ([eos] if eos is not None else []), []


def separator_id(tok: PreTrainedTokenizerBase) -> int | None:
    """The id of `<|endoftext|>`, or None; a lookup in the Rust vocabulary (get_vocab() builds a dict of all)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.token_to_id(DOC_SEPARATOR)
    return tok.get_vocab().get(DOC_SEPARATOR)


def end_ids(tok: PreTrainedTokenizerBase) -> set[int]:
    """Ids a completion stops before: every special token (end of document, the document separator, a chat
    template's turn markers such as SmolLM2's `<|im_start|>`, repository and file markers). None of them is code."""
    ids = {i for i in (tok.eos_token_id,) if i is not None} | set(tok.all_special_ids)
    ids |= {i for i, t in tok.added_tokens_decoder.items() if t.special}
    if (sep := separator_id(tok)) is not None:
        ids.add(sep)
    return ids | set(raw_framing(tok)[1])


def encode_documents(tok: PreTrainedTokenizerFast, docs: list[str], fmt: str) -> list[list[int]]:
    """Ids of whole documents encoded in parallel by the Rust backend, each framed as in training.

    A codexglue document carries `<s>`/`</s>` in its text (added only where missing, as CodeXGLUE's loader does);
    a raw document is source text and gets `raw_framing`'s ids around it.
    """
    bos, eos = tok.bos_token_id, tok.eos_token_id
    encodings = tok.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False)
    if fmt == "raw":
        before, after = raw_framing(tok)
        return [[*before, *e.ids, *after] for e in encodings]
    out = []
    for e in encodings:
        ids = e.ids
        if not ids or ids[0] != bos:
            ids.insert(0, bos)
        if ids[-1] != eos:
            ids.append(eos)
        out.append(ids)
    return out


def file_stats(path: str | Path) -> tuple[int, str]:
    """(number of lines, first 16 hex of the content's sha256) in one pass: progress totals and change detection."""
    h = hashlib.sha256()
    lines = 0
    last = b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n"), h.hexdigest()[:16]


# ---------------------------------------------------------------- helpers


def _literals_path(cfg: TokenizerConfig, data: Path) -> Path:
    """The literal list: the flag, else the one the corpus was normalised with, else the packaged default."""
    recorded = json.loads((data / "corpus.json").read_text())["config"].get("literals") or ""
    path = cfg.literals or recorded
    return Path(path) if path else default_literals_path()


def _added_tokens(literals_path: Path) -> list[str]:
    try:
        literal_tokens = load_literals(literals_path).tokens()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return list(dict.fromkeys(MARKER_TOKENS + literal_tokens))
