"""Triton kernels of the MXFP6 formats: the shared GEMM / split-K GEMV of
:mod:`compress.formats.triton_tiles` with this format's tile decode.

A code is read from its row's bit stream (:func:`~compress.formats.triton_tiles.extract_bits`,
6 bits, straddling a byte boundary for half the columns) and indexes the 64-entry element
table; its block's E8M0 byte is looked up in a 256-entry table of its values, as the native CPU
GEMV reads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats.fp4.table import PackedTable
from compress.formats.triton_tiles import Tile, extract_bits, linear

__all__ = ["tile", "triton_linear"]

# every scale code; an explicit device, since this module may first be imported while a model
# loads under torch.device("meta")
_BYTES = torch.arange(256, dtype=torch.int32, device="cpu").to(torch.uint8)


@triton.jit
def _fp6_tile(
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    qw_ptr,
    scale_ptr,
    table_ptr,
    scale_table_ptr,
    row_bytes,
    block,
    groups,
    _i3,
    _c0: tl.constexpr,
    _c1: tl.constexpr,
    _c2: tl.constexpr,
    _c3: tl.constexpr,
    _c4: tl.constexpr,
):
    """(BLOCK_K, BLOCK_N) fp32 tile of ``W.T``."""
    mask = mask_k[:, None] & mask_n[None, :]
    row = offs_n[None, :].to(tl.int64)
    col = offs_k[:, None]
    start = row * row_bytes
    code = extract_bits(qw_ptr, start, col, start + row_bytes, mask, 6)
    value = tl.load(table_ptr + code, mask=mask, other=0.0)
    stored = tl.load(scale_ptr + row * groups + col // block, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scale_table_ptr + stored, mask=mask, other=0.0)
    return value * scale


def tile(w: PackedTable) -> Tile:
    """This format's tile decode and its arguments, for :mod:`compress.formats.triton_tiles`."""
    fmt = w.fmt
    device = w.qweight.device
    table = fmt.table.to(device=device, dtype=torch.float32)
    scale_table = fmt.effective_scales(_BYTES.to(device), None).to(torch.float32)
    tensors = [w.qweight, w.scales, table, scale_table]
    return Tile(_fp6_tile, tensors, [w.qweight.shape[1], fmt.block, w.scales.shape[1]], [])


def triton_linear(x: torch.Tensor, w: PackedTable, kernel: str | None = None) -> torch.Tensor:
    """``FP6Linear.forward`` on the GPU: split-K GEMV for decode, dequant-GEMM for prefill."""
    return linear(x, tile(w), w.out_features, w.in_features, w.bias, kernel)
