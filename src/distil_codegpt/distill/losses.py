"""Knowledge-distillation losses for causal-LM students (the DistilBERT / DistilGPT2 recipe).

    loss = alpha_ce * KL(teacher_T || student_T) * T^2 + alpha_clm * CE + alpha_cos * (1 - cos) + alpha_mse * MSE

Every term is averaged over the tokens whose label is not ``IGNORE_INDEX``, so padding and masked positions
count nowhere. All terms go through one helper, :func:`_unmasked_rows`, which flattens ``[B, T, D]`` to the
``[N, D]`` rows of the unmasked tokens: padding then costs no compute, and a later memory-lean variant can
chunk those rows without touching the maths. Logits arrive already aligned (position t predicts token t + 1);
shifting is the caller's job, because only the caller knows whether its labels were shifted already.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _unmasked_rows(labels: Tensor, *tensors: Tensor) -> list[Tensor]:
    """Keep the rows of the tokens that count, floating ones upcast to at least fp32.

    Softmax and squared errors over a 50k vocab lose too much in bf16/fp16, hence the upcast (fp64 stays fp64
    so gradcheck can run). An all-masked batch gives ``[0, D]`` rows, whose sum is a 0 that still has a
    ``grad_fn``, so ``loss.backward()`` works on it like on any other batch.

    Args:
        labels (Tensor): ``[B, T]`` token ids, ``IGNORE_INDEX`` where the position must not count.
        *tensors (Tensor): each ``[B, T, D]`` (D may differ between them; integer tensors keep their dtype).

    Returns:
        list[Tensor]: ``[N, D]`` per input, N = number of unmasked tokens, same row order for all.
    """
    for t in tensors:
        if t.shape[:-1] != labels.shape:
            raise ValueError(
                f"tensor of shape {tuple(t.shape)} does not match labels {tuple(labels.shape)}: "
                "pass [B, T, D] tensors with labels [B, T] from the same (already shifted) batch"
            )
    keep = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    rows = []
    for t in tensors:
        flat = t.reshape(-1, t.size(-1)).index_select(0, keep)
        rows.append(flat.to(torch.promote_types(flat.dtype, torch.float32)) if flat.is_floating_point() else flat)
    return rows


def _token_mean(per_token: Tensor) -> Tensor:
    """Average ``[N]`` per-token losses; 0 (graph kept) when N == 0 instead of the NaN of ``mean()``."""
    return per_token.sum() / max(per_token.numel(), 1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 2.0) -> Tensor:
    """KL(p_teacher || p_student) on temperature-softened distributions, times T^2 (Hinton et al., 2015).

    The T^2 factor keeps the gradient scale (T * (p_s - p_t) / N per logit) comparable to the CE term's
    as T changes, so alpha_ce need not be retuned with T. The teacher is detached: its soft targets are
    constants for the student, even when the teacher trains in the same step.

    Args:
        student_logits (Tensor): ``[B, T, V]``.
        teacher_logits (Tensor): ``[B, T, V]``, same vocabulary as the student.
        labels (Tensor): ``[B, T]``, ``IGNORE_INDEX`` for positions that must not count.
        temperature (float): T > 0; higher T exposes more of the teacher's ranking of wrong tokens.

    Returns:
        Tensor: scalar, KL summed over V, averaged over unmasked tokens, times T^2; 0 if all are masked.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}: use 1.0 for plain KL, 2.0 as in DistilBERT")
    if student_logits.size(-1) != teacher_logits.size(-1):
        raise ValueError(
            f"student vocab {student_logits.size(-1)} != teacher vocab {teacher_logits.size(-1)}: "
            "distil with the teacher's tokenizer, or set alpha_ce=0 and alpha_mse=0"
        )
    student, teacher = _unmasked_rows(labels, student_logits, teacher_logits.detach())
    log_p_s = F.log_softmax(student / temperature, dim=-1)
    p_t = F.softmax(teacher / temperature, dim=-1)
    # kl_div uses xlogy, so teacher probabilities of exactly 0 (e.g. -inf logits) give 0, not NaN.
    per_token = F.kl_div(log_p_s, p_t, reduction="none").sum(-1)  # [N]
    return _token_mean(per_token) * temperature**2


def clm_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Causal-LM cross-entropy against the true next tokens, which keeps the student anchored to the data.

    Args:
        student_logits (Tensor): ``[B, T, V]``.
        labels (Tensor): ``[B, T]`` next-token ids, ``IGNORE_INDEX`` for positions that must not count.

    Returns:
        Tensor: scalar, CE averaged over unmasked tokens; 0 if all are masked.
    """
    student, targets = _unmasked_rows(labels, student_logits, labels.unsqueeze(-1))
    return _token_mean(F.cross_entropy(student, targets.squeeze(1), reduction="none"))


def cosine_loss(
    student_hidden: Tensor | Sequence[Tensor], teacher_hidden: Tensor | Sequence[Tensor], labels: Tensor
) -> Tensor:
    """Mean of (1 - cosine similarity) between student and teacher hidden states, per token.

    This is what ``nn.CosineEmbeddingLoss`` with target 1 computes per token: it aligns the directions of
    the student's states with the teacher's, and ignores their norms. Several mapped layers may be given as
    lists (student layer i paired with teacher layer i); the result is the mean over the pairs.

    Args:
        student_hidden (Tensor | Sequence[Tensor]): ``[B, T, H]`` or a list of them.
        teacher_hidden (Tensor | Sequence[Tensor]): same structure and H as the student's; detached here.
        labels (Tensor): ``[B, T]``, ``IGNORE_INDEX`` for positions that must not count.

    Returns:
        Tensor: scalar in [0, 2]; 0 if all tokens are masked.
    """
    students = [student_hidden] if isinstance(student_hidden, Tensor) else list(student_hidden)
    teachers = [teacher_hidden] if isinstance(teacher_hidden, Tensor) else list(teacher_hidden)
    if not students or len(students) != len(teachers):
        raise ValueError(
            f"got {len(students)} student and {len(teachers)} teacher hidden states: pass one teacher layer per "
            "student layer (at least one pair)"
        )
    losses = []
    for s, t in zip(students, teachers):
        if s.size(-1) != t.size(-1):
            raise ValueError(
                f"student hidden size {s.size(-1)} != teacher hidden size {t.size(-1)}: cosine needs equal widths; "
                "build the student with the teacher's n_embd, or set alpha_cos=0"
            )
        s_rows, t_rows = _unmasked_rows(labels, s, t.detach())
        losses.append(_token_mean(1.0 - F.cosine_similarity(s_rows, t_rows, dim=-1)))
    return torch.stack(losses).mean()


def mse_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """Mean squared error between student and teacher logits: mean over V, then over unmasked tokens.

    DistilBERT used ``MSELoss(reduction="sum") / n_tokens``, i.e. summed over V. We take the mean over V so
    that alpha_mse means the same thing for any vocabulary size; multiply alpha_mse by V to match DistilBERT.

    Args:
        student_logits (Tensor): ``[B, T, V]``.
        teacher_logits (Tensor): ``[B, T, V]``; detached here.
        labels (Tensor): ``[B, T]``, ``IGNORE_INDEX`` for positions that must not count.

    Returns:
        Tensor: scalar; 0 if all tokens are masked.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}: "
            "distil with the teacher's tokenizer, or set alpha_mse=0"
        )
    student, teacher = _unmasked_rows(labels, student_logits, teacher_logits.detach())
    return _token_mean((student - teacher).pow(2).mean(-1))


@dataclass
class LossWeights:
    """Weights of the distillation terms; a weight of 0 switches its term off (it is not computed)."""

    alpha_ce: float = 5.0
    """KL to the teacher's softened distribution (DistilBERT: 5.0)."""
    alpha_clm: float = 2.0
    """Cross-entropy on the true next tokens (DistilBERT's MLM weight: 2.0)."""
    alpha_cos: float = 1.0
    """1 - cosine on hidden states; needs student and teacher of equal width."""
    alpha_mse: float = 0.0
    """MSE on logits; off by default, as in DistilBERT."""
    temperature: float = 2.0
    """Softmax temperature for the KL term."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}: use 0 to switch a term off")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}: use 1.0 for plain KL")
        if not any((self.alpha_ce, self.alpha_clm, self.alpha_cos, self.alpha_mse)):
            raise ValueError("all loss weights are 0: set at least one of alpha_ce, alpha_clm, alpha_cos, alpha_mse")


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    weights: LossWeights,
    student_hidden: Tensor | Sequence[Tensor] | None = None,
    teacher_hidden: Tensor | Sequence[Tensor] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the distillation terms, plus each term's value for logging.

    Terms whose weight is 0 are skipped entirely, so e.g. with alpha_cos=0 the caller need not ask the
    models for hidden states at all.

    Args:
        student_logits (Tensor): ``[B, T, V]``, aligned with ``labels`` (position t predicts token t + 1).
        teacher_logits (Tensor): ``[B, T, V]``; treated as constants.
        labels (Tensor): ``[B, T]``, ``IGNORE_INDEX`` for padding / masked positions.
        weights (LossWeights): alphas and temperature.
        student_hidden (Tensor | Sequence[Tensor] | None): ``[B, T, H]`` (or a list); needed iff alpha_cos > 0.
        teacher_hidden (Tensor | Sequence[Tensor] | None): same structure as ``student_hidden``.

    Returns:
        tuple[Tensor, dict[str, float]]: the scalar loss to backprop, and the unweighted value of each
        computed term ("kd", "clm", "cos", "mse"; skipped terms are absent) plus the total under "loss".
    """
    terms: dict[str, tuple[float, Tensor]] = {}
    if weights.alpha_ce > 0:
        terms["kd"] = (weights.alpha_ce, kd_loss(student_logits, teacher_logits, labels, weights.temperature))
    if weights.alpha_clm > 0:
        terms["clm"] = (weights.alpha_clm, clm_loss(student_logits, labels))
    if weights.alpha_cos > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError(
                f"alpha_cos={weights.alpha_cos} needs student_hidden and teacher_hidden: run both models with "
                "output_hidden_states=True, or set alpha_cos=0"
            )
        terms["cos"] = (weights.alpha_cos, cosine_loss(student_hidden, teacher_hidden, labels))
    if weights.alpha_mse > 0:
        terms["mse"] = (weights.alpha_mse, mse_loss(student_logits, teacher_logits, labels))
    total = sum(alpha * value for alpha, value in terms.values())
    # One device sync for all the logged values instead of one .item() per term.
    logged = torch.stack([value.detach() for _, value in terms.values()] + [total.detach()]).tolist()
    return total, dict(zip([*terms, "loss"], logged))
