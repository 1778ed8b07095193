"""Data-driven layer selection: which of the teacher's blocks a shallower student should keep.

Both scores come from the residual stream x^0 .. x^N of the teacher on dev windows, where x^i is the input of
block i and x^N the output of the last block (before the final norm), read by hooks on the blocks.

- Block Influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean over tokens of cos(x^i, x^{i+1}). A block that
  barely turns the hidden state (BI near 0) is the cheapest to remove; `influence` keeps the k blocks of highest BI.
- Angular distance (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"):
  d(l, n) = mean over tokens of arccos(cos(x^l, x^{l+n})) / pi. `angular` drops the contiguous run of n = N - k
  blocks l .. l+n-1 whose input and output are closest, never the last block (they found the final block
  indispensable), so l + n <= N - 1.

Tokens are averaged over every position of every window (the papers use the last token or all tokens; all gives
a steadier estimate from few windows).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from distil_codegpt.model import families


def residual_stream(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """x^0 .. x^N of `model` on token ids x (B, T): each block's input, then the last block's output (before the
    final norm), each (B, T, H). Runs under the caller's grad mode."""
    blocks = families.blocks(model)
    n = len(blocks)
    states: list[torch.Tensor | None] = [None] * (n + 1)

    def grab_input(i: int):  # noqa: ANN202
        def hook(_module, args, kwargs):  # noqa: ANN001, ANN202
            states[i] = args[0] if args else kwargs["hidden_states"]

        return hook

    def grab_output(_module, _args, output):  # noqa: ANN001, ANN202
        states[n] = output[0] if isinstance(output, tuple) else output

    handles = [b.register_forward_pre_hook(grab_input(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(grab_output))
    try:
        model(input_ids=x, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return states  # type: ignore[return-value]


@torch.inference_mode()
def residual_cosines(model: nn.Module, batches: Iterable[torch.Tensor], n_gap: int | None) -> dict[str, torch.Tensor]:
    """Mean cosines over tokens: "adjacent" (N,) between x^i and x^{i+1}; "gap" (N - n_gap + 1,) between x^l and
    x^{l+n_gap} (when n_gap is given)."""
    n = len(families.blocks(model))
    adjacent = torch.zeros(n, dtype=torch.float64)
    gap = torch.zeros(n - n_gap + 1, dtype=torch.float64) if n_gap else None
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            hs = [s.float().reshape(-1, s.size(-1)) for s in residual_stream(model, x)]  # each (B*T, H)
            tokens += hs[0].size(0)
            for i in range(n):
                adjacent[i] += nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1).double().sum()
            if gap is not None:
                for lo in range(n - n_gap + 1):
                    cos = nn.functional.cosine_similarity(hs[lo], hs[lo + n_gap], dim=-1).clamp(-1, 1)
                    gap[lo] += (torch.arccos(cos) / math.pi).double().sum()
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no dev windows to score the layers on")
    out = {"adjacent": adjacent / tokens}
    if gap is not None:
        out["gap"] = gap / tokens
    return out


def influence_pick(model: nn.Module, batches: Iterable[torch.Tensor], k: int) -> tuple[list[int], list[float]]:
    """(the k blocks of highest Block Influence, ascending; BI of every block)."""
    bi = 1.0 - residual_cosines(model, batches, None)["adjacent"]
    keep = sorted(torch.topk(bi, k).indices.tolist())
    return keep, [round(float(v), 6) for v in bi]


def angular_pick(model: nn.Module, batches: Iterable[torch.Tensor], k: int) -> tuple[list[int], list[float]]:
    """(the blocks kept after dropping the closest run of N - k blocks that spares the last; d(l, N - k) for
    every allowed start l)."""
    n = len(families.blocks(model))
    drop = n - k
    if drop == 0:
        return list(range(n)), []
    dist = residual_cosines(model, batches, drop)["gap"][: n - drop]  # starts l with l + drop <= n - 1
    lo = int(torch.argmin(dist))
    keep = [i for i in range(n) if not lo <= i < lo + drop]
    return keep, [round(float(v), 6) for v in dist]
