"""Observers: how a group's quantization range is chosen, as pure tensor functions.

``minmax`` uses each group's full range (clip ratio 1.0). ``mse`` shrinks the range of each group
by the ratio in ``linspace(1, min_ratio, grid)`` that minimises ``sum |W - Q(W)|**norm`` over the
group, optionally weighted per input column by an importance vector such as ``diag(XᵀX)``.
Clipping a few outliers buys finer steps for every other weight in the group, which pays at 2–4
bits and hardly matters at 8. Ratio 1.0 is always in the grid and ties keep the larger ratio, so
``mse`` is never worse than ``minmax`` on its own objective.

The ratios feed :func:`compress.formats.quantize_int` (``clip_ratio``), so the stored format is
unchanged: an observer only decides the scales.
"""

from __future__ import annotations

from typing import Literal

import torch

from compress.formats.int import IntFormat, dequantize_int, quantize_int

__all__ = ["Observer", "choose_clip", "mse_clip_ratios"]

Observer = Literal["minmax", "mse"]


def mse_clip_ratios(
    weight: torch.Tensor,
    fmt: IntFormat,
    *,
    grid: int = 40,
    min_ratio: float = 0.5,
    norm: float = 2.4,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Best clip ratio per group of ``weight`` (out, in) in ``fmt``.

    Every ratio of the grid is tried on all groups at once (one quantize/dequantize of the whole
    matrix per ratio); each group keeps the ratio with the lowest ``sum w_j |W - Q(W)|**norm``,
    where ``w_j`` is ``importance[j]`` (in,) or 1.

    Returns (out, groups) float32 ratios in ``[min_ratio, 1]``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if grid < 1:
        raise ValueError(f"grid must be at least 1, got {grid}")
    if not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio}")
    if norm <= 0:
        raise ValueError(f"norm must be positive, got {norm}")
    out_features, in_features = weight.shape
    groups = fmt.groups(in_features)  # raises FormatError when the group size does not divide
    size = in_features // groups
    w = weight.detach().to(torch.float32)
    column_weight: torch.Tensor | None = None
    if importance is not None:
        if importance.shape != (in_features,):
            raise ValueError(
                f"importance must have shape ({in_features},), got {tuple(importance.shape)}"
            )
        # (in,) -> (1, groups, size), broadcast over rows
        column_weight = importance.detach().to(torch.float32, copy=False).to(w.device)
        column_weight = column_weight.reshape(1, groups, size)

    best_error = torch.full((out_features, groups), float("inf"), device=w.device)
    best_ratio = torch.ones((out_features, groups), device=w.device)
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        codes, scales, zeros = quantize_int(w, fmt, clip_ratio=ratio)
        diff = (w - dequantize_int(codes, scales, zeros, fmt)).abs_().pow_(norm)
        diff = diff.reshape(out_features, groups, size)
        if column_weight is not None:
            diff = diff.mul_(column_weight)
        error = diff.sum(dim=-1)  # (out, groups)
        better = error < best_error  # strict: ties keep the earlier (larger) ratio
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def choose_clip(
    weight: torch.Tensor,
    fmt: IntFormat,
    observer: Observer,
    *,
    grid: int = 40,
    min_ratio: float = 0.5,
    norm: float = 2.4,
    importance: torch.Tensor | None = None,
) -> torch.Tensor | float:
    """Clip ratio for :func:`quantize_int`: ``1.0`` for ``minmax``, (out, groups) for ``mse``.

    The keyword arguments are those of :func:`mse_clip_ratios`; ``minmax`` ignores them.
    """
    if observer == "minmax":
        return 1.0
    if observer == "mse":
        return mse_clip_ratios(
            weight, fmt, grid=grid, min_ratio=min_ratio, norm=norm, importance=importance
        )
    raise ValueError(f"unknown observer {observer!r}; expected 'minmax' or 'mse'")
