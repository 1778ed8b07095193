"""Pruning of any supported family: global magnitude (unstructured) and attention head units (structured), with
optional healing. Where the blocks, matrices and heads sit is families.py's business, not this module's.

A head unit is what structured pruning removes at once (families.py): one head, or with grouped KV heads a whole KV
group (the KV head and the query heads that share it), so `heads:N` counts units.

Transformers 5 dropped `prune_heads` and the `pruned_heads` config field, and its attention modules take their head
count from the config, the same for every layer, so a model whose layers lost different heads cannot be loaded from
a directory with smaller matrices. A head-pruned model is therefore saved at full shape with the units' weights
zeroed (their q, k, v rows and biases, and the output-projection inputs they feed: the unit contributes exactly 0)
and the units listed in config.json as `distil_pruned_heads`; `AutoModelForCausalLM` loads it with no code of ours
and computes the same function. `apply_pruned_heads` cuts the units out of the matrices in memory (what our
evaluate, complete and int8 loaders do), so the smaller model also runs faster. The field is not named
`pruned_heads`: transformers 4 would cut the heads at load time and then refuse the full-shape weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from distil_codegpt.config import ConfigError, DistilConfig, build_config
from distil_codegpt.data.shards import TokenShard, ensure_shards
from distil_codegpt.distill.trainer import Trainer, setup_runtime
from distil_codegpt.model import families
from distil_codegpt.model.importance import measure
from distil_codegpt.model.shape import HEADS_KEY, pruned_units, unit_name, unit_weight_slice

Masks = dict[str, torch.Tensor]  # parameter name -> 1 where the weight lives, 0 where it was pruned


def block_matrices(model: PreTrainedModel) -> dict[str, nn.Parameter]:
    """The weight matrices of the blocks, by parameter name: the scope of magnitude pruning.

    Embeddings and norms are left alone; so is the LM head, which is the input embedding when tied (zeroing its
    small entries would also erase parts of the token embeddings) and is kept whole when not, for the same scope.
    """
    prefix, matrices = families.block_prefix(model), families.family(model).matrices()
    return {
        f"{prefix}{i}.{name}.weight": families.matrix_weight(block, name)
        for i, block in enumerate(families.blocks(model))
        for name in matrices
    }


@torch.no_grad()
def magnitude_prune(model: PreTrainedModel, fraction: float) -> Masks:
    """Zero exactly round(fraction * N) of the N block weights, the smallest |w| over all blocks together.

    Global rather than per matrix: layers differ in how much they can lose. Ties at the threshold are broken by
    position so that the count is exact. The zeros are the weights themselves (no mask modules are left behind).
    """
    mats = block_matrices(model)
    magnitudes = torch.cat([w.detach().abs().flatten() for w in mats.values()])
    k = round(fraction * magnitudes.numel())
    if k == 0:
        return {name: torch.ones_like(w) for name, w in mats.items()}
    threshold = torch.kthvalue(magnitudes, k).values
    ties_left = k - int((magnitudes < threshold).sum())  # how many weights equal to the threshold go too
    masks = {}
    for name, w in mats.items():
        drop = w.abs() < threshold
        tied = (w.abs() == threshold).flatten().nonzero().squeeze(1)[:ties_left]
        drop.view(-1)[tied] = True
        ties_left -= len(tied)
        w.masked_fill_(drop, 0.0)
        masks[name] = (~drop).to(w.dtype)
    return masks


def sparsity(model: PreTrainedModel) -> float:
    """Fraction of exact zeros over the block matrices (the scope of magnitude pruning)."""
    mats = block_matrices(model).values()
    return sum(int((w == 0).sum()) for w in mats) / sum(w.numel() for w in mats)


def _value_rows(model: PreTrainedModel, block: nn.Module, unit: int) -> torch.Tensor:
    """The value-projection weights of one unit, (rows, width), whatever the q/k/v layout."""
    fam, hd = families.family(model), families.head_dim(model)
    name, _, dim, idx = unit_weight_slice(model, [unit], fam.attn_in[-1])  # v_proj, or the fused q/k/v matrix
    w = families.matrix_weight(block, name).index_select(dim, idx.to(block.get_submodule(name).weight.device))
    w = w.t() if dim == 1 else w  # Conv1D (in, out) -> (out, in)
    if fam.fused_qkv == "blocked":  # the unit's rows of [q | k | v]: the last third
        return w[2 * len(idx) // 3 :]
    if fam.fused_qkv == "per_head":  # [q_h | k_h | v_h] per head
        return w.reshape(-1, 3, hd, w.shape[-1])[:, 2].flatten(0, 1)
    return w


@torch.no_grad()
def head_importance(model: PreTrainedModel, batches: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(layers, units) scores; the lowest are pruned first.

    With batches: the mean L2 norm of each unit's contribution to the residual stream (its heads' attention output
    times their inputs of the output projection), which is what removing the unit takes away (model/importance.py,
    the criterion of the width cuts too). Without data: the
    product of the Frobenius norms of the unit's value rows and output-projection inputs, a bound of that
    contribution's scale.
    """
    fam, n_layer = families.family(model), families.depth(model)
    n_units, per = families.head_units(model)
    if not batches:
        scores = torch.zeros(n_layer, n_units)
        for i, block in enumerate(families.blocks(model)):
            w_o = families.matrix_weight(block, fam.attn_out)
            for u in range(n_units):
                _, _, dim, idx = unit_weight_slice(model, [u], fam.attn_out)
                o_norm = w_o.index_select(dim, idx.to(w_o.device)).norm()
                scores[i, u] = float(_value_rows(model, block, u).norm() * o_norm)
        return scores
    return measure(model, batches).units


def choose_heads(importance: torch.Tensor, n: int, unit: str = "heads") -> dict[int, list[int]]:
    """The n least important units, skipping any that would leave its layer with none; `unit` names them."""
    n_layer, n_unit = importance.shape
    most = n_layer * (n_unit - 1)
    if n > most:
        raise ConfigError(
            f"prune: heads:{n} asks for {n} of {n_layer * n_unit} {unit}, but every layer keeps one; use heads:{most}"
            " at most"
        )
    chosen: dict[int, list[int]] = {}
    for flat in torch.argsort(importance.flatten(), stable=True).tolist():
        layer, head = divmod(flat, n_unit)
        if len(chosen.get(layer, [])) < n_unit - 1:
            chosen.setdefault(layer, []).append(head)
            n -= 1
        if n == 0:
            break
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


@torch.no_grad()
def mask_heads(model: PreTrainedModel, heads: dict[int, list[int]]) -> Masks:
    """Zero the given units at full shape and record them in the config; refuses to empty a layer.

    The masks cover every recorded unit, those of an earlier pruning too, so that healing revives none of them.
    """
    n_layer, (n_unit, _), word = families.depth(model), families.head_units(model), unit_name(model)
    recorded = {k: set(v) for k, v in pruned_units(model).items()}
    for layer, units in heads.items():
        if not 0 <= layer < n_layer or any(not 0 <= u < n_unit for u in units):
            raise ConfigError(
                f"prune: {word} {layer}:{units} is outside {n_layer} layers x {n_unit} {word}; pick within"
            )
        recorded[layer] = recorded.get(layer, set()) | set(units)
        if len(recorded[layer]) >= n_unit:
            raise ConfigError(f"prune: layer {layer} would lose all its {n_unit} {word}; keep at least one per layer")
    prefix, blocks, masks = families.block_prefix(model), families.blocks(model), {}
    for layer, units in sorted(recorded.items()):
        for name, kind, dim, idx in families.unit_slices(model, sorted(units)):
            tensor = getattr(blocks[layer].get_submodule(name), kind, None)
            if tensor is None:  # no bias
                continue
            idx = idx.to(tensor.device)
            tensor.index_fill_(dim, idx, 0.0)
            masks.setdefault(f"{prefix}{layer}.{name}.{kind}", torch.ones_like(tensor)).index_fill_(dim, idx, 0.0)
    setattr(model.config, HEADS_KEY, {str(k): sorted(v) for k, v in sorted(recorded.items())})
    return masks


def heal(
    model: PreTrainedModel,
    teacher: PreTrainedModel,
    masks: Masks,
    data: str,
    tokenizer_dir: str | Path,
    steps: int,
    workdir: str | Path,
) -> dict[str, Any]:
    """A short KD from the unpruned model (frozen) into the pruned one, on `data`; pruned weights stay exactly 0.

    Gradients of pruned weights are masked, so AdamW's moments for them stay 0 and so do their updates (decoupled
    weight decay keeps a 0 at 0). The loop, losses and schedule are the `distil` verb's; its files land in workdir.
    """
    cfg = build_config(
        DistilConfig,
        {
            "data": data,
            "out": str(workdir),
            "teacher": "unpruned",
            "student": "pruned",
            "max_steps": steps,
            "warmup_steps": max(1, steps // 10),
            "lr": 1e-4,
            "seq_len": min(256, families.context(model)),
            "batch_size": 8,
            "eval_every": 0,
            "save_every": 0,
            "tensorboard": False,
            "pad_vocab": 1,  # the masks and hooks hold these very parameters: no padding may replace them
        },
    )
    params = dict(model.named_parameters())
    hooks = [params[name].register_hook(lambda g, m=m: g * m.to(g.device)) for name, m in masks.items()]
    try:
        trainer = Trainer(cfg, setup_runtime(cfg), model, ensure_shards(data, tokenizer_dir), teacher=teacher)
        unpruned, pruned = trainer.evaluate(teacher)["dev_loss"], trainer.evaluate(model)["dev_loss"]
        metrics = trainer.fit()
    finally:
        for h in hooks:
            h.remove()
    model.cpu().eval()
    return {
        "dev_loss_unpruned": unpruned,
        "dev_loss_pruned": pruned,
        "dev_loss_healed": metrics["dev_loss"],
        "steps": metrics["steps"],
        "seconds": metrics["seconds"],
    }


def dev_batches(data: str, tokenizer_dir: str | Path, seq_len: int, n: int = 4, batch: int = 8) -> list[torch.Tensor]:
    """A few fixed dev windows for head importance (the same windows every run)."""
    shard = TokenShard(ensure_shards(data, tokenizer_dir), "dev")
    gen = torch.Generator().manual_seed(0)
    return [shard.random_batch(batch, seq_len, gen)[0] for _ in range(n)]


def parse_prune(spec: str) -> tuple[str, float]:
    """'magnitude:0.3' -> ('magnitude', 0.3); 'heads:4' -> ('heads', 4.0); CompressConfig has checked the values."""
    kind, _, value = spec.partition(":")
    if kind not in ("magnitude", "heads"):
        raise ConfigError(f"prune: {spec!r} is not a pruning spec; use magnitude:0.3 or heads:N")
    return kind, float(value)
