"""Knowledge-distillation losses for causal-LM students (the DistilBERT / DistilGPT2 recipe).

    loss = alpha_ce * D(p_T, q_T) * T^2 + alpha_clm * CE + alpha_cos * (1 - cos) + alpha_mse * MSE

D is the KD divergence (`divergence`) between the teacher's distribution p = p_T and the student's q = q_T, both
softmaxes at temperature T, named as in torchtune (ForwardKLLoss, ReverseKLLoss) and TRL (GKD):

    forward  KL(p || q) = sum_i p_i (log p_i - log q_i)   Hinton's KD, mean-seeking: q must cover all of p's mass
    reverse  KL(q || p)                                   MiniLLM, mode-seeking: q may drop p's small modes
    jsd      beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,  beta = 0.5 (`JSD_BETA`)
             TRL's GKD generalised Jensen-Shannon divergence; at beta = 0.5 symmetric in p and q, and at most log 2

Outcomes of probability 0 under the first distribution of a KL add 0 (0 log 0 = 0). Reverse KL is infinite where the
teacher gives probability 0 to a token the student does not (a teacher logit of -inf); forward KL and jsd stay finite.

Every term is averaged over the tokens whose label is not ``IGNORE_INDEX``, so padding and masked positions
count nowhere. All terms go through one helper, :func:`_unmasked_rows`, which flattens ``[B, T, D]`` to the
``[N, D]`` rows of the unmasked tokens: padding then costs no compute, and a later memory-lean variant can
chunk those rows without touching the maths. Logits arrive already aligned (position t predicts token t + 1);
shifting is the caller's job, because only the caller knows whether its labels were shifted already.

Two ways to the same numbers. The plain functions (`kd_loss`, `clm_loss`, ..., `distillation_loss`) take full
``[B, T, V]`` logits. `head_loss` takes the final hidden states and the LM-head matrix instead and never builds
the full logits: it walks the tokens in chunks, and for each chunk computes the logits, the loss terms and their
gradient at once (the chunk's logits are freed before the next one), like fused "linear + cross-entropy" kernels.
Its values and gradients equal the plain ones (tests compare them); at a 50k vocabulary it is what makes a batch
of 16 x 1024 tokens fit. The per-row formulas (`_kd_rows`, `_ce_rows`, ...) are shared by both ways, and every
divergence is one formula on log-probabilities (`_divergence_rows`) for full vocabularies and buckets alike.

Offline KD (`SparseTargets`, from a teacher cache) knows only the teacher's top-k log-probs and the log of the
remaining tail mass. Its divergence is taken over k + 1 buckets, the k tokens and "any other token", e.g.

    KL_k = sum_{i in top-k + tail} p_i (log p_i - log q_i)

where q_tail is the student's probability of all non-top-k tokens; reverse and jsd are taken over the same buckets.
At T = 1 the teacher's buckets are exact; at T != 1 each top-k log-prob is divided by T and the tail mass is assumed
spread evenly over the V - k other tokens (each (tail / (V - k))^(1/T) before renormalising over the k + 1 buckets).
At T = 1, D_k <= the full D for all three divergences (merging outcomes never raises an f-divergence), and the
gradient pushes the student's top-k probabilities to the teacher's and its tail mass, as a whole, to the teacher's.

A student with a trimmed head (compress/trim.py) can only give probability to its kept ids. Every logit term takes
`kept` (``[V]`` bool) for it: both softmaxes are taken over the kept ids alone, i.e. the teacher's distribution is
renormalised over them, p'_i = p_i / sum_{j kept} p_j (its logits set to -inf elsewhere), and so is the student's;
CE skips (adds 0 for) a position whose true next token is not kept, and MSE compares the kept columns only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
Divergence = Literal["forward", "reverse", "jsd"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
JSD_BETA = 0.5  # TRL's GKD default: the symmetric Jensen-Shannon divergence


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


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float = 2.0,
    divergence: Divergence = "forward",
    kept: Tensor | None = None,
) -> Tensor:
    """A divergence between temperature-softened teacher and student distributions, times T^2 (Hinton et al., 2015).

    The T^2 factor keeps the gradient scale (for forward KL, T * (p_s - p_t) / N per logit) comparable to the CE
    term's as T changes, so alpha_ce need not be retuned with T. The teacher is detached: its soft targets are
    constants for the student, even when the teacher trains in the same step.

    Args:
        student_logits (Tensor): ``[B, T, V]``.
        teacher_logits (Tensor): ``[B, T, V]``, same vocabulary as the student.
        labels (Tensor): ``[B, T]``, ``IGNORE_INDEX`` for positions that must not count.
        temperature (float): T > 0; higher T exposes more of the teacher's ranking of wrong tokens.
        divergence (str): forward KL(p || q), reverse KL(q || p) or jsd (definitions in the module docstring).
        kept (Tensor | None): ``[V]`` bool, the ids a trimmed student head keeps: both distributions are taken
            over them alone (the teacher's renormalised). None = the whole vocabulary.

    Returns:
        Tensor: scalar, the divergence over V, averaged over unmasked tokens, times T^2; 0 if all are masked.
    """
    _check_kd(temperature, divergence)
    if student_logits.size(-1) != teacher_logits.size(-1):
        raise ValueError(
            f"student vocab {student_logits.size(-1)} != teacher vocab {teacher_logits.size(-1)}: "
            "distil with the teacher's tokenizer, or set alpha_ce=0 and alpha_mse=0"
        )
    student, teacher = _unmasked_rows(labels, student_logits, teacher_logits.detach())
    return _token_mean(_kd_rows(student, teacher, temperature, divergence, kept))


def _check_kd(temperature: float, divergence: str) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}: use 1.0 for plain KL, 2.0 as in DistilBERT")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {divergence!r}")


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``[N, C]`` log-probs -> ``[N]`` KL(a || b). Outcomes with a = 0 add 0, and 0 to the gradient, instead of
    0 * (-inf) = NaN: the difference is masked before the product, so no NaN reaches backward either."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def _divergence_rows(log_p: Tensor, log_q: Tensor, divergence: str) -> Tensor:
    """``[N, C]`` log-probs of the teacher (p) and the student (q) over C outcomes -> ``[N]`` divergences.

    The one formula behind every KD term: C is the vocabulary (online KD) or the k + 1 buckets (teacher cache).
    """
    if divergence == "forward":
        return _kl_rows(log_p, log_q)
    if divergence == "reverse":
        return _kl_rows(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(JSD_BETA), log_q + math.log(1 - JSD_BETA))
    return JSD_BETA * _kl_rows(log_p, log_m) + (1 - JSD_BETA) * _kl_rows(log_q, log_m)


def _restrict(logits: Tensor, kept: Tensor | None) -> Tensor:
    """``[N, V]`` logits with -inf outside the kept ids (a softmax then renormalises over them); as is for None."""
    return logits if kept is None else logits.masked_fill(~kept[: logits.size(-1)], float("-inf"))


def _kd_rows(
    student: Tensor, teacher: Tensor, temperature: float, divergence: str, kept: Tensor | None = None
) -> Tensor:
    """``[N, V]`` fp32 logits of both -> ``[N]`` divergence at temperature T, times T^2 (over the kept ids)."""
    student, teacher = _restrict(student, kept), _restrict(teacher, kept)
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    return _divergence_rows(log_p, log_q, divergence) * temperature**2


@dataclass
class SparseTargets:
    """The teacher's top-k next-token log-probs (at T = 1) and the log of its remaining tail mass, per token."""

    ids: Tensor
    """``[B, T, k]`` int64 token ids, all below the vocabulary size."""
    logp: Tensor
    """``[B, T, k]`` their log-probs at temperature 1."""
    tail: Tensor
    """``[B, T]`` log(1 - sum of the top-k probabilities); -inf when k covers the whole vocabulary."""


def sparse_kd_loss(
    student_logits: Tensor,
    targets: SparseTargets,
    labels: Tensor,
    temperature: float = 2.0,
    divergence: Divergence = "forward",
) -> Tensor:
    """A divergence over the teacher's top-k tokens plus one tail bucket, times T^2 (see the module docstring).

    Args:
        student_logits (Tensor): ``[B, T, V]``; V is the real vocabulary (the tail spreads over V - k tokens).
        targets (SparseTargets): the teacher's cached top-k, ``[B, T, k]``, and tail ``[B, T]``.
        labels (Tensor): ``[B, T]``, ``IGNORE_INDEX`` for positions that must not count.
        temperature (float): T > 0.
        divergence (str): forward, reverse or jsd, over the k + 1 buckets.

    Returns:
        Tensor: scalar, averaged over unmasked tokens; 0 if all are masked.
    """
    _check_kd(temperature, divergence)
    student, ids, logp, tail = _unmasked_rows(
        labels, student_logits, targets.ids, targets.logp, targets.tail.unsqueeze(-1)
    )
    return _token_mean(_sparse_kd_rows(student, ids, logp, tail.squeeze(1), temperature, divergence))


def _sparse_kd_rows(
    student: Tensor, ids: Tensor, logp: Tensor, tail: Tensor, temperature: float, divergence: str
) -> Tensor:
    """``[N, V]`` student logits, ``[N, k]`` teacher ids and log-probs, ``[N]`` log tail mass -> ``[N]`` D_k * T^2."""
    vocab, k = student.size(-1), ids.size(-1)
    if k > vocab or (ids.numel() and int(ids.max()) >= vocab):
        raise ValueError(
            f"teacher cache ids reach {int(ids.max()) if ids.numel() else 0} with k={k}, beyond the student's"
            f" vocabulary of {vocab}: rebuild the cache with this student's teacher"
        )
    t = temperature
    log_q = F.log_softmax(student / t, dim=-1)  # [N, V]
    log_q_top = log_q.gather(-1, ids)  # [N, k]
    log_p = tempered_buckets(logp, tail, t, vocab)  # [N, k] or [N, k + 1]
    if k == vocab:  # no tail bucket: the top-k is the whole distribution
        log_qb = log_q_top
    else:
        log_q_tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # [N, 1]
        log_qb = torch.cat([log_q_top, log_q_tail], -1)
    return _divergence_rows(log_p, log_qb, divergence) * t**2


def tempered_buckets(logp: Tensor, tail: Tensor, temperature: float, vocab: int) -> Tensor:
    """The teacher's cached target at `temperature` as log-probs over its k + 1 buckets (``[N, k]`` log-probs and
    ``[N]`` log tail mass -> ``[N, k + 1]``; ``[N, k]`` when k is the whole vocabulary): each top-k log-prob divided
    by T, the tail taken as spread evenly over the other V - k tokens and tempered so, then renormalised."""
    log_p_top = logp.float() / temperature
    k = logp.size(-1)
    if k == vocab:
        return log_p_top.log_softmax(-1)
    rest = math.log(vocab - k)
    log_p_tail = (rest + (tail.float() - rest) / temperature).unsqueeze(-1)  # tempered mass of an even tail
    return torch.cat([log_p_top, log_p_tail], -1).log_softmax(-1)


def clm_loss(student_logits: Tensor, labels: Tensor, kept: Tensor | None = None) -> Tensor:
    """Causal-LM cross-entropy against the true next tokens, which keeps the student anchored to the data.

    Args:
        student_logits (Tensor): ``[B, T, V]``.
        labels (Tensor): ``[B, T]`` next-token ids, ``IGNORE_INDEX`` for positions that must not count.
        kept (Tensor | None): ``[V]`` bool for a trimmed student head: softmax over the kept ids, and 0 where the
            next token is not kept (it cannot be predicted).

    Returns:
        Tensor: scalar, CE averaged over unmasked tokens; 0 if all are masked.
    """
    student, targets = _unmasked_rows(labels, student_logits, labels.unsqueeze(-1))
    return _token_mean(_ce_rows(student, targets.squeeze(1), kept))


def _ce_rows(student: Tensor, targets: Tensor, kept: Tensor | None = None) -> Tensor:
    """``[N, V]`` logits, ``[N]`` ids -> ``[N]`` negative log-likelihoods (0 for a target outside the kept ids)."""
    if kept is not None:
        student, targets = _restrict(student, kept), targets.masked_fill(~kept[targets], IGNORE_INDEX)
    return F.cross_entropy(student, targets, reduction="none", ignore_index=IGNORE_INDEX)


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
                "build the student with the teacher's width, or set alpha_cos=0"
            )
        s_rows, t_rows = _unmasked_rows(labels, s, t.detach())
        losses.append(_token_mean(1.0 - F.cosine_similarity(s_rows, t_rows, dim=-1)))
    return torch.stack(losses).mean()


def mse_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, kept: Tensor | None = None) -> Tensor:
    """Mean squared error between student and teacher logits: mean over V, then over unmasked tokens.

    DistilBERT used ``MSELoss(reduction="sum") / n_tokens``, i.e. summed over V. We take the mean over V so
    that alpha_mse means the same thing for any vocabulary size; multiply alpha_mse by V to match DistilBERT.

    Args:
        student_logits (Tensor): ``[B, T, V]``.
        teacher_logits (Tensor): ``[B, T, V]``; detached here.
        labels (Tensor): ``[B, T]``, ``IGNORE_INDEX`` for positions that must not count.
        kept (Tensor | None): ``[V]`` bool for a trimmed student head: the mean over the kept columns only.

    Returns:
        Tensor: scalar; 0 if all tokens are masked.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} != teacher logits {tuple(teacher_logits.shape)}: "
            "distil with the teacher's tokenizer, or set alpha_mse=0"
        )
    student, teacher = _unmasked_rows(labels, student_logits, teacher_logits.detach())
    return _token_mean(_mse_rows(student, teacher, kept))


def _mse_rows(student: Tensor, teacher: Tensor, kept: Tensor | None = None) -> Tensor:
    if kept is not None:
        cols = kept[: student.size(-1)]
        student, teacher = student[:, cols], teacher[:, cols]
    return (student - teacher).pow(2).mean(-1)


@dataclass
class LossWeights:
    """Weights of the distillation terms (a weight of 0 switches its term off: it is not computed), and the KD
    term's temperature and divergence."""

    alpha_ce: float = 5.0
    """The KD divergence to the teacher's softened distribution (DistilBERT: 5.0, on forward KL)."""
    alpha_clm: float = 2.0
    """Cross-entropy on the true next tokens (DistilBERT's MLM weight: 2.0)."""
    alpha_cos: float = 1.0
    """1 - cosine on hidden states; needs student and teacher of equal width."""
    alpha_mse: float = 0.0
    """MSE on logits; off by default, as in DistilBERT."""
    temperature: float = 2.0
    """Softmax temperature for the KD term."""
    divergence: Divergence = "forward"
    """KD divergence: forward KL(p || q), reverse KL(q || p) or jsd (module docstring)."""

    def __post_init__(self) -> None:
        for name in ("alpha_ce", "alpha_clm", "alpha_cos", "alpha_mse"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}: use 0 to switch a term off")
        _check_kd(self.temperature, self.divergence)
        if not any((self.alpha_ce, self.alpha_clm, self.alpha_cos, self.alpha_mse)):
            raise ValueError("all loss weights are 0: set at least one of alpha_ce, alpha_clm, alpha_cos, alpha_mse")


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    weights: LossWeights,
    student_hidden: Tensor | Sequence[Tensor] | None = None,
    teacher_hidden: Tensor | Sequence[Tensor] | None = None,
    kept: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the distillation terms, plus each term's value for logging.

    Terms whose weight is 0 are skipped entirely, so e.g. with alpha_cos=0 the caller need not ask the
    models for hidden states at all.

    Args:
        student_logits (Tensor): ``[B, T, V]``, aligned with ``labels`` (position t predicts token t + 1).
        teacher_logits (Tensor): ``[B, T, V]``; treated as constants.
        labels (Tensor): ``[B, T]``, ``IGNORE_INDEX`` for padding / masked positions.
        weights (LossWeights): alphas, temperature and KD divergence.
        student_hidden (Tensor | Sequence[Tensor] | None): ``[B, T, H]`` (or a list); needed iff alpha_cos > 0.
        teacher_hidden (Tensor | Sequence[Tensor] | None): same structure as ``student_hidden``.
        kept (Tensor | None): ``[V]`` bool, the ids of a trimmed student head (module docstring).

    Returns:
        tuple[Tensor, dict[str, float]]: the scalar loss to backprop, and the unweighted value of each
        computed term ("kd", "clm", "cos", "mse"; skipped terms are absent) plus the total under "loss".
    """
    terms: dict[str, tuple[float, Tensor]] = {}
    if weights.alpha_ce > 0:
        kd = kd_loss(student_logits, teacher_logits, labels, weights.temperature, weights.divergence, kept)
        terms["kd"] = (weights.alpha_ce, kd)
    if weights.alpha_clm > 0:
        terms["clm"] = (weights.alpha_clm, clm_loss(student_logits, labels, kept))
    if weights.alpha_cos > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError(
                f"alpha_cos={weights.alpha_cos} needs student_hidden and teacher_hidden: run both models with "
                "output_hidden_states=True, or set alpha_cos=0"
            )
        terms["cos"] = (weights.alpha_cos, cosine_loss(student_hidden, teacher_hidden, labels))
    if weights.alpha_mse > 0:
        terms["mse"] = (weights.alpha_mse, mse_loss(student_logits, teacher_logits, labels, kept))
    total = sum(alpha * value for alpha, value in terms.values())
    return total, _logged({name: value for name, (_, value) in terms.items()}, total)


def _logged(values: dict[str, Tensor], total: Tensor) -> dict[str, float]:
    """Every term's unweighted value plus the total under "loss", as floats, with one device sync for all."""
    floats = torch.stack([v.detach() for v in values.values()] + [total.detach()]).tolist()
    return dict(zip([*values, "loss"], floats))


# ---------------------------------------------------------------- memory-lean: from hidden states, in chunks

RowsFn = Callable[[Tensor, slice], tuple[Tensor, Tensor]]


def _matmul_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul here (bf16/fp16 under autocast, else the tensor's own)."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


class _ChunkedHead(torch.autograd.Function):
    """loss = sum over row chunks of rows_fn(hidden[chunk] @ weight.T); the gradient is made chunk by chunk in forward.

    Making the gradient in forward is what keeps memory flat: nothing of size V outlives its chunk, and backward
    only scales the two stored gradients (of the ``[N, H]`` rows and the ``[V, H]`` head) by grad_output.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, rows_fn: RowsFn, chunk: int) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        mm = _matmul_dtype(hidden)
        w = weight.detach().to(mm)  # [V, H], cast once per call
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total, sums = hidden.new_zeros((), dtype=torch.float32), None
        want_grad = grad_h is not None or grad_w is not None
        with torch.enable_grad(), torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), chunk):
                rows = slice(start, start + chunk)
                h = hidden[rows].detach().to(mm)  # [n, H]
                logits = (h @ w.T).float().requires_grad_(want_grad)  # [n, V]
                loss, parts = rows_fn(logits, rows)
                if want_grad:
                    (g,) = torch.autograd.grad(loss, logits)
                    g = g.to(mm)
                    if grad_h is not None:
                        grad_h[rows] = g @ w
                    if grad_w is not None:
                        grad_w += (g.T @ h).float()
                total += loss.detach()
                sums = parts if sums is None else sums + parts
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_sums: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # noqa: ANN001
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * grad_out,
            None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype),
            None,
            None,
        )


def head_loss(
    hidden: Tensor,
    head: Tensor,
    labels: Tensor,
    weights: LossWeights,
    *,
    n_vocab: int | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head: Tensor | None = None,
    sparse: SparseTargets | None = None,
    chunk: int = 1024,
    kept: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The logit terms (KD, CE, MSE) of `distillation_loss`, from final hidden states, never holding full logits.

    Equal to the plain terms on ``hidden @ head.T`` (values and gradients); see the module docstring. The KD
    targets come from the teacher's hidden states and head (online KD), or from a teacher cache (`sparse`).

    Args:
        hidden (Tensor): ``[B, T, H]`` the student's last hidden states (after the final layer norm).
        head (Tensor): ``[V', H]`` the student's LM-head matrix (tied to the embeddings in GPT-2).
        labels (Tensor): ``[B, T]`` next-token ids, ``IGNORE_INDEX`` where a position must not count.
        weights (LossWeights): alphas, temperature and divergence; alpha_cos is not used here.
        n_vocab (int | None): the real vocabulary; logit columns from n_vocab on (padding rows of a head padded
            for speed) are left out of every softmax. None = all V' columns.
        teacher_hidden (Tensor | None): ``[B, T, H_t]`` the teacher's last hidden states (online KD or MSE).
        teacher_head (Tensor | None): ``[V'', H_t]`` the teacher's LM-head matrix.
        sparse (SparseTargets | None): cached teacher top-k instead of a teacher (KD only; MSE needs logits).
        chunk (int): tokens per chunk; memory grows with chunk * V.
        kept (Tensor | None): ``[V]`` bool, the ids of a trimmed student head (module docstring); not with `sparse`.

    Returns:
        tuple[Tensor, dict[str, Tensor]]: the weighted sum of the computed terms (to backprop), and each term's
        unweighted mean over the unmasked tokens ("kd", "clm", "mse"), detached.
    """
    alpha_of = {"kd": weights.alpha_ce, "clm": weights.alpha_clm, "mse": weights.alpha_mse}
    names = [name for name, alpha in alpha_of.items() if alpha > 0]
    if not names:
        raise ValueError("head_loss needs alpha_ce, alpha_clm or alpha_mse > 0: the cosine term has no logits")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    if "mse" in names and teacher_hidden is None:
        raise ValueError("alpha_mse needs the teacher's logits: pass teacher_hidden and teacher_head, or alpha_mse=0")
    if "kd" in names and sparse is None and (teacher_hidden is None or teacher_head is None):
        raise ValueError("alpha_ce needs a teacher: pass teacher_hidden and teacher_head, or sparse targets")
    if kept is not None and sparse is not None:
        raise ValueError("a trimmed student head cannot distil from cached top-k targets: distil from the teacher")
    nv = n_vocab or head.size(0)
    alphas = torch.tensor([alpha_of[name] for name in names])
    extra = [teacher_hidden.detach()] if teacher_hidden is not None else []
    if sparse is not None:
        extra += [sparse.ids, sparse.logp, sparse.tail.unsqueeze(-1)]
    h_rows, targets, *rest = _unmasked_rows(labels, hidden, labels.unsqueeze(-1), *extra)
    targets = targets.squeeze(1)
    t_rows = rest.pop(0) if teacher_hidden is not None else None
    ids, logp, tail = (rest[0], rest[1], rest[2].squeeze(1)) if sparse is not None else (None, None, None)
    n = h_rows.size(0)
    if n == 0:  # every token masked: a 0 that still backpropagates
        zero = hidden.sum() * 0 + head.sum() * 0
        return zero, {name: zero.detach() for name in names}
    t_w = teacher_head.detach().to(_matmul_dtype(hidden)) if teacher_head is not None and t_rows is not None else None

    def rows_fn(logits: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        z = logits[:, :nv]
        t_logits = None
        if t_w is not None and t_rows is not None and (sparse is None or "mse" in names):
            with torch.no_grad():
                t_logits = (t_rows[rows].to(t_w.dtype) @ t_w.T).float()[:, :nv]  # [n, V]
        terms = []
        for name in names:
            if name == "clm":
                terms.append(_ce_rows(z, targets[rows], kept))
            elif name == "mse":
                terms.append(_mse_rows(z, t_logits, kept))
            elif sparse is not None:
                terms.append(
                    _sparse_kd_rows(z, ids[rows], logp[rows], tail[rows], weights.temperature, weights.divergence)
                )
            else:
                terms.append(_kd_rows(z, t_logits, weights.temperature, weights.divergence, kept))
        sums = torch.stack([t.sum() for t in terms])  # [n_terms]
        return (sums * alphas.to(sums.device)).sum() / n, sums.detach()

    total, sums = _ChunkedHead.apply(h_rows, head, rows_fn, chunk)
    return total, dict(zip(names, sums / n))


def lean_distillation_loss(
    student_out: Sequence[Tensor],
    student_head: Tensor,
    labels: Tensor,
    weights: LossWeights,
    *,
    n_vocab: int | None = None,
    teacher_out: Sequence[Tensor] | None = None,
    teacher_head: Tensor | None = None,
    sparse: SparseTargets | None = None,
    student_hidden: Sequence[Tensor] | None = None,
    teacher_hidden: Sequence[Tensor] | None = None,
    chunk: int = 1024,
    kept: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """`distillation_loss` from hidden states: the logit terms by `head_loss` in chunks, the cosine as usual.

    Args:
        student_out (Sequence[Tensor]): the student's hidden states, one per layer + embeddings (HF
            ``output_hidden_states``); the last one (after the final norm) feeds the head.
        student_head (Tensor): ``[V', H]`` the student's LM-head matrix.
        labels (Tensor): ``[B, T]``, ``IGNORE_INDEX`` for padding / masked positions.
        weights (LossWeights): alphas, temperature and KD divergence.
        n_vocab (int | None): real vocabulary size when the heads are padded.
        teacher_out (Sequence[Tensor] | None): the teacher's hidden states (online KD); treated as constants.
        teacher_head (Tensor | None): ``[V'', H_t]`` the teacher's LM-head matrix.
        sparse (SparseTargets | None): cached teacher top-k instead of a teacher (no cosine, no MSE).
        student_hidden, teacher_hidden (Sequence[Tensor] | None): the mapped pairs for the cosine term.
        chunk (int): tokens per chunk of the head.
        kept (Tensor | None): ``[V]`` bool, the ids of a trimmed student head (module docstring).

    Returns:
        tuple[Tensor, dict[str, float]]: as `distillation_loss`.
    """
    values: dict[str, Tensor] = {}
    total = torch.zeros((), device=labels.device)
    if weights.alpha_ce > 0 or weights.alpha_clm > 0 or weights.alpha_mse > 0:
        t_last = teacher_out[-1].detach() if teacher_out is not None else None
        total, values = head_loss(
            student_out[-1],
            student_head,
            labels,
            weights,
            n_vocab=n_vocab,
            teacher_hidden=t_last,
            teacher_head=teacher_head,
            sparse=sparse,
            chunk=chunk,
            kept=kept,
        )
    if weights.alpha_cos > 0:
        if student_hidden is None or teacher_hidden is None:
            raise ValueError(
                f"alpha_cos={weights.alpha_cos} needs student_hidden and teacher_hidden: pass the mapped hidden"
                " states (a teacher cache has none: set alpha_cos=0)"
            )
        values["cos"] = cosine_loss(student_hidden, teacher_hidden, labels)
        total = total + weights.alpha_cos * values["cos"]
    return total, _logged(values, total)
