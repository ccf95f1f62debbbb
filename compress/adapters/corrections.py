"""The maths of the two error-correcting adapters, as pure tensor functions.

Both start from the quantization error ``E = W - Q(W)`` of one Linear and the second moment of
its inputs ``C = XᵀX / tokens`` on calibration text, and fit a small correction ``ΔW`` that
minimizes the output error ``‖(E - ΔW) Xᵀ‖²`` = ``tr((E - ΔW) C (E - ΔW)ᵀ)``:

* **low rank** (EoRA's idea): ``ΔW = B A`` of rank ``r``. With ``C = Q Λ Qᵀ`` the weighted
  problem becomes a plain one in the eigenbasis scaled by ``Λ^½``: the best rank-``r``
  approximation (SVD) of ``E Q Λ^½``, mapped back by ``Λ^-½ Qᵀ``. The error directions the
  inputs excite most are corrected first; an unweighted SVD of ``E`` would spend the rank on
  directions the inputs never take.
* **Walsh–Hadamard** (QWHA): ``ΔW = F H`` with ``H`` the orthonormal Hadamard matrix of the
  input width (:mod:`compress.utils.hadamard`) and ``F`` sparse. With every coefficient kept the
  exact answer is ``F* = E Hᵀ``; dropping coefficient ``(r, j)`` from it costs about
  ``F*_rj² · (H C Hᵀ)_jj`` of weighted error. *Adaptive selection* keeps the ``count``
  coefficients of largest cost across the whole matrix, so rows (output channels) with a larger
  weighted error get more of them; *value refinement* then solves each row's small least squares
  problem ``min_f (e - f H) C (e - f H)ᵀ`` exactly over its chosen coefficients (normal
  equations ``(H C Hᵀ)_SS f = (e C Hᵀ)_S``), so the adapter starts by cancelling as much of the
  weighted error as its support allows. (Choosing instead by the gain of each coefficient alone,
  ``(e C Hᵀ)_j² / (H C Hᵀ)_jj``, ignores how strongly the transformed inputs correlate and
  leaves 3x more error at a quarter of the coefficients on LLM-like inputs:
  ``tests/adapters/test_corrections.py``.) The forward pass needs only the transform of
  the input and a sparse product: ``y += hadamard_transform(x) @ Fᵀ``.

Matrices are damped like GPTQ's Hessian (``damp · mean(diag C)`` on the diagonal), since a
calibration set rarely excites every input direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from compress.utils.hadamard import hadamard, hadamard_transform

__all__ = [
    "LowRankCorrection",
    "SpectrumCorrection",
    "eigenbasis",
    "lora_delta",
    "low_rank_correction",
    "spectrum_correction",
    "spectrum_delta",
    "spectrum_delta_weight",
    "spectrum_rows",
    "weighted_error",
]


def _one_lapack_thread() -> Any:
    """One BLAS/LAPACK thread for the small decompositions: OpenBLAS threads spin-wait, and on a
    busy machine a threaded 1536² ``eigh`` took 3x longer than a single-threaded one."""
    return threadpool_limits(limits=1, user_api="blas")


def _damped(covariance: torch.Tensor, damp: float) -> torch.Tensor:
    c = covariance.to(torch.float64)
    diag = torch.diagonal(c)
    level = float(diag.mean()) if diag.numel() else 0.0
    return c + torch.eye(c.shape[0], dtype=c.dtype, device=c.device) * max(damp * level, 1e-12)


def weighted_error(error: torch.Tensor, covariance: torch.Tensor) -> float:
    """``tr(E C Eᵀ)``: the mean squared output error that ``error`` causes on the inputs."""
    e = error.to(torch.float64)
    return float(((e @ covariance.to(torch.float64)) * e).sum())


@dataclass
class LowRankCorrection:
    """``ΔW = B A``: ``A`` is ``(rank, in)``, ``B`` is ``(out, rank)``, both float32."""

    a: torch.Tensor
    b: torch.Tensor

    def delta_weight(self) -> torch.Tensor:
        return self.b @ self.a


def eigenbasis(covariance: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Λ, Q)`` of the damped ``C = Q Λ Qᵀ`` (float64): :func:`low_rank_correction` takes it
    precomputed, so Linears that read one input (q/k/v, gate/up) share one decomposition."""
    with _one_lapack_thread():
        eigenvalues, eigenvectors = torch.linalg.eigh(_damped(covariance, damp))
    return eigenvalues, eigenvectors


def low_rank_correction(
    error: torch.Tensor,
    covariance: torch.Tensor,
    rank: int,
    *,
    damp: float = 0.01,
    basis: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LowRankCorrection:
    """The rank-``rank`` ``ΔW`` that minimizes ``tr((E - ΔW) C (E - ΔW)ᵀ)`` (see module doc).

    The singular values are split evenly between the factors (``B = U√S``, ``A = √S Vᵀ…``), so
    neither starts orders of magnitude larger than the other when the factors are trained.
    ``basis``: :func:`eigenbasis` of ``covariance`` if already known.
    """
    out_features, in_features = error.shape
    rank = min(rank, out_features, in_features)
    eigenvalues, eigenvectors = basis if basis is not None else eigenbasis(covariance, damp)
    root = eigenvalues.clamp_min(eigenvalues.max() * 1e-12).sqrt()
    projected = (error.to(torch.float64) @ eigenvectors) * root
    with _one_lapack_thread():
        u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    half = s[:rank].sqrt()
    b = u[:, :rank] * half
    a = ((half[:, None] * vh[:rank]) / root) @ eigenvectors.T
    return LowRankCorrection(a.to(torch.float32), b.to(torch.float32))


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The output a LoRA pair adds: ``x Aᵀ Bᵀ · scaling``."""
    return (x @ a.T) @ b.T * scaling


@dataclass
class SpectrumCorrection:
    """``ΔW = F H`` with ``F`` sparse: row ``r`` holds ``row_counts[r]`` coefficients, whose
    columns are the next ``row_counts[r]`` entries of ``cols`` (rows in order)."""

    cols: torch.Tensor  # (nnz,) int64, sorted within each row
    row_counts: torch.Tensor  # (out,) int64
    values: torch.Tensor  # (nnz,) float32


def spectrum_rows(row_counts: torch.Tensor) -> torch.Tensor:
    """The row of every stored coefficient, from the per-row counts."""
    rows = torch.arange(row_counts.numel(), device=row_counts.device)
    return torch.repeat_interleave(rows, row_counts.to(torch.int64))


def spectrum_correction(
    error: torch.Tensor,
    covariance: torch.Tensor,
    count: int,
    *,
    damp: float = 0.01,
    row_chunk: int = 256,
) -> SpectrumCorrection:
    """``count`` Walsh–Hadamard coefficients chosen and valued to cancel the weighted error."""
    out_features, in_features = error.shape
    count = max(0, min(count, out_features * in_features))
    c = _damped(covariance, damp)
    e = error.to(torch.float64)
    gradient = hadamard_transform(e @ c)  # E C Hᵀ, (out, in): the right-hand sides
    transformed = hadamard_transform(hadamard_transform(c).T)  # H C Hᵀ, symmetric
    cost = hadamard_transform(e).square() * torch.diagonal(transformed)[None, :]
    chosen = torch.topk(cost.flatten(), count, sorted=False).indices.sort().values
    rows, cols = chosen // in_features, chosen % in_features
    row_counts = torch.bincount(rows, minlength=out_features)
    values = torch.empty(count, dtype=torch.float64)
    starts = torch.cumsum(row_counts, 0) - row_counts
    for first in range(0, out_features, row_chunk):
        last = min(first + row_chunk, out_features)
        counts = row_counts[first:last]
        width = int(counts.max()) if counts.numel() else 0
        if width == 0:
            continue
        slot = torch.arange(width)
        present = slot[None, :] < counts[:, None]  # (rows, width)
        index = (starts[first:last, None] + slot[None, :]).clamp(max=max(count - 1, 0))
        columns = torch.where(present, cols[index], torch.zeros_like(index))
        system = transformed[columns[:, :, None], columns[:, None, :]]
        both = present[:, :, None] & present[:, None, :]
        eye = torch.eye(width, dtype=torch.float64).expand_as(system)
        system = torch.where(both, system, eye)
        rhs = torch.where(present, gradient[first:last].gather(1, columns), 0.0)
        with _one_lapack_thread():
            solution = torch.linalg.solve(system, rhs)
        values[index[present]] = solution[present]
    return SpectrumCorrection(cols, row_counts, values.to(torch.float32))


def spectrum_delta(
    x: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
    out_features: int,
) -> torch.Tensor:
    """The output a Walsh–Hadamard adapter adds, ``hadamard_transform(x) @ Fᵀ``.

    Few tokens (decoding) take the sparse path, reading only the stored coefficients; many
    tokens (prefill, training) multiply by ``F`` made dense, one matmul the size of the layer.
    """
    transformed = hadamard_transform(x.to(values.dtype))
    lead = transformed.shape[:-1]
    flat = transformed.reshape(-1, transformed.shape[-1])
    if flat.shape[0] <= 8 and not values.requires_grad:
        out = torch.zeros(flat.shape[0], out_features, dtype=flat.dtype, device=flat.device)
        out.index_add_(1, rows, flat[:, cols] * values)
    else:
        dense = torch.zeros(
            out_features, flat.shape[-1], dtype=values.dtype, device=values.device
        ).index_put((rows, cols), values)
        out = flat @ dense.T
    return out.reshape(*lead, out_features)


def spectrum_delta_weight(
    rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """``ΔW = F H`` as a dense ``(out, in)`` matrix (merging, checks)."""
    dense = torch.zeros(shape, dtype=values.dtype, device=values.device)
    dense[rows, cols] = values
    return dense @ hadamard(shape[1], values.dtype).to(values.device)
