"""Model shapes as data, and loading of any GPT-2-family checkpoint.

Presets follow litgpt: a registry of plain dicts, with everything derived from them (the full
`GPT2Config`, the checks) computed in one place, `gpt2_config`. The vocabulary size never lives in a
preset: it always comes from the tokenizer the model is trained with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from distil_codegpt.config import ConfigError, UserError

# GPT-2's own values (https://huggingface.co/openai-community/gpt2/blob/main/config.json), shared by every
# preset so that a preset only states its shape. n_inner None means 4 * n_embd; the LM head is the input
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

PRESETS: dict[str, dict[str, Any]] = {
    # tests and smoke runs on CPU: seconds per step, nothing to learn from the numbers
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256},
    # the study's CPU demo: CodeGPT-small's depth (12 layers, so the same layer picks apply), 1/6 of its width
    "small-cpu": {"n_layer": 12, "n_embd": 128, "n_head": 4, "n_positions": 512},
    # microsoft/CodeGPT-small-py = GPT-2 124M (https://huggingface.co/microsoft/CodeGPT-small-py/blob/main/config.json)
    "codegpt-small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024},
}


def gpt2_config(
    preset: str,
    vocab_size: int,
    *,
    layers: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> GPT2Config:
    """The full config of a preset for a given tokenizer; `layers` overrides the depth.

    Special token ids default to None rather than GPT-2's 50256, which lies outside a small tokenizer's vocabulary.
    """
    if preset not in PRESETS:
        raise ConfigError(f"model: {preset!r} is not a supported preset; choose from {', '.join(PRESETS)}")
    shape = {**PRESETS[preset]}
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"layers: {layers!r} is not allowed; use 1 or more")
        shape["n_layer"] = layers
    if vocab_size < 1:
        raise ConfigError(f"vocab_size: {vocab_size!r} is not allowed; use the tokenizer's vocabulary size")
    if shape["n_embd"] % shape["n_head"]:
        heads = f"n_embd {shape['n_embd']} not divisible by n_head {shape['n_head']}"
        raise ConfigError(f"model: preset {preset!r} has {heads}; fix the preset")
    return GPT2Config(
        **GPT2_DEFAULTS,
        **shape,
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def looks_local(name_or_path: str) -> bool:
    """A path the user meant as a path (so a typo is reported as a missing directory, not a hub lookup)."""
    return Path(name_or_path).expanduser().exists() or name_or_path.startswith(("/", "~", "."))


def load_model(name_or_path: str, *, role: str = "model", **kw: Any) -> GPT2LMHeadModel:
    """Load a GPT-2-family causal LM from a local directory or a hub id (e.g. microsoft/CodeGPT-small-py).

    Only model_type gpt2 is accepted: the student machinery copies GPT-2 blocks by name. `role` is the config
    field the errors name (teacher, init_from...). Extra keywords go to `from_pretrained` (e.g. dtype; note
    that transformers 5 keeps a checkpoint's stored dtype unless told otherwise).
    """
    if looks_local(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise UserError(
                f"{role}: {name_or_path!r}: no such directory; pass a directory written by `distil-codegpt train` "
                "or a hub id"
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"{role}: {name_or_path!r}: not a model directory (no config.json); pass a directory written by "
                "`distil-codegpt train` or a hub id"
            )
        try:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise UserError(f"{role}: {str(path / 'config.json')!r} is not a JSON object ({e}); fix or remove it")
        source = str(path)
    else:
        try:
            model_type = AutoConfig.from_pretrained(name_or_path).model_type
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"{role}: {name_or_path!r} is not a local directory and the Hugging Face hub could not serve it "
                f"({first}); pass a model directory or a reachable hub id"
            ) from e
        source = name_or_path
    if model_type != "gpt2":
        raise ConfigError(
            f"{role}: {name_or_path!r} is a {model_type!r} model; pass a GPT-2-family checkpoint (model_type gpt2), "
            "whose blocks the student can copy"
        )
    return AutoModelForCausalLM.from_pretrained(source, **kw)


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters: a tied LM head shares the embedding matrix and counts once (works on meta tensors)."""
    return sum(p.numel() for p in model.parameters())  # parameters() already skips repeated (tied) tensors


def model_size_mb(model: torch.nn.Module) -> float:
    """Size of the unique parameters stored in fp32, in MB (1e6 bytes), whatever dtype the model is in now."""
    return count_params(model) * 4 / 1e6


def pad_vocab(model: GPT2LMHeadModel, multiple: int) -> int:
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


def save_model(model: GPT2LMHeadModel, out: str | Path, n_vocab: int | None = None) -> None:
    """`save_pretrained` (safetensors), first trimming a head padded by `pad_vocab` back to `n_vocab` rows."""
    state = model.state_dict()
    if n_vocab is not None:
        for key in ("transformer.wte.weight", "lm_head.weight"):
            if key in state and state[key].size(0) > n_vocab:
                state[key] = state[key][:n_vocab]
    model.save_pretrained(out, state_dict=state, safe_serialization=True)
