"""Model shapes as data, and loading of any supported checkpoint (families.py lists the families).

Presets follow litgpt: a registry of plain dicts, each naming its family and its shape in family-neutral keys
(layers, width, heads, kv_heads, ffn, context) plus any of the family's own config fields; the full config is
computed in one place, `preset_config`. The vocabulary size never lives in a preset: it always comes from the
tokenizer the model is trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from distil_codegpt.artifacts import check_config, check_weights, first_line, looks_local
from distil_codegpt.config import ConfigError, UserError
from distil_codegpt.model import families
from distil_codegpt.model.gguf import cached_import
from distil_codegpt.model.vocab_trim import apply_saved_trim, save_kept
from distil_codegpt.runinfo import staged_files

# GPT-2's own values (https://huggingface.co/openai-community/gpt2/blob/main/config.json), shared by the GPT-2
# presets so that a preset only states its shape. n_inner None means 4 * n_embd; the LM head is the input
# embedding matrix (tied), as in GPT-2 and CodeGPT.
GPT2_DEFAULTS: dict[str, Any] = {
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "tie_word_embeddings": True,
}

# the test shape of the families with grouped KV heads: 2 KV heads shared by 4 query heads
TINY_GQA: dict[str, Any] = {
    **{"layers": 2, "width": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "context": 256},
    "tie_word_embeddings": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    # tests and smoke runs on CPU: seconds per step, nothing to learn from the numbers
    "tiny": {"family": "gpt2", "layers": 2, "width": 64, "heads": 2, "context": 256, **GPT2_DEFAULTS},
    # the study's CPU demo: CodeGPT-small's depth (12 layers, so the same layer picks apply), 1/6 of its width
    "small-cpu": {"family": "gpt2", "layers": 12, "width": 128, "heads": 4, "context": 512, **GPT2_DEFAULTS},
    # microsoft/CodeGPT-small-py = GPT-2 124M (https://huggingface.co/microsoft/CodeGPT-small-py/blob/main/config.json)
    "codegpt-small": {"family": "gpt2", "layers": 12, "width": 768, "heads": 12, "context": 1024, **GPT2_DEFAULTS},
    # the other families at test size: grouped KV heads (2 per 4 query heads) where the family has them
    "tiny-llama": {"family": "llama", **TINY_GQA},
    "tiny-qwen2": {"family": "qwen2", **TINY_GQA},
    "tiny-neox": {
        "family": "gpt_neox",
        "layers": 2,
        "width": 64,
        "heads": 4,
        "ffn": 128,
        "context": 256,
        "tie_word_embeddings": False,
    },
    # SmolLM2-135M's shape (https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json)
    "smollm2-135m": {
        "family": "llama",
        "layers": 30,
        "width": 576,
        "heads": 9,
        "kv_heads": 3,
        "ffn": 1536,
        "context": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
}


def preset_config(
    preset: str,
    vocab_size: int,
    *,
    layers: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """The full config of a preset for a given tokenizer; `layers` overrides the depth.

    Special token ids default to None rather than GPT-2's 50256, which lies outside a small tokenizer's vocabulary.
    """
    if preset not in PRESETS:
        raise ConfigError(f"model: {preset!r} is not a supported preset; choose from {', '.join(PRESETS)}")
    shape = {k: v for k, v in PRESETS[preset].items() if k != "family"}
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"layers: {layers!r} is not allowed; use 1 or more")
        shape["layers"] = layers
    if vocab_size < 1:
        raise ConfigError(f"vocab_size: {vocab_size!r} is not allowed; use the tokenizer's vocabulary size")
    if shape["width"] % shape["heads"] or shape["heads"] % shape.get("kv_heads", shape["heads"]):
        raise ConfigError(f"model: preset {preset!r} has width, heads and kv_heads that do not divide; fix the preset")
    specials = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return families.model_config(PRESETS[preset]["family"], vocab_size, shape, **specials)


def resolve_model(name_or_path: str, *, role: str = "model") -> str:
    """A model argument as `from_pretrained` takes it: a `.gguf` file is imported (once, cached by its hash)."""
    if name_or_path.lower().endswith(".gguf"):
        return str(cached_import(name_or_path, role=role))
    return name_or_path


def model_type_of(name_or_path: str, *, role: str = "model") -> str | None:
    """The checkpoint's model_type, read from its config.json (a local dir) or the hub; one line when neither works."""
    if looks_local(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise UserError(
                f"{role}: {name_or_path!r}: no such directory; pass a model directory (`distil-codegpt train`, "
                "`import`, `fetch-teacher`), a .gguf file or a hub id"
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"{role}: {name_or_path!r}: not a model directory (no config.json); pass a directory written by "
                "`distil-codegpt train` or `import`, a .gguf file or a hub id"
            )
        return check_config(path, role=role).get("model_type")
    try:
        return AutoConfig.from_pretrained(name_or_path).model_type
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{role}: {name_or_path!r} is not a local directory and the Hugging Face hub could not serve it "
            f"({first}); pass a model directory, a .gguf file or a reachable hub id"
        ) from e


def load_model(name_or_path: str, *, role: str = "model", **kw: Any) -> PreTrainedModel:
    """Load a causal LM of a supported family from a local directory, a .gguf file or a hub id
    (e.g. microsoft/CodeGPT-small-py, HuggingFaceTB/SmolLM2-135M).

    Any other family stops with one line naming the supported ones: the student machinery copies blocks by the
    layout families.py knows. `role` is the config field the errors name (teacher, init_from...). Extra keywords
    go to `from_pretrained` (e.g. dtype; note that transformers 5 keeps a checkpoint's stored dtype unless told
    otherwise).
    """

    source = resolve_model(name_or_path, role=role)
    families.family_name(model_type_of(source, role=role), what=f"{role} {name_or_path!r}")
    local = looks_local(source)
    if local:
        check_weights(Path(source).expanduser(), role=role)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kw)
    except (RuntimeError, ValueError, OSError) as e:  # weights that do not fit the config, an unreadable file
        if not local:
            raise
        raise UserError(
            f"{role}: {source}: its weights do not load ({first_line(e)}); copy the model again or rebuild it"
        ) from e
    return apply_saved_trim(model, source)  # a trimmed head


def pad_vocab(model: PreTrainedModel, multiple: int) -> int:
    """Pad the (tied) embedding / LM-head matrix with zero rows to a multiple of `multiple`, in place.

    A vocabulary such as GPT-2's 50,257 makes the head matmul, the largest of a small model, fall off the
    fast tile sizes of GPU kernels; 50,304 does not (nanoGPT's measured trick). The padding rows are never
    input ids, and every loss leaves their logit columns out (`n_vocab`), so they get no gradient and change
    nothing; `save_model` trims them again, so nothing padded reaches the disk. config.vocab_size keeps the
    real size. Returns the real number of rows.
    """
    wte = model.get_input_embeddings()
    rows = wte.weight.size(0)
    target = -(-rows // multiple) * multiple if multiple > 1 else rows
    if target == rows:  # nothing to pad, or padded already (config.vocab_size still says the real size)
        return min(rows, model.config.vocab_size)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not wte.weight:
        raise ConfigError("pad_vocab: the model's LM head is not tied to its embeddings; pass --pad-vocab 1")
    weight = torch.nn.Parameter(
        torch.cat([wte.weight.detach(), wte.weight.new_zeros(target - rows, wte.weight.size(1))])
    )
    wte.weight, wte.num_embeddings = weight, target
    if head is not None:
        head.weight, head.out_features = weight, target
    return min(rows, model.config.vocab_size)


def save_model(model: PreTrainedModel, out: str | Path, n_vocab: int | None = None, tokenizer: Any = None) -> None:
    """`save_pretrained` (safetensors) with the tokenizer, first trimming a head padded by `pad_vocab` back to
    `n_vocab` rows; every file lands whole (`staged_files`), so a full disk mid-save keeps the previous model."""
    state = model.state_dict()
    if n_vocab is not None:
        for key in {families.embedding_key(model), families.head_key(model)}:
            if key in state and state[key].size(0) > n_vocab:
                state[key] = state[key][:n_vocab]
    with staged_files(out) as stage:
        model.save_pretrained(stage, state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)

    save_kept(model, out)  # a trimmed head: its kept ids beside the weights


def tokenizer_dir_of(model_dir: str | Path) -> Path:
    """The model directory, which must carry its tokenizer for --data (the corpus is tokenised with it)."""
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise UserError(
            f"model: {model_dir} has no tokenizer.json, which --data needs to tokenise the corpus; copy the tokenizer"
            " files the model was trained with into it"
        )
    return Path(model_dir)
