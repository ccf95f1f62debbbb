"""Distillation losses: each against its definition computed another way."""

from __future__ import annotations

import math

import pytest
import torch

from compress.distill.losses import TopK, distillation_loss, top_k_of
from compress.evaluate.quality import token_kl


def _pair(seed: int = 0, shape: tuple[int, ...] = (2, 5, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(shape, generator=generator) * 3
    student = teacher + torch.randn(shape, generator=generator)
    return teacher, student


def test_forward_kl_is_the_evaluated_kl() -> None:
    teacher, student = _pair()
    loss = distillation_loss(student, teacher, kind="forward_kl")
    assert loss.item() == pytest.approx(token_kl(teacher, student).mean().item(), rel=1e-5)


def test_reverse_kl_swaps_the_roles() -> None:
    teacher, student = _pair(1)
    loss = distillation_loss(student, teacher, kind="reverse_kl")
    assert loss.item() == pytest.approx(token_kl(student, teacher).mean().item(), rel=1e-5)
    assert loss.item() != pytest.approx(distillation_loss(student, teacher).item(), rel=1e-2)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_identical_distributions_cost_nothing(kind: str) -> None:
    teacher, _ = _pair(2)
    assert distillation_loss(teacher.clone(), teacher, kind=kind).item() == pytest.approx(
        0, abs=1e-6
    )


def test_jsd_matches_its_mixture_definition_and_is_bounded() -> None:
    teacher, student = _pair(3)
    beta = 0.3
    p, q = teacher.softmax(-1), student.softmax(-1)
    m = beta * p + (1 - beta) * q
    expected = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    loss = distillation_loss(student, teacher, kind="jsd", beta=beta)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-4)
    far = distillation_loss(-100 * teacher, 100 * teacher, kind="jsd", beta=0.5)
    assert far.item() <= math.log(2) + 1e-5


def test_temperature_softens_and_rescales_by_t_squared() -> None:
    teacher, student = _pair(4)
    t = 2.5
    loss = distillation_loss(student, teacher, temperature=t)
    expected = token_kl(teacher / t, student / t).mean() * t * t
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_top_k_of_the_whole_vocabulary_is_exact() -> None:
    teacher, student = _pair(5)
    full = distillation_loss(student, teacher)
    cached = distillation_loss(student, top_k_of(teacher, teacher.shape[-1]))
    assert cached.item() == pytest.approx(full.item(), rel=1e-4)


def test_top_k_coarsens_never_inflates_and_stays_close() -> None:
    teacher, student = _pair(6, (4, 16, 200))
    teacher = teacher * 2  # peaked, as a trained LM's next-token distribution is
    full = distillation_loss(student, teacher).item()
    cached = distillation_loss(student, top_k_of(teacher, 20)).item()
    assert cached <= full + 1e-6  # data processing: a coarser distribution diverges less
    assert cached > 0.5 * full


def test_top_k_gradients_are_finite_when_the_rest_is_empty() -> None:
    teacher = torch.full((3, 10), -1e4)
    teacher[:, 0] = 10.0  # all mass on one token: the rest bucket holds ~0
    student = torch.randn(3, 10, requires_grad=True)
    loss = distillation_loss(student, top_k_of(teacher, 2))
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_bad_arguments_are_named() -> None:
    teacher, student = _pair()
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(student, teacher, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="share a tokenizer"):
        distillation_loss(student, teacher[..., :10])
    with pytest.raises(ValueError, match="temperature-1"):
        distillation_loss(student, top_k_of(teacher, 4), temperature=2.0)
    assert isinstance(top_k_of(teacher, 3), TopK)
