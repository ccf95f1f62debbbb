"""Native CPU kernels for packed integer weights: fused GEMV for decode, tiled GEMM for prefill.

The C++ source (``qmatmul.cpp``, shipped as package data) is built on first use by
:func:`compress.utils.native.load_native` and cached by source hash, so a plain ``pip install``
needs no build step. Without a compiler :func:`native` returns ``None`` (logged once) and
:mod:`compress.export.kernels` keeps to the plain-torch reference.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType

import torch

from compress.utils.native import load_native

__all__ = ["GEMM_TILE_ROWS", "dequantize", "gemm", "gemv", "native", "vectorized"]

# Rows dequantized per GEMM tile: 256 x 4096 fp32 is 4 MiB, which stays in the last-level cache.
GEMM_TILE_ROWS = 256

_FUNCTIONS = ["dequantize", "gemv", "gemm", "vectorized"]
_EMPTY = torch.empty(0, dtype=torch.uint8)


@cache
def _source() -> str:
    return resources.files(__package__).joinpath("qmatmul.cpp").read_text(encoding="utf-8")


def native() -> ModuleType | None:
    """The built extension, or ``None`` when it cannot be built here (reason logged once)."""
    return load_native("qmatmul", _source(), _FUNCTIONS)


def vectorized() -> bool:
    """Whether the extension was built with its AVX2 paths (else portable scalar loops)."""
    ext = native()
    return bool(ext is not None and ext.vectorized())


def _extension() -> ModuleType:
    """The built extension; callers check :func:`available` first, so absence is a bug."""
    ext = native()
    if ext is None:
        raise RuntimeError("the native qmatmul extension is not available")
    return ext


def _zeros(qzeros: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY if qzeros is None else qzeros


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
) -> torch.Tensor:
    """(M, K) fp32 activations x packed (N, ·) weight → (M, N) fp32; for small M (decode)."""
    ext = _extension()
    return ext.gemv(x, qweight, scales, _zeros(qzeros), bits, group_size or 0)


def gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    tile_rows: int = GEMM_TILE_ROWS,
) -> torch.Tensor:
    """(M, K) fp32 x packed weight → (M, N) fp32 by dequantized tiles + GEMM; for large M."""
    ext = _extension()
    return ext.gemm(x, qweight, scales, _zeros(qzeros), bits, group_size or 0, tile_rows)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    in_features: int,
) -> torch.Tensor:
    """The (N, K) fp32 weight, unpacked natively; for tests."""
    ext = _extension()
    return ext.dequantize(qweight, scales, _zeros(qzeros), bits, group_size or 0, in_features)
