"""How much each width unit of a model carries, measured on calibration windows (forward passes only).

Minitron (Muralidharan et al. 2024, arXiv 2407.14679) ranks MLP neurons, attention heads and embedding channels by
activation magnitude over ~1k calibration samples and finds it as good as gradient criteria at a fraction of the
cost. We score each unit by what removing it takes away from the residual stream, which is Minitron's activation
criterion weighted by the unit's output weights:

- MLP neuron i of a block: mean over tokens of |a_i| * ||W_down[:, i]||, the norm of the neuron's contribution to
  the block's output (a_i is the down projection's input). Minitron's plain |a_i| would keep a neuron whose output
  column is zero; this score is 0 for it, so cutting it leaves the logits exactly as they were.
- Head unit u (one head, or one KV group with its query heads under grouped-query attention): mean over tokens of
  the norm of the unit's share of the attention output after the output projection (compress/prune scores heads
  the same way).
- Hidden channel c: mean over tokens of |norm(x)_c| summed over every norm of the model (Minitron's embedding
  channel criterion), read at the norms' outputs. Alongside, each norm's mean input energy per channel, so that a
  cut can rescale the RMSNorm weights for the energy it removes (model/shape.py).

Tokens are averaged over every position of every window.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from distil_codegpt.model import families


@dataclass
class Importance:
    ffn: torch.Tensor  # (layers, ffn width)
    units: torch.Tensor  # (layers, head units)
    hidden: torch.Tensor  # (hidden,)
    norm_energy: dict[str, torch.Tensor]  # norm module name -> (hidden,) mean x_c^2 of its input
    tokens: int


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalisation over the hidden size (RMSNorm / LayerNorm of any family), by module name."""
    width = families.width(model)
    return {
        name: m
        for name, m in model.named_modules()
        if type(m).__name__.endswith(("RMSNorm", "LayerNorm"))
        and getattr(m, "weight", None) is not None
        and m.weight.shape == (width,)
    }


def _weight_in_out(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The weight as (out, in), whatever the storage (nn.Linear (out, in), Conv1D (in, out))."""
    return module.weight.t() if conv1d else module.weight


@torch.inference_mode()
def measure(model: nn.Module, batches: Iterable[torch.Tensor]) -> Importance:
    """Every width score of `model` over `batches` of token ids (B, T), in one forward pass per batch."""
    fam = families.family(model)
    blocks = families.blocks(model)
    n_layer, (n_units, per), hd = len(blocks), families.head_units(model), families.head_dim(model)
    width = families.width(model)
    ffn = torch.zeros(n_layer, families.ffn_width(model), dtype=torch.float64)
    units = torch.zeros(n_layer, n_units, dtype=torch.float64)
    hidden = torch.zeros(width, dtype=torch.float64)
    norms = norm_modules(model)
    energy = {name: torch.zeros(width, dtype=torch.float64) for name in norms}
    handles = []

    def mlp_hook(i: int, down: nn.Module):  # noqa: ANN202
        col_norms = _weight_in_out(down, fam.conv1d).float().norm(dim=0).double()  # (ffn,)

        def pre(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].reshape(-1, args[0].size(-1)).float()
            ffn[i] += a.abs().sum(0).double() * col_norms

        return pre

    def attn_hook(i: int, out_proj: nn.Module):  # noqa: ANN202
        w = _weight_in_out(out_proj, fam.conv1d).float().t().reshape(n_units, per * hd, -1)  # (units, per*hd, e)

        def pre(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, n_units, per * hd).float()  # (N, units, per*hd)
            units[i] += torch.einsum("nud,ude->nue", x, w).norm(dim=-1).sum(0).double()

        return pre

    def norm_hooks(name: str):  # noqa: ANN202
        def pre(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            energy[name] += args[0].reshape(-1, width).float().pow(2).sum(0).double()

        def post(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            hidden.add_(out.reshape(-1, width).float().abs().sum(0).double())

        return pre, post

    for i, block in enumerate(blocks):
        down = block.get_submodule(fam.mlp[-1])
        out_proj = block.get_submodule(fam.attn_out)
        handles.append(down.register_forward_pre_hook(mlp_hook(i, down)))
        handles.append(out_proj.register_forward_pre_hook(attn_hook(i, out_proj)))
    for name, m in norms.items():
        pre, post = norm_hooks(name)
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        device = next(model.parameters()).device
        for x in batches:
            model(input_ids=x.to(device), use_cache=False, logits_to_keep=1)  # the scores need no logits
            tokens += x.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no calibration windows to measure importance on")
    return Importance(
        ffn=(ffn / tokens).float(),
        units=(units / tokens).float(),
        hidden=(hidden / tokens).float(),
        norm_energy={k: (v / tokens).float() for k, v in energy.items()},
        tokens=tokens,
    )
