"""A student is the teacher cut to a shape: fewer blocks, a narrower MLP, fewer attention heads, a smaller hidden size.

Every cut keeps the model a plain Hugging Face model of the teacher's family: the same sizes in every layer (the
units kept may differ from layer to layer, their number does not), so `AutoModelForCausalLM`, GGUF and llama.cpp
load it with no code of ours. Which units stay is chosen by measured importance (model/importance.py).

    depth   blocks picked from the teacher (model/student.py: uniform, influence, angular...)
    ffn     MLP neurons per block: rows of the up/gate projections, columns of the down projection
    heads   query heads per block, cut in whole units (a KV group with its query heads under grouped-query
            attention); head_dim stays the teacher's, so config.json states it
    hidden  residual-stream channels: columns of the embedding, the head and every input projection, rows of every
            output projection, entries of every norm. RMSNorm divides by the root mean square over the channels it
            sees, so the norm weights are rescaled by sqrt(kept energy share * d / d'): a cut of channels that carry
            nothing leaves the logits as they were (up to the norm's epsilon).

What differs per family: gpt2 and gpt_neox derive head size from hidden / heads, so only depth and ffn cut there
(and their LayerNorm centres the channels, which an RMSNorm rescale cannot undo).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from distil_codegpt.config import ConfigError
from distil_codegpt.model import families
from distil_codegpt.model.importance import Importance

WIDTH_CUT_FAMILIES = ("llama", "mistral", "qwen2")  # heads and hidden: explicit head_dim, RMSNorm


@dataclass(frozen=True)
class Shape:
    layers: int
    ffn: int
    heads: int  # query heads
    hidden: int


@dataclass
class Cut:
    """What a student keeps of its teacher: blocks, and per kept block its neurons and head units; channels."""

    picked: list[int]  # teacher block of each student block
    ffn: list[list[int]] | None = None  # per student block, kept neurons (None: all)
    units: list[list[int]] | None = None  # per student block, kept head units (None: all)
    hidden: list[int] | None = None  # kept channels (None: all)
    norm_scale: dict[str, float] | None = None  # teacher norm module name -> weight factor (hidden cut)


def shape_of(config: PretrainedConfig) -> Shape:
    return Shape(families.depth(config), families.ffn_width(config), families.n_heads(config), families.width(config))


def resolve(config: PretrainedConfig, layers: int, ffn: int, heads: int, hidden: int) -> Shape:
    """The student's shape from the flags (0 = the teacher's), or one line on what the family cannot cut."""
    t = shape_of(config)
    fam = families.family(config).name
    want = Shape(layers or t.layers, ffn or t.ffn, heads or t.heads, hidden or t.hidden)
    for name, value, full in (
        ("ffn", want.ffn, t.ffn),
        ("heads", want.heads, t.heads),
        ("hidden", want.hidden, t.hidden),
    ):
        if not 1 <= value <= full:
            raise ConfigError(f"{name}: {value} is not allowed; the teacher has {full}, use 1..{full} (0 = all)")
    for name in ("heads", "hidden"):
        if getattr(want, name) != getattr(t, name) and fam not in WIDTH_CUT_FAMILIES:
            raise ConfigError(
                f"{name}: a {fam} model derives its head size from hidden / heads, so it cannot keep the teacher's "
                f"heads at another {name}; cut --layers or --ffn, or use a {'/'.join(WIDTH_CUT_FAMILIES)} teacher"
            )
    _, per = families.head_units(config)
    if want.heads % per:
        raise ConfigError(
            f"heads: {want.heads} is not allowed; {per} query heads share each KV head, so keep a multiple of {per} "
            f"(e.g. {max(per, want.heads - want.heads % per)})"
        )
    if fam == "llama" and (want.heads, want.hidden) != (t.heads, t.hidden) and want.hidden % want.heads:
        lo = want.hidden - want.hidden % want.heads
        raise ConfigError(
            f"hidden: {want.hidden} is not a multiple of the {want.heads} query heads kept, which transformers' "
            f"Llama config requires; use {lo} or {lo + want.heads}"
        )
    return want


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest-scoring indices, ascending; ties go to the lower index."""
    order = torch.argsort(-scores.double(), stable=True)
    return sorted(order[:k].tolist())


def choose(config: PretrainedConfig, picked: list[int], shape: Shape, imp: Importance | None) -> Cut:
    """Which units the student keeps: the highest-scoring of each picked block and of the channels."""
    t = shape_of(config)
    cut = Cut(picked=list(picked))
    if (shape.ffn, shape.heads, shape.hidden) == (t.ffn, t.heads, t.hidden):
        return cut
    if imp is None:
        raise ValueError("a width cut needs importance scores")
    _, per = families.head_units(config)
    if shape.ffn != t.ffn:
        cut.ffn = [_top(imp.ffn[i], shape.ffn) for i in picked]
    if shape.heads != t.heads:
        cut.units = [_top(imp.units[i], shape.heads // per) for i in picked]
    if shape.hidden != t.hidden:
        cut.hidden = _top(imp.hidden, shape.hidden)
        kept = torch.tensor(cut.hidden)
        ratio = t.hidden / shape.hidden
        cut.norm_scale = {}
        for name, energy in imp.norm_energy.items():
            share = float(energy[kept].sum() / energy.sum()) if float(energy.sum()) > 0 else 1.0
            cut.norm_scale[name] = math.sqrt(share * ratio)
    return cut


def cut_config(config: PretrainedConfig, shape: Shape) -> PretrainedConfig:
    """A copy of the (already depth-cut) config at the shape's widths; head_dim written out when heads or hidden
    change, since the families derive it from hidden / heads otherwise."""
    fam = families.family(config)
    values = config.to_dict()
    t = shape_of(config)
    if shape.ffn != t.ffn:
        values[fam.ffn] = shape.ffn
    if (shape.heads, shape.hidden) != (t.heads, t.hidden):
        values["head_dim"] = families.head_dim(config)
        _, per = families.head_units(config)
        values[fam.heads] = shape.heads
        if fam.kv_heads and families.n_kv_heads(config) < t.heads:
            values[fam.kv_heads] = shape.heads // per
        elif fam.kv_heads:
            values[fam.kv_heads] = shape.heads
        values[fam.width] = shape.hidden
    return type(config).from_dict(values)


def _index(tensor: torch.Tensor, dim: int, keep: list[int] | torch.Tensor | None) -> torch.Tensor:
    if keep is None:
        return tensor
    idx = keep if isinstance(keep, torch.Tensor) else torch.tensor(keep, dtype=torch.long)
    return tensor.index_select(dim, idx.to(tensor.device))


def slice_block(
    config: PretrainedConfig, rel: str, tensor: torch.Tensor, layer: int, cut: Cut, norm_scale: float | None
) -> torch.Tensor:
    """One block tensor (block-relative name `rel`, of student block `layer`) cut to the student's widths."""
    fam = families.family(config)
    module, _, kind = rel.rpartition(".")
    od, idim = families.out_dim(fam), 1 - families.out_dim(fam)
    hidden = cut.hidden
    if cut.ffn is not None:
        if module in fam.mlp[:-1]:
            tensor = _index(tensor, od if kind == "weight" else 0, cut.ffn[layer])
        elif module == fam.mlp[-1] and kind == "weight":
            tensor = _index(tensor, idim, cut.ffn[layer])
    if cut.units is not None:
        for name, k, dim, idx in families.unit_slices(config, cut.units[layer]):
            if (name, k) == (module, kind):
                tensor = _index(tensor, dim, idx)
    if hidden is not None:
        if kind == "weight" and tensor.dim() == 2 and module in (*fam.attn_in, *fam.mlp[:-1]):
            tensor = _index(tensor, idim, hidden)
        elif module in (fam.attn_out, fam.mlp[-1]):
            tensor = _index(tensor, od if kind == "weight" else 0, hidden)
        elif tensor.dim() == 1 and norm_scale is not None:  # a norm of the block
            tensor = _index(tensor, 0, hidden) * norm_scale
    return tensor


def cut_tensor(
    config: PretrainedConfig, key: str, tensor: torch.Tensor, cut: Cut, embeddings: set[str]
) -> torch.Tensor:
    """A tensor outside the blocks (embedding, final norm, head) cut to the student's hidden size."""
    if cut.hidden is None:
        return tensor
    if key in embeddings:  # (V, H): embeddings and the LM head
        return _index(tensor, 1, cut.hidden)
    scale = (cut.norm_scale or {}).get(key.rpartition(".")[0])
    if scale is not None:
        return _index(tensor, 0, cut.hidden) * scale
    raise ConfigError(f"hidden: cannot cut tensor {key} {tuple(tensor.shape)} of a {config.model_type} model")


def macs_per_token(config: PretrainedConfig) -> int:
    """Multiply-adds per token of the weight matrices: every block's projections plus the LM head. Attention over
    the context is left out: it grows with the prompt, not with the shape's matrices."""
    fam = families.family(config)
    w, q, kv, hd = (
        families.width(config),
        families.n_heads(config),
        families.n_kv_heads(config),
        families.head_dim(config),
    )
    attention = w * (q + 2 * kv) * hd + q * hd * w  # q, k, v in; o out
    mlp = len(fam.mlp) * w * families.ffn_width(config)
    return families.depth(config) * (attention + mlp) + w * int(config.vocab_size)


# ---------------------------------------------------------------- head units pruned at full shape (compress --prune)
# A head-pruned model is saved at full shape with its units zeroed and listed in config.json (compress/prune.py says
# why); in memory the units are cut out of the matrices so that the smaller model also runs faster.

HEADS_KEY = "distil_pruned_heads"  # config.json: {"layer": [unit, ...]}


def unit_name(obj: nn.Module | PretrainedConfig) -> str:
    """What messages call a head unit of this model: "heads", or "KV groups" under grouped-query attention."""
    return "KV groups" if families.head_units(obj)[1] > 1 else "heads"


def unit_weight_slice(model: PreTrainedModel, units: list[int], module: str) -> tuple[str, str, int, torch.Tensor]:
    """The weight slice of `module` that the units occupy (families.unit_slices)."""
    return next(s for s in families.unit_slices(model, units) if s[0] == module and s[1] == "weight")


def pruned_units(model: nn.Module | PretrainedConfig) -> dict[int, list[int]]:
    """The units recorded in the config: layer -> sorted units."""
    recorded = getattr(getattr(model, "config", model), HEADS_KEY, None) or {}
    return {int(k): sorted(v) for k, v in sorted(recorded.items(), key=lambda kv: int(kv[0]))}


@torch.no_grad()
def apply_pruned_heads(model: PreTrainedModel) -> PreTrainedModel:
    """Cut the units listed in the config out of the block matrices (in memory); layers already cut are skipped."""
    recorded = pruned_units(model)
    if not recorded:
        return model
    n_unit, _ = families.head_units(model)
    name, _, dim, every = unit_weight_slice(model, list(range(n_unit)), families.family(model).attn_out)
    blocks = families.blocks(model)
    for layer, units in recorded.items():
        if families.matrix_weight(blocks[layer], name).shape[dim] == len(every):  # still at full shape
            families.cut_units(blocks[layer], model, units)
    return model
