"""The adapters' maths: the fast Hadamard transform, EoRA's weighted low rank, QWHA's spectrum."""

from __future__ import annotations

import pytest
import torch

from compress.adapters.corrections import (
    lora_delta,
    low_rank_correction,
    spectrum_correction,
    spectrum_delta,
    spectrum_delta_weight,
    spectrum_rows,
    weighted_error,
)
from compress.errors import PassError
from compress.utils.hadamard import hadamard, hadamard_transform


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 64, 192, 576, 640, 1536])
def test_fast_transform_is_the_matrix(n: int) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    fast = hadamard_transform(x)
    assert torch.allclose(fast, x @ hadamard(n).T, atol=1e-12)
    assert torch.allclose(fast.norm(dim=-1), x.norm(dim=-1))  # orthonormal


def test_fast_transform_keeps_dtype_and_gradient() -> None:
    x = torch.randn(4, 96, requires_grad=True)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, 2 * x.detach(), atol=1e-4)


def test_spectrum_delta_under_bf16_autocast() -> None:
    """Autocast lowers a contraction's output to bf16 midway; the next factor follows it
    (distill trains adapters under bf16 autocast)."""
    x = torch.randn(2, 8, 576, dtype=torch.bfloat16)
    values = torch.randn(10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = spectrum_delta(x, torch.arange(10), torch.arange(10), values, 64)
    y.float().sum().backward()
    assert y.shape == (2, 8, 64) and values.grad is not None


def test_fast_transform_refuses_orders_without_a_matrix() -> None:
    with pytest.raises(PassError, match="order 6"):
        hadamard_transform(torch.zeros(2, 6))


def _problem(out: int = 48, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An error matrix and an input second moment with very uneven channels (as LLM inputs)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2000, n, generator=generator, dtype=torch.float64)
    x = x * torch.logspace(-1.5, 0.5, n, dtype=torch.float64)
    error = torch.randn(out, n, generator=generator, dtype=torch.float64) * 0.01
    return error, x.T @ x / x.shape[0]


def test_low_rank_full_rank_cancels_the_error() -> None:
    error, c = _problem()
    full = low_rank_correction(error, c, 48, damp=0.0)
    assert weighted_error(error - full.delta_weight().double(), c) < 1e-8 * weighted_error(error, c)


def test_low_rank_weighting_beats_a_plain_svd() -> None:
    """EoRA's point: at rank 4 the activation-weighted fit leaves less output error than the
    best unweighted rank-4 fit of the same error."""
    error, c = _problem()
    weighted = low_rank_correction(error, c, 4, damp=0.0).delta_weight().double()
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    plain = (u[:, :4] * s[:4]) @ vh[:4]
    assert weighted_error(error - weighted, c) < 0.9 * weighted_error(error - plain, c)
    assert weighted_error(error - weighted, c) < weighted_error(error, c)


def test_lora_delta_is_the_product() -> None:
    a, b, x = torch.randn(4, 16), torch.randn(8, 4), torch.randn(3, 16)
    assert torch.allclose(lora_delta(x, a, b, 0.5), x @ (b @ a).T * 0.5, atol=1e-5)


def test_spectrum_with_every_coefficient_cancels_the_error() -> None:
    error, c = _problem()
    full = spectrum_correction(error, c, error.numel(), damp=0.0)
    delta = spectrum_delta_weight(
        spectrum_rows(full.row_counts), full.cols, full.values.double(), (48, 64)
    )
    assert weighted_error(error - delta, c) < 1e-8 * weighted_error(error, c)


def test_spectrum_error_falls_with_the_budget() -> None:
    error, c = _problem()
    last = weighted_error(error, c)
    for count in (64, 256, 1024):
        fit = spectrum_correction(error, c, count)
        assert int(fit.row_counts.sum()) == count == fit.values.numel()
        delta = spectrum_delta_weight(
            spectrum_rows(fit.row_counts), fit.cols, fit.values.double(), (48, 64)
        )
        now = weighted_error(error - delta, c)
        assert now < last
        last = now


def _spectrum_error(error: torch.Tensor, c: torch.Tensor, fit: object) -> float:
    delta = spectrum_delta_weight(
        spectrum_rows(fit.row_counts),  # type: ignore[attr-defined]
        fit.cols,  # type: ignore[attr-defined]
        fit.values.double(),  # type: ignore[attr-defined]
        tuple(error.shape),  # type: ignore[arg-type]
    )
    return weighted_error(error - delta, c)


@pytest.mark.parametrize("count", [256, 1024])
def test_spectrum_refinement_and_selection_use_the_inputs(count: int) -> None:
    """Against the naive adapter (the largest coefficients of E Hᵀ, values as they are) the
    weighted selection with least-squares values leaves much less output error; and the chosen
    support beats picking coefficients by their gain alone (a forward criterion that ignores
    how the transformed inputs correlate)."""
    error, c = _problem()
    ours = _spectrum_error(error, c, spectrum_correction(error, c, count, damp=0.0))
    spectrum = hadamard_transform(error)  # F = E Hᵀ exactly when every coefficient is kept
    keep = torch.zeros(spectrum.numel(), dtype=torch.bool)
    keep[spectrum.abs().flatten().topk(count).indices] = True
    naive = (spectrum.flatten() * keep).reshape(spectrum.shape) @ hadamard(64)
    assert ours < 0.8 * weighted_error(error - naive, c)

    gradient = hadamard_transform(error @ c)
    transformed = hadamard_transform(hadamard_transform(c).T)
    gain = gradient.square() / torch.diagonal(transformed)
    chosen = gain.flatten().topk(count).indices.sort().values
    rows, cols = chosen // 64, chosen % 64
    forward = torch.zeros_like(error)
    for row in range(error.shape[0]):
        support = cols[rows == row]
        if support.numel():
            system = transformed[support][:, support]
            forward[row, support] = torch.linalg.solve(system, gradient[row, support])
    assert ours < 0.9 * weighted_error(error - forward @ hadamard(64), c)


def test_rows_with_more_error_get_more_coefficients() -> None:
    error, c = _problem()
    error[:8] *= 10
    fit = spectrum_correction(error, c, 512)
    assert fit.row_counts[:8].float().mean() > 3 * fit.row_counts[8:].float().mean()


def test_sparse_and_dense_paths_agree_with_the_matrix() -> None:
    error, c = _problem()
    fit = spectrum_correction(error, c, 300)
    rows = spectrum_rows(fit.row_counts)
    delta = spectrum_delta_weight(rows, fit.cols, fit.values, (48, 64))
    few, many = torch.randn(2, 64), torch.randn(5, 7, 64)
    assert torch.allclose(
        spectrum_delta(few, rows, fit.cols, fit.values, 48), few @ delta.T, atol=1e-5
    )
    assert torch.allclose(
        spectrum_delta(many, rows, fit.cols, fit.values, 48), many @ delta.T, atol=1e-5
    )
    trained = fit.values.clone().requires_grad_(True)
    spectrum_delta(few, rows, fit.cols, trained, 48).sum().backward()
    assert trained.grad is not None and trained.grad.abs().sum() > 0
