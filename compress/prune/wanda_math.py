"""Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023).

A weight's importance is its magnitude times the norm of the input feature it multiplies,
``|W_ij| · ‖X_j‖₂``: a small weight on an outlier feature can matter more than a large one on a
quiet feature. Weights compete within their output row; no weight update follows.
"""

from __future__ import annotations

import torch

from compress.prune.masks import nm_mask, pruned_per_row, row_mask

__all__ = ["accumulate_squares", "wanda_mask", "wanda_scores"]


def accumulate_squares(squares: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    """Add the per-feature sums of squares of a batch ``inputs`` (..., in) to ``squares`` (in,)
    (float64, so long calibration runs do not lose small features)."""
    rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
    batch = rows.square().sum(dim=0)
    return batch if squares is None else squares.add_(batch)


def wanda_scores(weight: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
    """``|W| · ‖x_j‖₂`` for a weight (out, in) and per-feature input sums of squares (in,)."""
    norms = squares.to(torch.float32).clamp_min(0).sqrt()
    return weight.detach().to(torch.float32).abs() * norms.unsqueeze(0)


def wanda_mask(
    weight: torch.Tensor, squares: torch.Tensor, sparsity: float, nm: tuple[int, int] | None
) -> torch.Tensor:
    """Keep-mask of ``weight``: ``sparsity`` per row, or N:M when ``nm`` is given."""
    scores = wanda_scores(weight, squares)
    if nm is not None:
        return nm_mask(scores, *nm)
    return row_mask(scores, pruned_per_row(weight.shape[1], sparsity))
