"""Local (blockwise) distillation: every student block learns, on its own, what its part of the teacher does.

Puzzle's bypass distillation (Bercovich et al. 2024, arXiv 2411.19146) and LLM-Streamline (arXiv 2403.19135) train
each slimmed block to map the hidden state entering the teacher's part of the network onto the one leaving it,
before any global KD. Here student block i stands for the teacher's span of blocks s_i .. s_{i+1} - 1, where s_i is
the teacher block it was copied from (s_0 = 0 and s_k = N, so the spans tile the teacher):

    a width cut keeps every position: block i stands for teacher block i alone;
    a depth cut (blocks 0, 3, 7 of 10): the spans are 0-2, 3-6, 7-9.

One teacher forward gives the residual stream x^0 .. x^N for every block at once; one student forward, with each
block's input replaced by the teacher's x^{s_i} (detached), gives every block's output. No gradient crosses from
one block to the next, and none reaches the embeddings, the final norm or the head. A hidden-size cut reads the
teacher's states through the kept channels (config `distil_hidden_kept`).

Losses, per block, averaged over the blocks:
    nmse    ||f(x) - y||^2 / ||y - x||^2: the error against the teacher's update of the residual stream, so 1 is a
            block that does nothing and 0 the teacher's span exactly
    cosine  1 - cos(f(x), y), averaged over tokens
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from distil_codegpt.config import ConfigError
from distil_codegpt.model import families
from distil_codegpt.model.layer_scores import residual_stream
from distil_codegpt.runinfo import manifest_stage

LocalLoss = Literal["nmse", "cosine"]


def fresh_cut(student: str) -> bool:
    """Whether a student directory is a cut of a teacher straight from `distil-codegpt student` (its run.json says so
    and its config.json names the teacher blocks it came from, which the local stage needs), not yet trained: a hub
    id, any other model or a student already distilled gives False."""
    if manifest_stage(student) != "student":
        return False
    try:
        config = json.loads((Path(student).expanduser() / "config.json").read_text())
        return bool(config.get("distil_layer_map"))
    except (OSError, ValueError, AttributeError):
        return False


def block_spans(student: nn.Module, teacher_depth: int) -> list[tuple[int, int]]:
    """(first, end) teacher blocks each student block stands for; the spans tile 0 .. teacher_depth."""
    picked = getattr(student.config, "distil_layer_map", None)
    if not picked:
        raise ConfigError(
            "stage: local needs a student cut from this teacher by `distil-codegpt student` (its config.json names "
            "the teacher blocks it came from); build one with `distil-codegpt student --teacher ...`"
        )
    if max(picked) >= teacher_depth or len(picked) != families.depth(student):
        raise ConfigError(
            f"stage: the student's blocks came from teacher blocks {picked}, which a {teacher_depth}-block teacher "
            "does not have; pass the teacher the student was cut from"
        )
    starts = [0, *picked[1:]]
    return list(zip(starts, [*starts[1:], teacher_depth]))


def block_loss(out: torch.Tensor, target: torch.Tensor, start: torch.Tensor, kind: LocalLoss) -> torch.Tensor:
    """One block's loss: out, target and start (B, T, H), in fp32."""
    out, target = out.float(), target.float()
    if kind == "cosine":
        return 1.0 - nn.functional.cosine_similarity(out, target, dim=-1).mean()
    return (out - target).pow(2).sum() / (target - start.float()).pow(2).sum().clamp_min(1e-12)


class LocalStage:
    """The local stage's loss step: `stage(student_model, teacher_model, x)` -> (loss, logged parts)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, kind: LocalLoss = "nmse") -> None:
        self.student, self.kind = student, kind
        self.spans = block_spans(student, families.depth(teacher))
        kept = getattr(student.config, "distil_hidden_kept", None)
        self.kept = torch.tensor(kept, dtype=torch.long) if kept else None
        if self.kept is None and families.width(student) != families.width(teacher):
            raise ConfigError(
                f"stage: the student is {families.width(student)} wide and the teacher {families.width(teacher)}, "
                "but the student's config.json names no kept channels; cut it with `distil-codegpt student --hidden`"
            )

    def _channels(self, state: torch.Tensor) -> torch.Tensor:
        return state if self.kept is None else state.index_select(-1, self.kept.to(state.device))

    def __call__(self, s_model: nn.Module, t_model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        with torch.no_grad():
            states = [self._channels(s).detach() for s in residual_stream(t_model, x)]  # N + 1 x (B, T, H')
        blocks = families.blocks(self.student)
        outs: list[torch.Tensor | None] = [None] * len(blocks)

        def feed(i: int):  # noqa: ANN202
            def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                start = states[self.spans[i][0]]
                if args:
                    return (start, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": start}

            return pre

        def grab(i: int):  # noqa: ANN202
            def post(_m: nn.Module, _args: tuple, output: Any) -> None:
                outs[i] = output[0] if isinstance(output, tuple) else output

            return post

        handles = [b.register_forward_pre_hook(feed(i), with_kwargs=True) for i, b in enumerate(blocks)]
        handles += [b.register_forward_hook(grab(i)) for i, b in enumerate(blocks)]
        try:
            s_model(input_ids=x, use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        losses = torch.stack(
            [block_loss(outs[i], states[b], states[a], self.kind) for i, (a, b) in enumerate(self.spans)]
        )
        loss = losses.mean()
        return loss, {"loss": loss.item(), "local_worst": losses.max().item()}
