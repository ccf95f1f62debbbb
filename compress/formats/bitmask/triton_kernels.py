"""Triton kernels of the bitmask sparse format: the shared GEMM / split-K GEMV of
:mod:`compress.formats.triton_tiles` with this format's tile decode.

A tile of columns ``k0 .. k0 + BLOCK_K`` (the shared kernels hand contiguous column ranges) reads
each column's bit; a set bit's value is ``values[n, r]`` with ``r`` the row's set bits before the
column. ``r`` is the row's count before the tile plus an exclusive prefix sum of the tile's
bits down its columns. The count before the tile is the module's cached ``offsets`` (values of a
row before each 64-column block) at the tile's first block, plus the set bits between that
block's start and ``k0`` (none for the kernels' block sizes, which are multiples of 64; a
popcount of at most 8 bytes a row for any other). So a tile reads one offset a row, its mask
bytes and only the kept values its bits point at.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats.bitmask.packed import PackedBitmask
from compress.formats.triton_tiles import Tile, extract_bits, linear

__all__ = ["tile", "triton_linear"]


@triton.jit
def _popcount_byte(v):
    """Set bits of each int32 in 0..255 (SWAR: pairs, nibbles, then the byte)."""
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


@triton.jit
def _bitmask_tile(
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    bitmask_ptr,
    values_ptr,
    offsets_ptr,
    _p3,
    mask_bytes,
    kept,
    blocks,
    _i3,
    _c0: tl.constexpr,
    _c1: tl.constexpr,
    _c2: tl.constexpr,
    _c3: tl.constexpr,
    _c4: tl.constexpr,
):
    """(BLOCK_K, BLOCK_N) fp32 tile of ``W.T`` gathered from the kept values."""
    # reductions and scans name their combine functions (not tl.min / tl.sum / tl.cumsum): the
    # interpreter cannot call triton's own jit functions when triton was imported before
    # TRITON_INTERPRET was set, and runs these combines natively
    mask = mask_k[:, None] & mask_n[None, :]
    row = offs_n.to(tl.int64)
    mask_row = row * mask_bytes
    # offs_k is k0 + arange(BLOCK_K): the values of each row before column k0 are the offset of
    # k0's 64-column block plus the set bits of that block before k0
    k0 = tl.reduce(offs_k, 0, tl.standard._elementwise_min)
    block = k0 // 64
    before = tl.load(offsets_ptr + row * blocks + block, mask=mask_n, other=0)  # (BLOCK_N,)
    byte = block * 8 + tl.arange(0, 8)
    width = tl.minimum(tl.maximum(k0 - byte * 8, 0), 8)  # columns of each byte before k0
    lead = tl.load(
        bitmask_ptr + mask_row[None, :] + byte[:, None],
        mask=(width > 0)[:, None] & mask_n[None, :],
        other=0,
    ).to(tl.int32)  # (8, BLOCK_N)
    lead = lead & ((1 << width[:, None]) - 1)
    before += tl.reduce(_popcount_byte(lead), 0, tl.standard._sum_combine)

    bits = extract_bits(
        bitmask_ptr, mask_row[None, :], offs_k[:, None], mask_row[None, :] + mask_bytes, mask, 1
    )  # (BLOCK_K, BLOCK_N), 0 outside the weight
    index = before[None, :] + tl.associative_scan(bits, 0, tl.standard._sum_combine) - bits
    value = tl.load(
        values_ptr + row[None, :] * kept + index, mask=mask & (bits != 0), other=0.0
    ).to(tl.float32)
    return value


def tile(w: PackedBitmask) -> Tile:
    """This format's tile decode and its arguments, for :mod:`compress.formats.triton_tiles`."""
    offsets = w.offsets().to(device=w.bitmask.device, dtype=torch.int32)
    values = w.values
    if values.numel() == 0:  # an all-zero weight (kept 0): no bit points at it, but a pointer
        values = values.new_zeros(1)
    ints = [w.bitmask.shape[1], w.values.shape[1], offsets.shape[1]]
    return Tile(_bitmask_tile, [w.bitmask, values, offsets], ints)


def triton_linear(x: torch.Tensor, w: PackedBitmask, kind: str | None = None) -> torch.Tensor:
    """``BitmaskLinear.forward`` on the GPU: split-K GEMV (``kind="gemv"``) for decode,
    dequant-GEMM (``"gemm"``) for prefill; ``None`` picks by row count."""
    return linear(x, tile(w), w.out_features, w.in_features, w.bias, kind)
