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

__all__ = [
    "GEMM_TILE_ROWS",
    "dequantize",
    "gemm",
    "gemv",
    "int16_path",
    "native",
    "vectorized",
]

# Rows dequantized per GEMM tile: 256 x 4096 fp32 is 4 MiB, which stays in the last-level cache.
GEMM_TILE_ROWS = 256

_FUNCTIONS = ["dequantize", "gemv", "gemm", "vectorized"]
_EMPTY = torch.empty(0, dtype=torch.uint8)
_EMPTY_FLOAT = torch.empty(0)
_HALF = (torch.bfloat16, torch.float16)


@cache
def _source() -> str:
    return resources.files(__package__).joinpath("qmatmul.cpp").read_text(encoding="utf-8")


def int16_path(bits: int, group_size: int | None, in_features: int) -> bool:
    """Whether :func:`gemv` runs integer dots for bf16/fp16 activations in this format: whole
    64-code blocks inside a group, and any width but 7 (two 7-bit codes span three bytes)."""
    per_channel = group_size in (None, in_features)
    blocks = per_channel or (group_size is not None and group_size % 64 == 0)
    return bits != 7 and blocks and in_features >= 64


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


def _bias(bias: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY_FLOAT if bias is None else bias


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    bias: torch.Tensor | None = None,
    int16_acts: bool | None = None,
) -> torch.Tensor:
    """x (..., K) fp32/bf16/fp16 x packed (N, ·) weight (+ bias) → (..., N) in x's dtype.

    For few rows (decode). ``int16_acts`` (default: x is bf16/fp16) rounds x to int16 per chunk
    of up to 128 inputs, finer than half precision's own rounding but for elements far below
    the chunk's largest, so the dots run as integer multiply-adds: about 2.5x fewer
    instructions per weight than the exact fp32 path, which fp32 inputs keep.
    """
    if int16_acts is None:
        int16_acts = x.dtype in _HALF
    ext = _extension()
    return ext.gemv(
        x, qweight, scales, _zeros(qzeros), bits, group_size or 0, _bias(bias), int16_acts
    )


def gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    bias: torch.Tensor | None = None,
    tile_rows: int = GEMM_TILE_ROWS,
) -> torch.Tensor:
    """x (..., K) x packed weight (+ bias) → (..., N) in x's dtype, by dequantized tiles + GEMM
    in fp32; for many rows (prefill)."""
    ext = _extension()
    return ext.gemm(
        x, qweight, scales, _zeros(qzeros), bits, group_size or 0, _bias(bias), tile_rows
    )


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
