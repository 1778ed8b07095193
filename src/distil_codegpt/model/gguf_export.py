"""Write a model as one GGUF file, as llama.cpp's own converter (convert_hf_to_gguf.py) would, so that llama.cpp
(llama-server, llama.vscode), Ollama and LM Studio run a student with no code of ours.

What the converter does and this module repeats:
- metadata under llama.cpp's keys: `{arch}.block_count`, `context_length`, `embedding_length`, `feed_forward_length`,
  head counts, `rope.freq_base`, `rope.dimension_count`, `attention.layer_norm_rms_epsilon`, `key_length` /
  `value_length` when a (cut) student keeps its teacher's head size, `general.file_type`;
- tensors under llama.cpp's names (gguf-py's tensor map: token_embd, blk.N.attn_q ... ffn_down, output_norm,
  output); for the llama architecture (Llama, SmolLM2, Mistral) the rows of Q and K are permuted from the rotary
  halves transformers uses to the interleaved pairs llama.cpp uses (not for qwen2, whose rope llama.cpp runs in
  the halves layout); a tied head writes no `output` tensor;
- 1-D tensors and norms stay f32; a matrix whose rows are not whole quantization blocks falls back to f16;
- the byte-level BPE vocabulary (`tokenizer.ggml.model` "gpt2"): tokens, types (control for special tokens,
  user-defined for other added tokens, unused for padding rows), merges, special ids.

What it decides itself:
- `tokenizer.ggml.pre` (how llama.cpp splits text before BPE) is chosen by behaviour: the tokenizer's own pre-
  tokenizer must cut a set of probe strings (code, digits, unicode, runs of spaces and tabs, contractions) into the
  same pieces as llama.cpp's rule of that name; a tokenizer that matches none is refused, since a file that
  tokenizes differently would run, just badly.
- `add_bos_token` and the bos id follow how the project framed raw text in training (`raw_framing`): a student of
  SmolLM2 read `<|endoftext|>` before each file, so that is the id llama.cpp puts first.
- q4_0 keeps the output head (token_embd when tied) in q8_0: llama-quantize keeps it at higher precision too
  (q6_k there, which gguf-py cannot write).
- FIM token ids (llama-server's /infill, llama.vscode) where the vocabulary holds a template's markers as tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import Regex, Tokenizer, pre_tokenizers
from transformers import PreTrainedModel

from distil_codegpt.config import UserError
from distil_codegpt.data.tokenizer import end_ids, raw_framing
from distil_codegpt.fim_templates import TEMPLATES, Template
from distil_codegpt.model import families
from distil_codegpt.runinfo import atomic_open

QT = gguf.GGMLQuantizationType
# --quant -> (general.file_type, the type of the matrices)
QUANTS: dict[str, tuple[gguf.LlamaFileType, QT]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, QT.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, QT.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, QT.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_0),
}
# our family -> llama.cpp architecture (llama.cpp runs Mistral as llama, as its converter writes it)
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = _QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# llama.cpp's pre-tokenizer names, each as the `tokenizers` pre-tokenizer that splits text the same way
PRE_TOKENIZERS: dict[str, Any] = {
    "gpt-2": _GPT2_SPLIT,  # GPT-2, CodeGPT and the tokenizers `distil-codegpt tokenizer` trains
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT]),  # = starcoder
    "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2), "isolated"), _BYTES]),
    "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3), "isolated"), _BYTES]),
}
PROBES = (
    "def f(x, y=10):\n\treturn x ** 2 + 3.14159 * y  # 1234567 \n",
    "    if a_b != 'DON\\'T' and b's:\n        print(\"héllo wörld — ünïcode ✓ 日本語 😀\")\r\n",
    "\n\n\t\t  x = [1,22,333,4444]\n   \n\t",
    "I'm we'll they've it's YOU'RE 2nd 3rd 10x\u00a0nbsp   (abc) ١٢٣ ² ",
)


# the templates llama.cpp can read from a vocabulary's FIM ids: those that put the prefix first
FIM = {name: t for name, t in TEMPLATES.items() if not t.spm}
FIM_ROLES = (("pre", "pre"), ("suf", "suf"), ("mid", "mid"), ("pad", "pad"), ("rep", "repo"), ("sep", "file_sep"))


def _refuse(model: str, why: str, fix: str) -> UserError:
    return UserError(f"model: {model} {why}; {fix}")


def _pieces(pre: Any, text: str) -> list[str]:
    return [piece for piece, _ in pre.pre_tokenize_str(text)]


def pick_pre(backend: Tokenizer, model: str = "the model") -> str:
    """llama.cpp's name for how `backend` splits text, found by cutting the probe strings both ways."""
    spec = json.loads(backend.to_str())
    bpe, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if bpe.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or bpe.get("byte_fallback"):
        raise _refuse(model, "has no byte-level BPE tokenizer", "GGUF export supports byte-level BPE vocabularies only")
    if backend.normalizer is not None and any(backend.normalizer.normalize_str(p) != p for p in PROBES):
        raise _refuse(model, "has a tokenizer that normalizes text", "llama.cpp would read the text unnormalized")
    if backend.pre_tokenizer is not None:
        ours = [_pieces(backend.pre_tokenizer, p) for p in PROBES]
        for name, pre in PRE_TOKENIZERS.items():
            if bool(bpe.get("ignore_merges")) == (name == "llama-bpe") and ours == [_pieces(pre, p) for p in PROBES]:
                return name
    raise _refuse(
        model,
        "has a pre-tokenizer that matches none llama.cpp knows here",
        f"supported: {', '.join(PRE_TOKENIZERS)} (the file would tokenize differently)",
    )


def _fim(vocab: dict[str, int]) -> tuple[str, Template] | None:
    for name, t in FIM.items():
        if all(m.strip() in vocab for m in (t.pre, t.suf, t.mid)):
            return name, t
    return None


def _vocabulary(tok: Any, rows: int, model: str) -> tuple[list[str], list[int], list[str]]:
    """Tokens, their llama.cpp types and the merges, for an embedding of `rows` rows."""
    backend = tok.backend_tokenizer
    if len(tok) > rows:
        raise _refuse(model, f"has {rows:,} embedding rows for {len(tok):,} tokens", "save it with its own tokenizer")
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        token = backend.id_to_token(i)
        if token is None:  # rows past the tokenizer: the converter's padding names
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        types.append(
            gguf.TokenType.NORMAL
            if i not in added
            else gguf.TokenType.CONTROL
            if added[i].special
            else gguf.TokenType.USER_DEFINED
        )
    merges = json.loads(backend.to_str())["model"]["merges"]
    return tokens, types, [m if isinstance(m, str) else " ".join(m) for m in merges]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotary halves -> llama.cpp's interleaved pairs, per head, on the rows of Q or K (or a bias)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(name: str, data: np.ndarray, want: QT, head: str) -> QT:
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return QT.F32
    if want == QT.Q4_0 and name == head:
        return QT.Q8_0
    return want


def _check_shape(model: PreTrainedModel, name: str) -> tuple[str, int]:
    """The llama.cpp architecture and the context it may use; one line for what llama.cpp would run differently."""
    fam, c = families.family(model).name, model.config
    if fam not in ARCHS:
        raise _refuse(
            name, f"is a {fam} model", f"GGUF export supports {', '.join(ARCHS)}; use `export --format ctranslate2`"
        )
    rope = getattr(c, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise _refuse(name, f"uses {rope['rope_type']!r} rope scaling", "GGUF export writes plain rope only")
    if getattr(c, "hidden_act", "silu") != "silu" or getattr(c, "mlp_bias", False):
        raise _refuse(name, "has an MLP llama.cpp's llama/qwen2 do not run", "export it with --format ctranslate2")
    context = families.context(model)
    window = getattr(c, "sliding_window", None) if fam == "mistral" or getattr(c, "use_sliding_window", 0) else None
    # within its window sliding attention is full attention, which is what llama.cpp runs for these architectures
    return ARCHS[fam], min(context, window) if window else context


def write_gguf(model: PreTrainedModel, tok: Any, out: str | Path, quant: str, name: str) -> dict[str, Any]:
    """Write `model` with its tokenizer to `out` (atomically: a temporary name in the same folder, then a rename)."""
    out = Path(out)
    arch, context = _check_shape(model, name)
    file_type, want = QUANTS[quant]
    c = model.config
    heads, kv_heads, head_dim, width = (
        families.n_heads(model),
        families.n_kv_heads(model),
        families.head_dim(model),
        families.width(model),
    )
    pre = pick_pre(tok.backend_tokenizer, name)
    state = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    emb = state[families.embedding_key(model)]
    tokens, types, merges = _vocabulary(tok, emb.shape[0], name)
    tied = families.tied_head(model)

    w = gguf.GGUFWriter(None, arch)
    w.add_name(Path(name).name or name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(emb.shape[0])
    w.add_block_count(families.depth(model))
    w.add_context_length(context)
    w.add_embedding_length(width)
    w.add_feed_forward_length(families.ffn_width(model))
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    if head_dim * heads != width:  # a student whose hidden size was cut under the teacher's head size
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    before, _ = raw_framing(tok)
    bos = before[0] if before else tok.bos_token_id
    for key, value in (("bos", bos), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id), ("pad", tok.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(bool(before))
    w.add_add_eos_token(False)
    vocab = tok.get_vocab()
    fim = _fim(vocab)
    if fim:
        for role, attr in (
            ("pre", "pre"),
            ("suf", "suf"),
            ("mid", "mid"),
            ("pad", "pad"),
            ("rep", "repo"),
            ("sep", "file_sep"),
        ):
            marker = getattr(fim[1], attr).strip()
            if marker in vocab:
                w.add_uint32(f"tokenizer.ggml.fim_{role}_token_id", vocab[marker])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], families.depth(model))
    head_name = "token_embd.weight" if tied else "output.weight"
    written: Counter[str] = Counter()
    for key, data in state.items():
        if tied and key == families.head_key(model):
            continue  # llama.cpp reads a missing `output` as tied to token_embd
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise _refuse(
                name, f"has a tensor llama.cpp has no name for ({key})", "export it with --format ctranslate2"
            )
        if arch == "llama" and ".self_attn.q_proj." in key:
            data = _permute(data, heads)
        elif arch == "llama" and ".self_attn.k_proj." in key:
            data = _permute(data, kv_heads)
        qtype = _tensor_type(new, data, want, head_name)
        try:
            packed = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # rows that are not whole blocks: the converter's fallback
            qtype = QT.F16
            packed = gguf.quants.quantize(data, qtype)
        w.add_tensor(new, packed, raw_dtype=qtype)
        written[qtype.name] += 1

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        w.write_header_to_file(path=Path(tmp))
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stops = [tok.convert_ids_to_tokens(i) for i in sorted(end_ids(tok))]
    modelfile = write_modelfile(out, fim[1] if fim else None, stops, context)
    return {
        "architecture": arch,
        "pre_tokenizer": pre,
        "fim": fim[0] if fim else None,
        "add_bos": bool(before),
        "bos": tokens[bos] if bos is not None else None,
        "tied": tied,
        "context": context,
        "vocab_size": len(tokens),
        "tensor_types": dict(written),
        "bytes": out.stat().st_size,
        "modelfile": str(modelfile),
    }


def write_modelfile(gguf_path: Path, fim: Template | None, stops: list[str], context: int) -> Path:
    """An Ollama Modelfile beside the file, named after it (several quantizations can share a folder)."""
    if fim:
        body = f"{fim.pre}{{{{ .Prompt }}}}{fim.suf}{{{{ .Suffix }}}}{fim.mid}"
        template = f"{{{{- if .Suffix }}}}{body}{{{{- else }}}}{{{{ .Prompt }}}}{{{{- end }}}}"
    else:
        template = "{{ .Prompt }}"
    lines = [
        f"# Ollama: ollama create {gguf_path.stem} -f {gguf_path.stem}.Modelfile (written by distil-codegpt export)",
        f"FROM ./{gguf_path.name}",
        f'TEMPLATE """{template}"""',
        "PARAMETER temperature 0",
        f"PARAMETER num_ctx {context}",
        *(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(stops)),
    ]
    path = gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    with atomic_open(path) as f:
        f.write("\n".join(lines) + "\n")
    return path


def commands(gguf_path: str | Path) -> list[str]:
    """How to run the file in each local tool (printed after the export)."""
    p = Path(gguf_path)
    return [
        f"llama-server -m {p} --port 8012  # llama.vscode's default endpoint",
        f"ollama create {p.stem} -f {p.with_name(p.stem + '.Modelfile')}",
        f"lms import {p}  # LM Studio",
    ]
