"""Triton kernels of the 4-bit table formats (NF4, FP4, MXFP4, NVFP4): the shared GEMM / split-K
GEMV of :mod:`compress.formats.triton_tiles` with this format's tile decode.

A code (low nibble first, two a byte) indexes the 16-value table; its block's scale is an fp32
multiplier (NF4, FP4) or a byte (E8M0 for MXFP4, E4M3 for NVFP4) looked up in a 256-entry table
of its values (NVFP4's tensor scale folded in), as the native CPU GEMV reads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats.fp4.table import PackedTable
from compress.formats.triton_tiles import Tile, linear

__all__ = ["tile", "triton_linear"]

_BYTES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 256)  # every scale code


@triton.jit
def _fp4_tile(
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
    CODED: tl.constexpr,
    _c1: tl.constexpr,
    _c2: tl.constexpr,
    _c3: tl.constexpr,
    _c4: tl.constexpr,
):
    """(BLOCK_K, BLOCK_N) fp32 tile of ``W.T``."""
    mask = mask_k[:, None] & mask_n[None, :]
    row = offs_n[None, :].to(tl.int64)
    col = offs_k[:, None]
    byte = tl.load(qw_ptr + row * row_bytes + (col >> 1), mask=mask, other=0).to(tl.int32)
    code = (byte >> ((col & 1) * 4)) & 0x0F
    value = tl.load(table_ptr + code, mask=mask, other=0.0)
    group = row * groups + col // block
    if CODED:
        stored = tl.load(scale_ptr + group, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scale_table_ptr + stored, mask=mask, other=0.0)
    else:
        scale = tl.load(scale_ptr + group, mask=mask, other=0.0)
    return value * scale


def tile(w: PackedTable) -> Tile:
    """This format's tile decode and its arguments, for :mod:`compress.formats.triton_tiles`."""
    fmt = w.fmt
    coded = w.scales.dtype == torch.uint8
    device = w.qweight.device
    table = fmt.table.to(device=device, dtype=torch.float32)
    scale_table = (
        fmt.effective_scales(_BYTES.to(device), w.tensor_scale).reshape(256).to(torch.float32)
        if coded
        else table
    )
    tensors = [w.qweight, w.scales, table, scale_table]
    return Tile(
        _fp4_tile, tensors, [w.qweight.shape[1], fmt.block, w.scales.shape[1]], [int(coded)]
    )


def triton_linear(x: torch.Tensor, w: PackedTable, kernel: str | None = None) -> torch.Tensor:
    """``FP4Linear.forward`` on the GPU: split-K GEMV for decode, dequant-GEMM for prefill."""
    return linear(x, tile(w), w.out_features, w.in_features, w.bias, kernel)
