"""Distillation losses between a teacher's and a student's next-token distributions.

Pure tensor functions, differentiable in the student's logits. Every loss is a mean over
positions, in nats, computed in float32 whatever the logits' dtype.

* ``forward_kl``: ``KL(p_teacher || q_student)``, mode-covering; what ``compress eval``
  reports as KL, so the training loss and the evaluated metric are the same quantity.
* ``reverse_kl``: ``KL(q_student || p_teacher)``, mode-seeking (MiniLLM's choice).
* ``jsd``: the generalized Jensen-Shannon divergence of GKD, ``β·KL(p || m) + (1-β)·KL(q || m)``
  with ``m = β·p + (1-β)·q``; ``β → 0`` behaves like forward KL, ``β → 1`` like reverse KL (up
  to scale), bounded by ``ln 2`` per position for ``β = 0.5``.

The temperature ``T`` softens both distributions; losses are multiplied by ``T²`` so gradient
magnitudes stay comparable across temperatures (Hinton et al.).

A teacher can also be given by its top-k log-probabilities (:class:`TopK`, what the on-disk
teacher cache keeps): the distributions are then compared on the k tokens plus one bucket that
holds the rest of the mass, an exact KL of that coarser distribution.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

__all__ = ["LossKind", "TopK", "distillation_loss", "top_k_of"]

LossKind = Literal["forward_kl", "reverse_kl", "jsd"]


class TopK(NamedTuple):
    """A teacher distribution kept as its ``k`` most likely tokens per position.

    values: (..., k) log-probabilities at temperature 1; indices: (..., k) int64 token ids.
    """

    values: torch.Tensor
    indices: torch.Tensor


def top_k_of(logits: torch.Tensor, k: int) -> TopK:
    """The top-``k`` log-probabilities of ``logits`` (..., vocab), for the teacher cache."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    values, indices = log_probs.topk(k, dim=-1)
    return TopK(values, indices)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``Σ p (log p - log q)`` over the last axis; a zero-probability term contributes 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _divergence(
    log_p: torch.Tensor, log_q: torch.Tensor, kind: LossKind, beta: float
) -> torch.Tensor:
    """Per-position divergence between teacher ``log_p`` and student ``log_q`` (same support)."""
    if kind == "forward_kl":
        return _kl(log_p, log_q)
    if kind == "reverse_kl":
        return _kl(log_q, log_p)
    # log m = log(β p + (1-β) q), stably in log space
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def _with_rest(log_probs: torch.Tensor) -> torch.Tensor:
    """Append one bucket holding the mass outside the given tokens: (..., k) -> (..., k + 1)."""
    kept = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=0.0)
    # log(1 - exp(kept)) with expm1 for precision; floored so an (almost) empty rest stays finite
    rest = torch.log((-torch.expm1(kept)).clamp_min(1e-12))
    return torch.cat([log_probs, rest], dim=-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    *,
    kind: LossKind = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Mean divergence between teacher and student over all positions (a scalar).

    ``student_logits``: (..., vocab); ``teacher``: logits of the same shape, or a :class:`TopK`
    (..., k) of teacher log-probabilities (used at temperature 1 only).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, TopK):
        if temperature != 1.0:
            raise ValueError("a top-k teacher cache holds temperature-1 probabilities only")
        log_p = _with_rest(teacher.values.float())
        log_q = _with_rest(log_q.gather(-1, teacher.indices))
    else:
        if teacher.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher.shape)} and student logits "
                f"{tuple(student_logits.shape)} differ (do they share a tokenizer?)"
            )
        log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = _divergence(log_p, log_q, kind, beta)
    return per_position.mean() * temperature**2
