"""Triton kernels of the FP8 format: the shared GEMM / split-K GEMV of
:mod:`compress.formats.triton_tiles` with this format's tile decode.

An FP8 byte becomes the fp16 with the same sign, exponent and mantissa bits (E5M2 is an fp16's
top byte; E4M3's fields shift in with a bias 8 lower, made up by a factor 2**8), then fp32, times
its block's scale (fp32, or an E8M0 exponent byte for MXFP8). No float8 dtype is needed, so the
same code runs compiled and in the CPU interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats.fp8.packed import PackedFP8
from compress.formats.triton_tiles import Tile, linear

__all__ = ["tile", "triton_linear"]


@triton.jit
def _fp8_tile(
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    qw_ptr,
    scale_ptr,
    _p2,
    _p3,
    k_cols,
    block_n,
    block_k,
    scale_cols,
    E4M3: tl.constexpr,
    E8M0: tl.constexpr,
    _c2: tl.constexpr,
    _c3: tl.constexpr,
    _c4: tl.constexpr,
):
    """(BLOCK_K, BLOCK_N) fp32 tile of ``W.T``."""
    mask = mask_k[:, None] & mask_n[None, :]
    row = offs_n[None, :].to(tl.int64)
    col = offs_k[:, None]
    code = tl.load(qw_ptr + row * k_cols + col, mask=mask, other=0).to(tl.int32)
    if E4M3:  # noqa: SIM108 (constexpr: the other branch is never compiled)
        half = ((code & 0x80) << 8) | ((code & 0x7F) << 7)
    else:
        half = code << 8
    value = half.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    if E4M3:
        value = value * 256.0
    index = (row // block_n) * scale_cols + col // block_k
    scale = tl.load(scale_ptr + index, mask=mask, other=0).to(tl.float32)
    if E8M0:
        scale = tl.exp2(scale - 127.0)
    return value * scale


def tile(w: PackedFP8) -> Tile:
    """This format's tile decode and its arguments, for :mod:`compress.formats.triton_tiles`."""
    fmt = w.fmt
    bn, bk = fmt.block_shape(w.out_features, w.in_features)
    scale_cols = w.scales.shape[1]
    e8m0 = w.scales.dtype == torch.uint8
    ints = [w.in_features, bn, bk, scale_cols]
    return Tile(_fp8_tile, [w.qweight, w.scales], ints, [int(fmt.variant == "e4m3"), int(e8m0)])


def triton_linear(x: torch.Tensor, w: PackedFP8, kernel: str | None = None) -> torch.Tensor:
    """``FP8Linear.forward`` on the GPU: split-K GEMV for decode, dequant-GEMM for prefill."""
    return linear(x, tile(w), w.out_features, w.in_features, w.bias, kernel)
