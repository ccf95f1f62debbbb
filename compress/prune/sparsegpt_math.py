"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", 2023) as pure tensor functions.

The layer's squared output error ``‖X Wᵀ - X Ŵᵀ‖²`` has the Hessian ``H ∝ XᵀX`` in each row of the
weight. Columns are visited left to right; when column ``i`` is pruned (its kept entries stay,
its pruned entries become zero) the Optimal Brain Surgeon update spreads the error over the
columns not yet visited through the rows of the upper Cholesky factor ``U`` of ``H⁻¹``, so the
remaining weights compensate for what was removed. As in the paper:

* the mask is chosen adaptively, per block of ``block_size`` columns, from the block's *current*
  (already updated) weights with the OBS saliency ``w² / U_ii²``; N:M masks are chosen per group
  of M columns when the group's first column is reached;
* updates inside a block are immediate, the columns after it get one batched (lazy) update;
* dead inputs (``H_ii = 0``) get ``H_ii = 1`` and a zero weight; the diagonal is dampened by
  ``dampening · mean(diag H)``, raised tenfold while the factorisation fails.

Unstructured masks remove ``round(sparsity · i)`` weights of each row among its first ``i``
columns at every block boundary, so every row ends with exactly ``round(sparsity · in)`` zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.errors import PassError
from compress.prune.masks import nm_mask, pruned_per_row, row_mask

__all__ = ["SparseGPTResult", "accumulate_gram", "sparsegpt_prune"]

_CHOLESKY_RETRIES = 4


def accumulate_gram(
    gram: torch.Tensor | None, inputs: torch.Tensor, count: int
) -> tuple[torch.Tensor, int]:
    """Fold a batch ``inputs`` (..., in) into the running mean ``G = Σ x xᵀ / n`` (float32, in
    place); ``count`` rows already folded in. Returns the updated (in, in) matrix and row count."""
    rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
    if gram is None:
        gram = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
    added = rows.shape[0]
    if added == 0:
        return gram, count
    total = count + added
    gram.addmm_(rows.T, rows, beta=count / total, alpha=1.0 / total)
    return gram, total


@dataclass
class SparseGPTResult:
    """weight: the pruned and reconstructed weight (float32, exact zeros where ``mask`` is False);
    mask: keep-mask (bool); loss: the summed OBS loss ``Σ w² / (2 U_ii²)`` of pruned weights."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float


def sparsegpt_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    *,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
) -> SparseGPTResult:
    """Prune ``weight`` (out, in) given the input second moment ``gram`` (in, in).

    ``nm=(n, m)`` keeps n of every m columns of each row (``sparsity`` is then unused);
    ``block_size`` must be a multiple of m. Neither input is modified.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if gram.shape != (columns, columns):
        raise ValueError(f"gram shape {tuple(gram.shape)} does not match {tuple(weight.shape)}")
    if nm is not None and (block_size % nm[1] or columns % nm[1]):
        raise ValueError(f"block_size {block_size} and {columns} columns must be multiples of M")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not bool(torch.isfinite(gram).all()):
        raise PassError(
            "sparsegpt: the calibration Hessian has non-finite entries",
            hint="check the calibration data and the layer inputs for inf/nan activations",
        )
    w = weight.detach().to(torch.float32).clone()
    h = gram.detach().to(device=w.device, dtype=torch.float32).clone()
    diagonal = h.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1.0
    w[:, dead] = 0.0
    u = _inverse_factor(h, dampening)

    mask = torch.ones(rows, columns, dtype=torch.bool, device=w.device)
    loss = torch.zeros((), dtype=torch.float64)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block = w[:, start:stop].clone()
        errors = torch.zeros_like(block)
        u_block = u[start:stop, start:stop]
        d = u_block.diagonal()
        if nm is None:
            pruned = pruned_per_row(stop, sparsity) - pruned_per_row(start, sparsity)
            keep = row_mask(block.square() / d.square().unsqueeze(0), pruned)
        else:
            keep = torch.ones_like(block, dtype=torch.bool)
        for i in range(stop - start):
            if nm is not None and i % nm[1] == 0:
                group = slice(i, i + nm[1])
                saliency = block[:, group].square() / d[group].square().unsqueeze(0)
                keep[:, group] = nm_mask(saliency, *nm)
            column = block[:, i]
            target = column * keep[:, i]
            error = (column - target) / d[i]
            loss += float(error.square().sum()) / 2
            block[:, i:].sub_(error.unsqueeze(1) * u_block[i, i:].unsqueeze(0))
            block[:, i] = target  # exact zeros, not w - (w / d) · d
            errors[:, i] = error
        w[:, start:stop] = block
        mask[:, start:stop] = keep
        if stop < columns:
            w[:, stop:].sub_(errors @ u[start:stop, stop:])
    return SparseGPTResult(w, mask, float(loss))


def _inverse_factor(h: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened ``h⁻¹``; more dampening while it fails."""
    mean = float(h.diagonal().mean())
    damp = dampening
    for _ in range(_CHOLESKY_RETRIES + 1):
        dampened = h.clone()
        dampened.diagonal().add_(damp * mean)
        lower, info = torch.linalg.cholesky_ex(dampened)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damp *= 10
    raise PassError(
        f"sparsegpt: the Hessian is not positive definite even with dampening {damp / 10:g}",
        hint="use more calibration samples or a larger dampening",
    )
