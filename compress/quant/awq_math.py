"""The maths of activation-aware scaling (AWQ) as pure tensor functions.

A group is a set of Linear weights that read the same input ``X`` (tokens, in). Multiplying their
input columns by ``s`` and dividing ``X`` by ``s`` leaves ``X Wᵀ`` unchanged, but the rounding
error of the scaled weight is divided by ``s`` on the way out: columns that meet large activations
get finer steps at the cost of the others. ``s = mean|x|**α`` with ``α`` searched on a grid
against the group's output error on calibration rows (Lin et al., "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", 2023). The orchestration (which modules, which
hooks, folding ``1/s`` into the preceding op) is :mod:`compress.quant.awq`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compress.formats import Format

__all__ = [
    "ScaleSearch",
    "activation_scales",
    "fake_quantize",
    "scaled_output_error",
    "search_scales",
]

# channels whose mean |x| is below this fraction of the largest are treated as this small, so
# that s stays finite and away from 0 (at α = 1 the scales span at most 1 / floor)
_FLOOR = 1e-4


@dataclass(frozen=True)
class ScaleSearch:
    """The outcome of :func:`search_scales` for one group.

    ``scales`` (in,) float32 multiply the weights' input columns; all ones when ``alpha == 0``.
    Errors are relative: ``sqrt(Σ ||X (Q̂ - W)ᵀ||² / Σ ||X Wᵀ||²)`` over the group's weights,
    ``error_before`` without scaling (plain round-to-nearest), ``error_after`` with ``scales``.
    """

    alpha: float
    scales: torch.Tensor
    error_before: float
    error_after: float


def activation_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = mean|x|**alpha``, normalised so that ``sqrt(max(s) * min(s)) == 1``.

    ``mean_abs`` (in,) is the mean absolute input per channel; returns (in,) float32, all ones
    (exactly) at ``alpha == 0``. Normalising keeps the scaled weights and the divided norm weights
    centred on their old magnitudes.
    """
    m = mean_abs.detach().to(torch.float32)
    floor = max(float(m.max()) * _FLOOR, torch.finfo(torch.float32).tiny)
    s = m.clamp_min(floor).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def fake_quantize(weight: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``dequant(quant(weight))`` with min-max ranges: what ``rtn`` leaves in the model."""
    codes, scales, zeros = fmt.quantize(weight)
    return fmt.dequantize(codes, scales, zeros, torch.float32)


def scaled_output_error(
    weight: torch.Tensor, inputs: torch.Tensor, scales: torch.Tensor, fmt: Format
) -> float:
    """``||X (Q(W diag s) diag(1/s))ᵀ - X Wᵀ||²`` for ``weight`` (out, in), ``inputs`` (rows, in).

    Weights of one group may be stacked along ``out``: formats group along ``in`` only, so one
    call on the stack equals the sum over the separate weights.
    """
    w = weight.detach().to(torch.float32)
    x = inputs.detach().to(torch.float32)
    s = scales.to(torch.float32)
    reference = x @ w.T  # (rows, out)
    quantized = fake_quantize(w * s, fmt)  # (out, in), in the scaled basis
    return _sq((x / s) @ quantized.T - reference)


def _sq(t: torch.Tensor) -> float:
    return float(t.pow(2).sum())


def search_scales(
    weights: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    mean_abs: torch.Tensor,
    fmt: Format,
    *,
    grid: int = 20,
) -> ScaleSearch:
    """The ``α`` in ``linspace(0, 1, grid)`` whose scales give the lowest group output error.

    ``weights`` (out_i, in) are the Linears reading ``inputs`` (rows, in), ``mean_abs`` (in,) the
    mean ``|x|`` per channel over all calibration tokens. Runs in float32. ``α = 0`` (``s = 1``,
    plain rounding) comes first and ties keep the earlier ``α``, so the result is never worse than
    no scaling on these rows, and is exactly no scaling when nothing beats it.
    """
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    if not weights:
        raise ValueError("search_scales needs at least one weight")
    in_features = inputs.shape[-1]
    if mean_abs.shape != (in_features,):
        raise ValueError(f"mean_abs must have shape ({in_features},), got {tuple(mean_abs.shape)}")
    for weight in weights:
        if weight.dim() != 2 or weight.shape[1] != in_features:
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not read {in_features} input channels"
            )
    # (Σ out_i, in): stacking rows changes nothing, formats group along the input dimension
    w = torch.cat([weight.detach().to(torch.float32) for weight in weights])
    x = inputs.detach().to(torch.float32).reshape(-1, in_features).to(w.device)
    reference = x @ w.T  # (rows, Σ out_i)
    norm = _sq(reference)

    mean_abs = mean_abs.to(w.device)
    ones = torch.ones(in_features, device=w.device)  # α = 0: plain rounding
    before = _sq(x @ fake_quantize(w, fmt).T - reference)
    best_alpha, best_scales, best_error = 0.0, ones, before
    for step in range(1, grid):
        alpha = step / (grid - 1)
        scales = activation_scales(mean_abs, alpha)
        error = _sq((x / scales) @ fake_quantize(w * scales, fmt).T - reference)
        if error < best_error:  # strict: ties keep the smaller α
            best_alpha, best_scales, best_error = alpha, scales, error
    return ScaleSearch(
        alpha=best_alpha,
        scales=best_scales,
        error_before=_relative(before, norm),
        error_after=_relative(best_error, norm),
    )


def _relative(error: float, norm: float) -> float:
    if norm == 0.0:
        return 0.0 if error == 0.0 else float("inf")
    return (error / norm) ** 0.5
