"""Triton kernels of the N:M sparse integer format: the shared GEMM / split-K GEMV of
:mod:`compress.formats.triton_tiles` with this format's tile decode.

Column ``k`` lies in run ``k // m`` at place ``k % m``; the run's ``n`` kept codes
(``j = run * n + t``) and their positions are read, and the tile takes the code whose position is
that place (zero if none). A tile costs ``n`` code and position reads per weight, all from the
same few bytes (cached). The bit streams are read with
:func:`~compress.formats.triton_tiles.extract_bits`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats.nm.packed import PackedNM
from compress.formats.triton_tiles import Tile, extract_bits, linear

__all__ = ["tile", "triton_linear"]


@triton.jit
def _nm_tile(
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    qw_ptr,
    qi_ptr,
    scale_ptr,
    qz_ptr,
    q_bytes,
    i_bytes,
    groups,
    group_size,
    BITS: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    KEEP: tl.constexpr,
    RUN: tl.constexpr,
    FLAGS: tl.constexpr,  # bit 0: asymmetric (zero points stored), bit 1: E8M0 scales
):
    """(BLOCK_K, BLOCK_N) fp32 tile of ``W.T`` decoded from the kept codes."""
    mask = mask_k[:, None] & mask_n[None, :]
    row = offs_n[None, :].to(tl.int64)
    col = offs_k[:, None]
    run = col // RUN
    place = col % RUN
    q_start = row * q_bytes
    i_start = row * i_bytes
    code = tl.full(mask.shape, 0, tl.int32)
    found = mask & (col < 0)  # all False, the tile's shape
    for t in tl.static_range(KEEP):
        j = run * KEEP + t
        position = extract_bits(qi_ptr, i_start, j, i_start + i_bytes, mask, INDEX_BITS)
        kept = extract_bits(qw_ptr, q_start, j, q_start + q_bytes, mask, BITS)
        hit = position == place
        code = tl.where(hit, kept, code)
        found = found | hit
    group = row * groups + col // group_size
    scale = tl.load(scale_ptr + group, mask=mask, other=0.0).to(tl.float32)
    if FLAGS & 2:
        scale = tl.exp2(scale - 127.0)
    if FLAGS & 1:  # noqa: SIM108 (constexpr: the other branch is never compiled)
        # the zero points come padded with a byte (see tile): the two-byte read never overruns
        zero = extract_bits(qz_ptr, 0, group, 1 << 40, mask, BITS)
    else:
        zero = 1 << (BITS - 1)
    return tl.where(found, (code - zero).to(tl.float32) * scale, 0.0)


def tile(w: PackedNM) -> Tile:
    """This format's tile decode and its arguments, for :mod:`compress.formats.triton_tiles`."""
    fmt = w.fmt
    groups = fmt.values.groups(w.in_features)
    flags = (0 if w.qzeros is None else 1) | (2 if fmt.values.power_of_two_scales else 0)
    zeros = w.qweight if w.qzeros is None else torch.nn.functional.pad(w.qzeros, (0, 1))
    tensors = [w.qweight, w.qindex, w.scales, zeros]
    ints = [w.qweight.shape[1], w.qindex.shape[1], groups, w.in_features // groups]
    return Tile(_nm_tile, tensors, ints, [fmt.bits, fmt.index_bits, fmt.n, fmt.m, flags])


def triton_linear(x: torch.Tensor, w: PackedNM, kernel: str | None = None) -> torch.Tensor:
    """``NMLinear.forward`` on the GPU: split-K GEMV for decode, dequant-GEMM for prefill."""
    return linear(x, tile(w), w.out_features, w.in_features, w.bias, kernel)
