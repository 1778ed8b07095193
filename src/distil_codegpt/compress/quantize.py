"""Int8 dynamic quantization of every linear layer of a GPT-2 model, LM head included, for CPU inference.

Why the LM head too: in a small student the (n_embd x vocab) head is the largest matrix and dominates the cost of
each new token. It is tied to the input embedding in GPT-2, so it is untied to be quantized: the head becomes an
int8 linear layer, the input embedding stays an fp32 `nn.Embedding` (a lookup costs nothing, and HF code expects
one) holding the head's dequantised weights. So input and output embedding stay one matrix as in GPT-2, and the
artifact stores it once, in int8: with a small vocabulary's students the embedding is a third to a half of the
model, and an fp32 copy of it on disk would leave the artifact barely smaller (kd-4 of the demo: 1.70 MB instead of
0.67 MB, fp32 1.89 MB). GPT-2's c_attn/c_proj/c_fc are transformers' `Conv1D` (weight stored (in, out)), which no
quantizer recognises, so each becomes an equivalent `nn.Linear`.

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

import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from distil_codegpt.compress.prune import apply_pruned_heads
from distil_codegpt.config import UserError
from distil_codegpt.serve.engine import ENGINE_FILE, TorchEngine, engine_kind, write_engine_spec

ENGINE = "torch-int8"
WEIGHTS_FILE = "model_int8.bin"  # torch.save of the state dict; .bin so that size-on-disk tools count it
LIBRARY = "torch.ao.quantization.quantize_dynamic"
EMBEDDING_KEY = "transformer.wte.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


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


def untie_lm_head(model: GPT2LMHeadModel) -> bool:
    """Give the LM head its own copy of the embedding matrix so that it can be quantized alone; True if it was tied."""
    head, wte = model.lm_head, model.transformer.wte
    tied = head.weight is wte.weight or head.weight.data_ptr() == wte.weight.data_ptr()
    if tied:
        head.weight = nn.Parameter(wte.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return tied


def _head_as_embedding(model: GPT2LMHeadModel) -> None:
    with torch.no_grad():
        model.transformer.wte.weight.copy_(model.lm_head.weight().dequantize())


def quantize_int8(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """In place: Conv1D -> Linear, untie the head, every nn.Linear -> dynamic int8 (per output channel), and a tied
    input embedding set to the int8 head's values (module docstring)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model.cpu().float().eval()
    conv1d_to_linear(model)
    tied = untie_lm_head(model)
    with _quiet():
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    if tied:
        _head_as_embedding(model)
    return model


def embedding_is_head(model: GPT2LMHeadModel) -> bool:
    """Whether the input embedding holds exactly the int8 head's values (then the artifact stores it once)."""
    wte, head = model.transformer.wte.weight, model.lm_head
    return is_int8_linear(head) and wte.shape == head.weight().shape and torch.equal(wte, head.weight().dequantize())


def is_int8_linear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


def count_all_params(model: GPT2LMHeadModel) -> int:
    """What `count_params` gives for the fp32 model: int8 weights and biases included (`parameters()` skips them once
    quantized), an embedding that is the head counted once (as a tied one is)."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if is_int8_linear(m):
            weight, bias = m._weight_bias()
            n += weight.numel() + (bias.numel() if bias is not None else 0)
    return n - (model.transformer.wte.weight.numel() if embedding_is_head(model) else 0)


def copy_tokenizer(src: str | Path, out: str | Path) -> list[str]:
    """Copy the tokenizer files a model directory carries (a hub id: save its tokenizer); returns the file names."""
    from distil_codegpt.model.presets import looks_local

    if not looks_local(str(src)):
        return [Path(f).name for f in AutoTokenizer.from_pretrained(src).save_pretrained(out)]
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(out) / name)
            copied.append(name)
    return copied


def save_int8(model: GPT2LMHeadModel, out: str | Path, **details: Any) -> Path:
    """Write a quantized model as an artifact `load_engine` and `load_for_evaluation` read (with the tokenizer files
    copied beside it: `copy_tokenizer`).

    Holds: the state dict (torch.save; int8 tensors and their scales cannot go into safetensors), config.json to
    rebuild the modules (tie_word_embeddings false, pruned heads recorded) and engine.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if embedding_is_head(model):
        del state[EMBEDDING_KEY]  # rebuilt from the int8 head on load
    torch.save(state, out / WEIGHTS_FILE)
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    backend = torch.backends.quantized.engine
    write_engine_spec(out, ENGINE, library=LIBRARY, qscheme="per_channel_affine", backend=backend, **details)
    return out / WEIGHTS_FILE


def load_int8(path: str | Path) -> GPT2LMHeadModel:
    """Rebuild the fp32 modules from config.json, apply the same transformation, then load the int8 weights."""
    path = Path(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(
            f"model: {weights}: missing; rebuild the artifact with `distil-codegpt compress --quantize int8`"
        )
    config = GPT2Config.from_pretrained(path)
    config.tie_word_embeddings = False
    model = GPT2LMHeadModel(config)
    apply_pruned_heads(model)
    quantize_int8(model)
    with _quiet():
        state = torch.load(weights, map_location="cpu", weights_only=True)
        result = model.load_state_dict(state, strict=False)
    if set(result.missing_keys) - {EMBEDDING_KEY} or result.unexpected_keys:
        wrong = sorted(set(result.missing_keys) - {EMBEDDING_KEY}) + result.unexpected_keys
        raise UserError(f"model: {weights} does not fit its config.json ({', '.join(wrong[:3])}...); rebuild it")
    if EMBEDDING_KEY in result.missing_keys:
        _head_as_embedding(model)
    return model.eval()


class QuantizedTorchEngine(TorchEngine):
    """The int8 model on CPU; decoding (KV cache through the HF forward) is TorchEngine's."""

    name = ENGINE

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> QuantizedTorchEngine:
        from distil_codegpt.data.tokenizer import load_tokenizer

        if torch.device(device).type != "cpu":
            raise UserError(f"device: {device!r}: int8 artifacts run on CPU only; pass --device cpu")
        return cls(load_int8(path), load_tokenizer(path), Path(path), "cpu")


def load_for_evaluation(path: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) for any model or `compress` artifact, as a module HF `generate` can drive.

    An int8 artifact is rebuilt on CPU; a model with pruned heads (config `distil_pruned_heads`) has them cut out of
    its matrices, so it runs as fast as its size says; anything else (a hub id too) loads as `load_model` does.
    """
    from distil_codegpt.data.tokenizer import load_tokenizer
    from distil_codegpt.model.presets import load_model, looks_local

    if looks_local(path) and (Path(path) / ENGINE_FILE).is_file():
        kind = engine_kind(path)
        if kind != ENGINE:
            raise UserError(f"model: {path} is a {kind!r} engine artifact, which only `complete`/`serve` can run")
        return load_int8(path), load_tokenizer(path)
    model = apply_pruned_heads(load_model(path, role="model", dtype=torch.float32))
    tok = load_tokenizer(path) if looks_local(path) else AutoTokenizer.from_pretrained(path)
    return model, tok
