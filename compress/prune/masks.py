"""Keep-masks from importance scores: unstructured per output row, or N:M along the input axis.

Pure tensor functions shared by every pruning method. A mask is a bool tensor shaped like the
weight, True where a weight is kept. Ties are broken by position (stable sorts), so the same
scores always give the same mask.
"""

from __future__ import annotations

import re

import torch

__all__ = ["nm_mask", "parse_pattern", "pruned_per_row", "row_mask"]

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``(n, m)`` of an ``"N:M"`` pattern (N kept in every M), ``None`` for ``"unstructured"``."""
    if pattern == "unstructured":
        return None
    found = _NM.match(pattern)
    if found is None:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M', got {pattern!r}")
    n, m = int(found.group(1)), int(found.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def pruned_per_row(columns: int, sparsity: float) -> int:
    """How many of a row's ``columns`` weights a ``sparsity`` fraction removes (rounded)."""
    return round(sparsity * columns)


def row_mask(scores: torch.Tensor, pruned: int) -> torch.Tensor:
    """Keep-mask that removes the ``pruned`` lowest-scoring weights of every row of ``scores``.

    Per row rather than per layer: Wanda's comparison group, and it makes the sparsity of every
    row (hence of the layer) exact.
    """
    mask = torch.ones_like(scores, dtype=torch.bool)
    if pruned <= 0:
        return mask
    order = torch.argsort(scores, dim=1, stable=True)
    mask.scatter_(1, order[:, :pruned], False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest scores of every ``m`` consecutive columns of each row."""
    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"{columns} columns are not a multiple of M={m}")
    groups = scores.reshape(rows, columns // m, m)
    order = torch.argsort(groups, dim=2, stable=True)  # ascending: the first m - n go
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, order[:, :, : m - n], False)
    return mask.reshape(rows, columns)
