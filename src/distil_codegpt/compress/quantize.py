"""Int8 dynamic quantization of every linear layer of a model of any supported family, LM head included, for CPU.

Why the LM head too: in a small student the (width x vocab) head is the largest matrix and dominates the cost of
each new token. Where it is tied to the input embedding (GPT-2, SmolLM2, the tiny presets) it is untied to be
quantized: the head becomes an int8 linear layer, the input embedding stays an fp32 `nn.Embedding` (a lookup costs
nothing, and HF code expects one) holding the head's dequantised weights. So input and output embedding stay one
matrix, and the artifact stores it once, in int8: with a small vocabulary's students the embedding is a third to a
half of the model, and an fp32 copy of it on disk would leave the artifact barely smaller (kd-4 of the demo: 1.70 MB
instead of 0.67 MB, fp32 1.89 MB). A family whose head is its own matrix (Pythia) keeps its fp32 embedding as it is.
GPT-2's matrices are transformers' `Conv1D` (weight stored (in, out)), which no quantizer recognises, so for that
family (`Family.conv1d`) each becomes an equivalent `nn.Linear`.

Library: `torch.ao.quantization.quantize_dynamic` (per-channel int8 weights, activations quantized per call, run by
the fbgemm/x86 kernels), not torchao. Measured on this 2-core CPU with torch 2.13.0+cpu and torchao 0.18.0, one
token (batch 1), ms per call of one linear layer (in x out):

    shape        fp32   torchao Int8DynamicActivationInt8Weight   torchao Int8WeightOnly   torch.ao dynamic int8
    768 x 3072   0.13   12.6 (23 under torch.compile)             3.2                      0.03-0.31
    768 x 50257  9.0    59.5                                      53.9                     0.56-4.1

torchao imports and is numerically right here, but has no eager int8 CPU kernel for these shapes (its Int8Tensor
dequantises, then multiplies), so it is 6-100x slower than fp32. torch.ao's API is deprecated (it warns that it
will be removed) but is present and fast in torch 2.13; the warnings are silenced where it is called.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from distil_codegpt.artifacts import check_config, load_torch_file
from distil_codegpt.config import UserError
from distil_codegpt.model import families
from distil_codegpt.model.shape import apply_pruned_heads
from distil_codegpt.model.vocab_trim import TrimmedHead, apply_saved_trim, kept_ids, save_kept
from distil_codegpt.runinfo import write_engine_spec

ENGINE = "torch-int8"
WEIGHTS_FILE = "model_int8.bin"  # torch.save of the state dict; .bin so that size-on-disk tools count it
LIBRARY = "torch.ao.quantization.quantize_dynamic"


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns on every call that it is deprecated; the choice is made (module docstring)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*(torch\.ao\.quantization|quantize_per|qint8|quint8|TypedStorage).*"
        )
        yield


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers Conv1D (y = x @ W + b, W (in, out)) by the same nn.Linear (W.T); returns the count."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in targets:
        n_in, n_out = conv.weight.shape
        linear = nn.Linear(n_in, n_out, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())  # (out, in)
            linear.bias.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return len(targets)


def untie_lm_head(model: PreTrainedModel) -> bool:
    """Give the LM head its own copy of the embedding matrix so that it can be quantized alone; True if it was tied."""
    tied = families.tied_head(model)
    if tied:
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    model.config.tie_word_embeddings = False
    return tied


def _head_as_embedding(model: PreTrainedModel) -> None:
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(model.get_output_embeddings().weight().dequantize())


def _embedding_as_int8(model: PreTrainedModel) -> None:
    """A trimmed head no longer holds every row, so the embedding cannot be stored as the int8 head: it takes the
    values of its own per-row int8 copy instead (`save_int8` stores that copy), as small on disk as the int8 head."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(_int8_rows(emb).dequantize())


def _int8_rows(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 (the head's own scheme: per output channel)."""
    scales = (weight.detach().abs().amax(1) / 127).clamp(min=1e-12).double()
    zeros = torch.zeros(weight.size(0), dtype=torch.long)
    with _quiet():
        return torch.quantize_per_channel(weight.detach().float(), scales, zeros, 0, torch.qint8)


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """In place: Conv1D -> Linear (GPT-2), untie the head, every nn.Linear -> dynamic int8 (per output channel), and a
    tied input embedding set to the int8 head's values (module docstring). A trimmed head (compress/trim.py) becomes
    an int8 layer of its kept rows, and the embedding an int8 matrix of its own."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model.cpu().float().eval()
    if families.family(model).conv1d:
        conv1d_to_linear(model)
    trimmed = model.get_output_embeddings()
    if isinstance(trimmed, TrimmedHead):
        trimmed.freeze()  # the kept rows as an nn.Linear, quantized below
        model.config.tie_word_embeddings, tied = False, False
        _embedding_as_int8(model)
    else:
        tied = untie_lm_head(model)
    with _quiet():
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    if tied:
        _head_as_embedding(model)
    return model


def embedding_is_head(model: PreTrainedModel) -> bool:
    """Whether the input embedding holds exactly the int8 head's values (then the artifact stores it once)."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    return is_int8_linear(head) and emb.shape == head.weight().shape and torch.equal(emb, head.weight().dequantize())


def is_int8_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


def count_all_params(model: PreTrainedModel) -> int:
    """What `count_params` gives for the fp32 model: int8 weights and biases included (`parameters()` skips them once
    quantized), an embedding that is the head counted once (as a tied one is)."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if is_int8_linear(m):
            weight, bias = m._weight_bias()
            n += weight.numel() + (bias.numel() if bias is not None else 0)
    return n - (model.get_input_embeddings().weight.numel() if embedding_is_head(model) else 0)


def save_int8(model: PreTrainedModel, out: str | Path, **details: Any) -> Path:
    """Write a quantized model as an artifact `load_engine` and `load_for_evaluation` read (with the tokenizer files
    copied beside it: `copy_tokenizer`).

    Holds: the state dict (torch.save; int8 tensors and their scales cannot go into safetensors), config.json to
    rebuild the modules (tie_word_embeddings false, pruned heads recorded) and engine.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    state = model.state_dict()
    if embedding_is_head(model):
        del state[families.embedding_key(model)]  # rebuilt from the int8 head on load
    elif kept_ids(model) is not None:  # a trimmed head: the embedding holds its own int8 values (_embedding_as_int8)
        state[families.embedding_key(model)] = _int8_rows(state[families.embedding_key(model)])
    torch.save(state, out / WEIGHTS_FILE)
    save_kept(model, out)
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    backend = torch.backends.quantized.engine
    write_engine_spec(out, ENGINE, library=LIBRARY, qscheme="per_channel_affine", backend=backend, **details)
    return out / WEIGHTS_FILE


def load_int8(path: str | Path) -> PreTrainedModel:
    """Rebuild the fp32 modules from config.json (the family's own class), apply the same transformation (pruned
    units cut, then int8), then load the int8 weights."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(
            f"model: {weights}: missing; rebuild the artifact with `distil-codegpt compress --quantize int8`"
        )
    check_config(path, role="model")
    config = AutoConfig.from_pretrained(path)
    families.family(config, what=f"model {str(path)!r}")

    config.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_pruned_heads(model)
    quantize_int8(apply_saved_trim(model, path))  # a trimmed head: its int8 layer of the kept rows
    embedding = families.embedding_key(model)
    with _quiet():
        state = load_torch_file(weights, fix="rebuild the artifact with `distil-codegpt compress --quantize int8`")
        if embedding in state and state[embedding].is_quantized:  # a trimmed model's int8 embedding
            state[embedding] = state[embedding].dequantize()
        result = model.load_state_dict(state, strict=False)
    if set(result.missing_keys) - {embedding} or result.unexpected_keys:
        wrong = sorted(set(result.missing_keys) - {embedding}) + result.unexpected_keys
        raise UserError(f"model: {weights} does not fit its config.json ({', '.join(wrong[:3])}...); rebuild it")
    if embedding in result.missing_keys:
        _head_as_embedding(model)
    return model.eval()
