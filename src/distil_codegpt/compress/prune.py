"""Pruning of GPT-2 models: global magnitude (unstructured) and attention heads (structured), with optional healing.

Transformers 5 dropped `prune_heads` and the `pruned_heads` config field, and its GPT2Attention takes its head
count from the config, the same for every layer, so a model whose layers lost different heads cannot be loaded from
a directory with smaller matrices. A head-pruned model is therefore saved at full shape with the heads' weights
zeroed (q, k, v columns and biases, and the c_proj rows they feed: the head contributes exactly 0) and the heads
listed in config.json as `distil_pruned_heads`; `AutoModelForCausalLM` loads it with no code of ours and computes
the same function. `apply_pruned_heads` cuts the heads out of the matrices in memory (what our evaluate, complete
and int8 loaders do), so the smaller model also runs faster. The field is not named `pruned_heads`: transformers 4
would cut the heads at load time and then refuse the full-shape weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GPT2LMHeadModel

from distil_codegpt.config import ConfigError, DistilConfig, UserError, build_config

HEADS_KEY = "distil_pruned_heads"  # config.json: {"layer": [head, ...]}
# The matrices magnitude pruning ranks. Embeddings and layer norms are left alone; so is the LM head, because it is
# the input embedding (tied): zeroing its small entries would also erase parts of the token embeddings.
BLOCK_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

Masks = dict[str, torch.Tensor]  # parameter name -> 1 where the weight lives, 0 where it was pruned


def block_matrices(model: GPT2LMHeadModel) -> dict[str, nn.Parameter]:
    """The weight matrices of the transformer blocks, by parameter name."""
    return {
        f"transformer.h.{i}.{sub}.weight": block.get_submodule(sub).weight
        for i, block in enumerate(model.transformer.h)
        for sub in BLOCK_MATRICES
    }


@torch.no_grad()
def magnitude_prune(model: GPT2LMHeadModel, fraction: float) -> Masks:
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


def sparsity(model: GPT2LMHeadModel) -> float:
    """Fraction of exact zeros over the block matrices (the scope of magnitude pruning)."""
    mats = block_matrices(model).values()
    return sum(int((w == 0).sum()) for w in mats) / sum(w.numel() for w in mats)


def _head_dims(model: GPT2LMHeadModel) -> tuple[int, int, int]:
    c = model.config
    return c.n_layer, c.n_head, c.n_embd // c.n_head


@torch.no_grad()
def head_importance(model: GPT2LMHeadModel, batches: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(n_layer, n_head) scores; the lowest are pruned first.

    With batches: the mean L2 norm of each head's contribution to the residual stream (its attention output times
    its rows of c_proj), which is what removing the head takes away. Without data: the product of the Frobenius
    norms of the head's value columns and c_proj rows, an upper bound of that contribution's scale.
    """
    n_layer, n_head, hd = _head_dims(model)
    e = model.config.n_embd
    if not batches:
        scores = torch.zeros(n_layer, n_head)
        for i, block in enumerate(model.transformer.h):
            w_v = block.attn.c_attn.weight[:, 2 * e : 3 * e].reshape(e, n_head, hd)  # Conv1D: (in, out)
            w_o = block.attn.c_proj.weight.reshape(n_head, hd, e)
            scores[i] = w_v.norm(dim=(0, 2)) * w_o.norm(dim=(1, 2))
        return scores
    sums, count = torch.zeros(n_layer, n_head), 0

    def hook(i: int) -> Any:
        def pre(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            heads = args[0].reshape(*args[0].shape[:-1], n_head, hd)  # (B, T, H, hd)
            contrib = torch.einsum("bthd,hde->bthe", heads, module.weight.reshape(n_head, hd, e))
            sums[i] += contrib.norm(dim=-1).sum(dim=(0, 1)).cpu()

        return pre

    handles = [block.attn.c_proj.register_forward_pre_hook(hook(i)) for i, block in enumerate(model.transformer.h)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for x in batches:
            model(input_ids=x.to(device))
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums / count


def choose_heads(importance: torch.Tensor, n: int) -> dict[int, list[int]]:
    """The n least important heads, skipping any that would leave its layer with no head."""
    n_layer, n_head = importance.shape
    most = n_layer * (n_head - 1)
    if n > most:
        raise ConfigError(
            f"prune: heads:{n} asks for {n} of {n_layer * n_head} heads, but every layer keeps one; use heads:{most}"
            " at most"
        )
    chosen: dict[int, list[int]] = {}
    for flat in torch.argsort(importance.flatten(), stable=True).tolist():
        layer, head = divmod(flat, n_head)
        if len(chosen.get(layer, [])) < n_head - 1:
            chosen.setdefault(layer, []).append(head)
            n -= 1
        if n == 0:
            break
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def _head_columns(heads: list[int], hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads]) if heads else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def mask_heads(model: GPT2LMHeadModel, heads: dict[int, list[int]]) -> Masks:
    """Zero the given heads at full shape and record them in the config; refuses to empty a layer."""
    n_layer, n_head, hd = _head_dims(model)
    e = model.config.n_embd
    recorded = {int(k): set(v) for k, v in (getattr(model.config, HEADS_KEY, None) or {}).items()}
    masks: Masks = {}
    for layer, hs in heads.items():
        if not 0 <= layer < n_layer or any(not 0 <= h < n_head for h in hs):
            raise ConfigError(f"prune: head {layer}:{hs} is outside {n_layer} layers x {n_head} heads; pick within")
        recorded[layer] = recorded.get(layer, set()) | set(hs)
        if len(recorded[layer]) >= n_head:
            raise ConfigError(f"prune: layer {layer} would lose all its {n_head} heads; keep at least one per layer")
        attn, cols = model.transformer.h[layer].attn, _head_columns(sorted(hs), hd)
        qkv = torch.cat([cols + s * e for s in range(3)])
        attn.c_attn.weight[:, qkv] = 0.0
        attn.c_attn.bias[qkv] = 0.0
        attn.c_proj.weight[cols, :] = 0.0
        for name, p in (("c_attn.weight", attn.c_attn.weight), ("c_attn.bias", attn.c_attn.bias)):
            masks[f"transformer.h.{layer}.attn.{name}"] = (p != 0).to(p.dtype)
        masks[f"transformer.h.{layer}.attn.c_proj.weight"] = (attn.c_proj.weight != 0).to(attn.c_proj.weight.dtype)
    setattr(model.config, HEADS_KEY, {str(k): sorted(v) for k, v in sorted(recorded.items())})
    return masks


@torch.no_grad()
def apply_pruned_heads(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Cut the heads listed in the config out of c_attn and c_proj (Conv1D, in memory); layers already cut are skipped.

    GPT2Attention splits q/k/v at `split_size` and infers the head count from the width, so shrinking the matrices
    and setting split_size and num_heads is all a layer needs to run with fewer heads.
    """
    n_layer, n_head, hd = _head_dims(model)
    e = model.config.n_embd
    for key, hs in (getattr(model.config, HEADS_KEY, None) or {}).items():
        attn = model.transformer.h[int(key)].attn
        if attn.num_heads != n_head:
            continue
        keep = _head_columns([h for h in range(n_head) if h not in set(hs)], hd).to(attn.c_attn.weight.device)
        qkv = torch.cat([keep + s * e for s in range(3)])
        attn.c_attn.weight = nn.Parameter(attn.c_attn.weight[:, qkv].clone())
        attn.c_attn.bias = nn.Parameter(attn.c_attn.bias[qkv].clone())
        attn.c_attn.nf = len(qkv)
        attn.c_proj.weight = nn.Parameter(attn.c_proj.weight[keep, :].clone())
        attn.c_proj.nx = len(keep)
        attn.num_heads, attn.split_size = n_head - len(hs), len(keep)
    return model


def heal(
    model: GPT2LMHeadModel,
    teacher: GPT2LMHeadModel,
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
    from distil_codegpt.data.shards import ensure_shards
    from distil_codegpt.distill.trainer import Trainer, setup_runtime

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
            "seq_len": min(256, model.config.n_positions),
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
    from distil_codegpt.data.shards import TokenShard, ensure_shards

    shard = TokenShard(ensure_shards(data, tokenizer_dir), "dev")
    gen = torch.Generator().manual_seed(0)
    return [shard.random_batch(batch, seq_len, gen)[0] for _ in range(n)]


def tokenizer_dir_of(model_dir: str | Path) -> Path:
    """The model directory, which must carry its tokenizer for --data (the corpus is tokenised with it)."""
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise UserError(
            f"model: {model_dir} has no tokenizer.json, which --data needs to tokenise the corpus; copy the tokenizer"
            " files the model was trained with into it"
        )
    return Path(model_dir)


def parse_prune(spec: str) -> tuple[str, float]:
    """'magnitude:0.3' -> ('magnitude', 0.3); 'heads:4' -> ('heads', 4.0); CompressConfig has checked the values."""
    kind, _, value = spec.partition(":")
    if kind not in ("magnitude", "heads"):
        raise ConfigError(f"prune: {spec!r} is not a pruning spec; use magnitude:0.3 or heads:N")
    return kind, float(value)
