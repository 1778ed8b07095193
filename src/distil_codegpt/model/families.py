"""What differs between the decoder-only families we support, as data, in one place.

Every other module asks this one where a model's blocks live, how deep, wide and many-headed it is, which
matrices its attention and MLP are made of, and how a head's rows sit inside them; nothing else spells
`transformer.h`, `model.layers` or `c_attn`. A family is named by the checkpoint's `model_type`.

Layouts (weights as stored by transformers; nn.Linear is (out, in), GPT-2's Conv1D is (in, out)):

    gpt2      transformer.h.N   attn.c_attn (q|k|v fused, Conv1D)  attn.c_proj   mlp.c_fc, mlp.c_proj
    llama     model.layers.N    self_attn.{q,k,v}_proj             self_attn.o_proj  mlp.{gate,up,down}_proj
    mistral   as llama (sliding-window attention is a config value)
    qwen2     as llama, q/k/v with biases; per-layer `layer_types` in the config
    gpt_neox  gpt_neox.layers.N attention.query_key_value (per head q_h|k_h|v_h)  attention.dense
                                mlp.dense_h_to_4h, mlp.dense_4h_to_h; untied head `embed_out`

A "head unit" is what structured pruning removes at once. With grouped KV heads (llama, qwen2, mistral with
fewer KV heads than query heads) a KV head is shared by `heads / kv_heads` query heads, and transformers repeats
each KV head that many times, so the unit is a whole group: one KV head and its query heads. Otherwise it is one
head.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from distil_codegpt.config import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    blocks: str  # dotted path of the nn.ModuleList of decoder blocks
    depth: str  # config fields
    width: str
    heads: str
    kv_heads: str | None  # None: every head has its own K and V
    context: str
    ffn: str | None  # config field of the MLP's inner width (None: derived, see `ffn_width`)
    attn_in: tuple[str, ...]  # block-relative module names of the attention input projections
    attn_out: str  # ... and of the output projection
    mlp: tuple[str, ...]  # the MLP's matrices
    conv1d: bool = False  # weights stored (in, out) as transformers' Conv1D
    fused_qkv: str = ""  # "": separate q/k/v; "blocked": [q | k | v]; "per_head": [q_h k_h v_h] per head

    def matrices(self) -> tuple[str, ...]:
        """Every weight matrix of a block, block-relative: what magnitude pruning and int8 touch."""
        return (*self.attn_in, self.attn_out, *self.mlp)


_LLAMA = dict(
    blocks="model.layers",
    depth="num_hidden_layers",
    width="hidden_size",
    heads="num_attention_heads",
    kv_heads="num_key_value_heads",
    context="max_position_embeddings",
    ffn="intermediate_size",
    attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out="self_attn.o_proj",
    mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "gpt2",
        blocks="transformer.h",
        depth="n_layer",
        width="n_embd",
        heads="n_head",
        kv_heads=None,
        context="n_positions",
        ffn="n_inner",
        attn_in=("attn.c_attn",),
        attn_out="attn.c_proj",
        mlp=("mlp.c_fc", "mlp.c_proj"),
        conv1d=True,
        fused_qkv="blocked",
    ),
    "llama": Family("llama", **_LLAMA),
    "mistral": Family("mistral", **_LLAMA),
    "qwen2": Family("qwen2", **_LLAMA),
    "gpt_neox": Family(
        "gpt_neox",
        blocks="gpt_neox.layers",
        depth="num_hidden_layers",
        width="hidden_size",
        heads="num_attention_heads",
        kv_heads=None,
        context="max_position_embeddings",
        ffn="intermediate_size",
        attn_in=("attention.query_key_value",),
        attn_out="attention.dense",
        mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
        fused_qkv="per_head",
    ),
}

SUPPORTED = ", ".join(FAMILIES)


def family_name(model_type: str | None, *, what: str = "model") -> str:
    """The family of a model_type, or one line naming the supported ones."""
    if model_type not in FAMILIES:
        raise ConfigError(
            f"{what}: model_type {model_type!r} is not supported; supported families: {SUPPORTED} "
            "(any checkpoint of these, e.g. GPT-2/CodeGPT, Llama/SmolLM2/Mistral, Qwen2, Pythia)"
        )
    return model_type


def family(obj: nn.Module | PretrainedConfig | str, *, what: str = "model") -> Family:
    """The Family of a model, a config or a model_type."""
    if isinstance(obj, str):
        return FAMILIES[family_name(obj, what=what)]
    config = getattr(obj, "config", obj)
    return FAMILIES[family_name(getattr(config, "model_type", None), what=what)]


def _config(obj: nn.Module | PretrainedConfig) -> PretrainedConfig:
    return getattr(obj, "config", obj)


def depth(obj: nn.Module | PretrainedConfig) -> int:
    return int(getattr(_config(obj), family(obj).depth))


def width(obj: nn.Module | PretrainedConfig) -> int:
    return int(getattr(_config(obj), family(obj).width))


def n_heads(obj: nn.Module | PretrainedConfig) -> int:
    return int(getattr(_config(obj), family(obj).heads))


def n_kv_heads(obj: nn.Module | PretrainedConfig) -> int:
    """KV heads: fewer than the query heads for grouped-query attention."""
    fam, config = family(obj), _config(obj)
    value = getattr(config, fam.kv_heads, None) if fam.kv_heads else None
    return int(value) if value else n_heads(obj)


def head_dim(obj: nn.Module | PretrainedConfig) -> int:
    config = _config(obj)
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else width(obj) // n_heads(obj)


def context(obj: nn.Module | PretrainedConfig) -> int:
    """Positions the model can attend to (prompt + new tokens)."""
    return int(getattr(_config(obj), family(obj).context))


def set_context(obj: nn.Module | PretrainedConfig, n: int) -> None:
    setattr(_config(obj), family(obj).context, int(n))


def ffn_width(obj: nn.Module | PretrainedConfig) -> int:
    value = getattr(_config(obj), family(obj).ffn or "", None)
    return int(value) if value else 4 * width(obj)  # GPT-2's n_inner None


def tied_head(model: nn.Module) -> bool:
    """Whether the LM head is the input embedding matrix (GPT-2, SmolLM2) rather than its own (Pythia, Llama-7B)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == emb.weight.data_ptr()


def cache_arg(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` in recent transformers 5 (5.2x on),
    `past_key_values` before it (an alias of `cache` since, deprecated). A cache passed by the wrong name is
    swallowed by `**kwargs` and never filled."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters: a tied LM head shares the embedding matrix and counts once (works on meta tensors)."""
    return sum(p.numel() for p in model.parameters())  # parameters() already skips repeated (tied) tensors


def model_size_mb(model: torch.nn.Module) -> float:
    """Size of the unique parameters stored in fp32, in MB (1e6 bytes), whatever dtype the model is in now."""
    return count_params(model) * 4 / 1e6


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(family(model).blocks)


def block_prefix(obj: nn.Module | PretrainedConfig) -> str:
    """State-dict prefix of block N is f"{block_prefix(model)}{N}." """
    return family(obj).blocks + "."


def parameter_name(model: nn.Module, param: torch.Tensor) -> str:
    """The state-dict name of a parameter (the first one, for a tied pair)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    raise KeyError("parameter not in this model")


def embedding_key(model: nn.Module) -> str:
    return parameter_name(model, model.get_input_embeddings().weight)


def head_key(model: nn.Module) -> str:
    """State-dict name of the LM head's weight (lm_head.weight, embed_out.weight...), whether tied or not."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    raise KeyError("model has no output embeddings")


def with_depth(config: PretrainedConfig, picked: list[int]) -> PretrainedConfig:
    """A copy of `config` with len(picked) blocks, keeping per-layer settings of the picked blocks.

    Per-layer fields (qwen2/mistral `layer_types`: full or sliding attention per block) are lists as long as the
    depth; each keeps its entries at `picked`. Stale `distil_*` keys of a source that was itself a student go.
    """
    fam, n = family(config), depth(config)
    values = {k: v for k, v in config.to_dict().items() if not k.startswith("distil_")}
    for key, value in list(values.items()):
        if isinstance(value, list) and len(value) == n and n != len(picked):
            values[key] = [value[i] for i in picked]
    values[fam.depth] = len(picked)
    if fam.name == "qwen2" and values.get("max_window_layers", 0) > len(picked):
        values["max_window_layers"] = len(picked)
    return type(config).from_dict(values)


def matrix_weight(block: nn.Module, name: str) -> nn.Parameter:
    return block.get_submodule(name).weight


def out_dim(fam: Family) -> int:
    """The weight dimension that indexes a projection's outputs (1 for Conv1D's (in, out), 0 for nn.Linear)."""
    return 1 if fam.conv1d else 0


def head_units(obj: nn.Module | PretrainedConfig) -> tuple[int, int]:
    """(units per layer, query heads per unit): what head pruning removes at once (module docstring)."""
    h, kv = n_heads(obj), n_kv_heads(obj)
    return (kv, h // kv) if kv < h else (h, 1)


def unit_slices(obj: nn.Module | PretrainedConfig, units: list[int]) -> list[tuple[str, str, int, torch.Tensor]]:
    """Where head units sit in a block: (module, "weight"/"bias", dim, indices) for each tensor they occupy.

    Zeroing these entries makes the units contribute exactly nothing; keeping only the complement cuts them out.
    """
    fam = family(obj)
    h, kv, hd, e = n_heads(obj), n_kv_heads(obj), head_dim(obj), width(obj)
    _, per = head_units(obj)
    q_heads = [u * per + j for u in units for j in range(per)]
    kv_of = sorted(units) if kv < h else q_heads

    def span(heads: list[int], offset: int = 0, stride: int = hd) -> torch.Tensor:
        if not heads:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(offset + x * stride, offset + x * stride + hd) for x in heads])

    od = out_dim(fam)
    o_in = 0 if fam.conv1d else 1
    out: list[tuple[str, str, int, torch.Tensor]] = []
    if fam.fused_qkv == "blocked":  # gpt2: [q | k | v], each e wide
        rows = torch.cat([span(q_heads), span(q_heads, e), span(q_heads, 2 * e)])
        (qkv,) = fam.attn_in
        out += [(qkv, "weight", od, rows), (qkv, "bias", 0, rows)]
    elif fam.fused_qkv == "per_head":  # gpt_neox: head x [q_h | k_h | v_h]
        rows = torch.cat([span(q_heads, k * hd, 3 * hd) for k in range(3)]).sort().values
        (qkv,) = fam.attn_in
        out += [(qkv, "weight", od, rows), (qkv, "bias", 0, rows)]
    else:
        q, k, v = fam.attn_in
        for name, heads in ((q, q_heads), (k, kv_of), (v, kv_of)):
            out += [(name, "weight", od, span(heads)), (name, "bias", 0, span(heads))]
    out += [(fam.attn_out, "weight", o_in, span(q_heads))]
    return out


def cut_units(block: nn.Module, obj: nn.Module | PretrainedConfig, units: list[int]) -> None:
    """Remove head units from one block's matrices in memory (the module attributes follow)."""
    fam = family(obj)
    n_units, per = head_units(obj)
    keep = [u for u in range(n_units) if u not in set(units)]
    for name, kind, dim, idx in unit_slices(obj, keep):
        module = block.get_submodule(name)
        tensor = getattr(module, kind, None)
        if tensor is None:
            continue
        setattr(module, kind, nn.Parameter(tensor.detach().index_select(dim, idx.to(tensor.device)).clone()))
        if isinstance(module, nn.Linear) and kind == "weight":
            module.out_features, module.in_features = module.weight.shape
    attn = block.get_submodule(fam.attn_out.rpartition(".")[0])
    if fam.conv1d:  # GPT2Attention splits q/k/v at split_size and reshapes by num_heads
        width_kept = len(keep) * head_dim(obj)
        attn.num_heads, attn.split_size = len(keep), width_kept
        block.get_submodule(fam.attn_in[0]).nf = 3 * width_kept
        block.get_submodule(fam.attn_out).nx = width_kept
    elif hasattr(attn, "num_heads"):
        attn.num_heads = len(keep) * per


def model_config(family_name_: str, vocab_size: int, shape: dict[str, Any], **special: Any) -> PretrainedConfig:
    """A from-scratch config of a family: `shape` holds family-neutral keys (layers, width, heads, kv_heads, ffn,
    context) plus any of the family's own config fields."""
    fam = FAMILIES[family_name(family_name_)]
    neutral = {"layers": fam.depth, "width": fam.width, "heads": fam.heads, "context": fam.context, "ffn": fam.ffn}
    if fam.kv_heads:
        neutral["kv_heads"] = fam.kv_heads
    values = {neutral.get(k, k): v for k, v in shape.items() if not (k == "kv_heads" and not fam.kv_heads)}
    return AutoConfig.for_model(fam.name, vocab_size=vocab_size, **values, **special)
