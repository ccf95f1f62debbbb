"""Triton kernels of the integer format (packed buffers + format): GPU prefill and decode, the
shared GEMM / split-K GEMV of :mod:`compress.formats.triton_tiles` with this format's tile decode.

Both read the module's buffers exactly as they are stored (the layout in ``packing.py`` and
``linear.py``), so a loaded export runs on the GPU with no repacking:

``dequant_gemm``
    prefill (many rows): each step over ``K`` unpacks a ``BLOCK_K x BLOCK_N`` tile of codes,
    dequantizes it in registers and feeds ``tl.dot``.
``splitk_gemv``
    decode (a few rows): ``K`` is also split across programs, partial sums added afterwards.

Codes are read from each row's bit stream and zero points (asymmetric formats) from their one
bit stream over the ``(N, G)`` grid by :func:`~compress.formats.triton_tiles.extract_bits`.

Tests run these kernels on CPU with ``TRITON_INTERPRET=1`` set before this module is imported
(Triton picks interpreter or compiler when a kernel is decorated). Without it they need CUDA
tensors; :func:`available` says whether they can run on a device. The kernels use only
``triton.language`` builtins (``tl.full``, ``tl.reduce``), not its ``@jit`` helpers
(``tl.zeros``, ``tl.sum``), because those stay compiled-mode functions when triton itself was
imported before the variable was set (transformers imports it), and the interpreter cannot
call them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compress.formats.int.packed import PackedInt
from compress.formats.triton_tiles import (
    GEMV_MAX_ROWS,
    INTERPRETED,
    Tile,
    available,
    extract_bits,
    linear,
)
from compress.formats.triton_tiles import dequant_gemm as _dequant_gemm
from compress.formats.triton_tiles import splitk_gemv as _splitk_gemv

__all__ = [
    "GEMV_MAX_ROWS",
    "INTERPRETED",
    "available",
    "dequant_gemm",
    "splitk_gemv",
    "tile",
    "triton_linear",
]


@triton.jit
def _int_tile(
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    qw_ptr,
    scale_ptr,
    qz_ptr,
    _p3,
    row_bytes,
    groups,
    group_size,
    zero_bytes,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    E8M0: tl.constexpr,
    _c3: tl.constexpr,
    _c4: tl.constexpr,
):
    """(BLOCK_K, BLOCK_N) fp32 tile of ``W.T``: ``(code - zero) * scale``."""
    mask = mask_k[:, None] & mask_n[None, :]
    row = offs_n[None, :].to(tl.int64)
    start = row * row_bytes
    code = extract_bits(qw_ptr, start, offs_k[:, None], start + row_bytes, mask, BITS)
    group = row * groups + offs_k[:, None] // group_size
    scale = tl.load(scale_ptr + group, mask=mask, other=0.0).to(tl.float32)
    if E8M0:  # a power-of-two exponent byte: 2**(e - 127), exact in fp32
        scale = tl.exp2(scale - 127.0)
    if SYMMETRIC:  # noqa: SIM108 (constexpr: the other branch is never compiled)
        zero = 1 << (BITS - 1)
    else:
        zero = extract_bits(qz_ptr, 0, group, zero_bytes, mask, BITS)
    return (code - zero).to(tl.float32) * scale


def tile(w: PackedInt) -> Tile:
    """This format's tile decode and its arguments, for :mod:`compress.formats.triton_tiles`."""
    groups = w.fmt.groups(w.in_features)
    zeros = w.qzeros if w.qzeros is not None else w.qweight  # symmetric never reads it
    ints = [w.qweight.shape[1], groups, w.in_features // groups]
    ints.append(0 if w.qzeros is None else w.qzeros.numel())
    consts = [w.fmt.bits, int(w.qzeros is None), int(w.fmt.power_of_two_scales)]
    return Tile(_int_tile, [w.qweight, w.scales, zeros], ints, consts)


def dequant_gemm(
    w: PackedInt,
    x: torch.Tensor,
    *,
    block_m: int = 32,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """(M, K) activations x packed (N, K) weight -> (M, N) in the activation dtype (no bias)."""
    return _dequant_gemm(
        x,
        tile(w),
        w.out_features,
        w.in_features,
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
    )


def splitk_gemv(
    w: PackedInt,
    x: torch.Tensor,
    *,
    block_n: int = 64,
    block_k: int = 128,
    splits: int | None = None,
) -> torch.Tensor:
    """Split-K GEMV for a few rows; same contract as :func:`dequant_gemm`."""
    return _splitk_gemv(
        x,
        tile(w),
        w.out_features,
        w.in_features,
        block_n=block_n,
        block_k=block_k,
        splits=splits,
    )


def triton_linear(x: torch.Tensor, w: PackedInt, kernel: str | None = None) -> torch.Tensor:
    """``QuantLinear.forward`` on the GPU: split-K GEMV for decode, dequant-GEMM for prefill.

    ``kernel`` (``"gemv"`` or ``"gemm"``) overrides the choice by row count.
    """
    return linear(x, tile(w), w.out_features, w.in_features, w.bias, kernel)
