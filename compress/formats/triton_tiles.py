"""Triton GEMM and GEMV kernels shared by the packed formats: each format supplies only the
decode of a ``BLOCK_K x BLOCK_N`` tile of ``W.T`` from its stored tensors.

``dequant_gemm``
    prefill (many rows). Tiles of ``BLOCK_M x BLOCK_N`` outputs; each step over ``K`` decodes a
    weight tile in registers and feeds ``tl.dot``.
``splitk_gemv``
    decode (a few rows). ``K`` is also split across programs, each writing an fp32 partial sum
    that is added afterwards (deterministic, unlike atomics).

A format's tile function is a ``@triton.jit`` function passed as a compile-time argument::

    decode(offs_k, offs_n, mask_k, mask_n, P0, P1, P2, P3, I0, I1, I2, I3, C0, C1, C2, C3, C4)

returning the fp32 tile; ``P*`` are the format's tensors (pointers), ``I*`` its integers and
``C*`` its compile-time constants, in whatever meaning the format gives them (unused ones are
0). ``offs_k`` is always one contiguous run ``k0 + arange(BLOCK_K)`` (the bitmask format's
decode counts set bits from ``k0`` on). Tests run the kernels on CPU under
``TRITON_INTERPRET=1`` set before import, as for the integer format's own kernels
(:mod:`compress.formats.int.triton_kernels`); without it they need CUDA tensors. Imported only
where triton is installed (the ``gpu`` extra).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl

from compress.errors import FormatError

__all__ = [
    "GEMV_MAX_ROWS",
    "INTERPRETED",
    "Tile",
    "available",
    "dequant_gemm",
    "extract_bits",
    "linear",
    "splitk_gemv",
]

GEMV_MAX_ROWS = 4
"""Row counts up to this use the split-K GEMV; more rows use the dequant-GEMM."""

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Whether the kernels were built for Triton's CPU interpreter (set at import time)."""


@triton.jit
def extract_bits(ptr, row_offset, index, limit, mask, BITS: tl.constexpr):
    """Codes ``index`` of the little-endian bit streams starting at ``ptr + row_offset`` (``limit``
    bytes): code ``i`` starts at bit ``i*BITS``, so it lies in byte ``i*BITS >> 3`` and, for
    widths that do not divide 8, may spill into the next one; every width 2..8 is one two-byte
    load, a shift and a mask (the layout of :mod:`compress.formats.packing`)."""
    bit = index * BITS
    byte = row_offset + (bit >> 3)
    lo = tl.load(ptr + byte, mask=mask, other=0).to(tl.int32)
    if BITS == 8:
        code = lo
    elif 8 % BITS == 0:  # 2 and 4 bits never straddle a byte
        code = (lo >> (bit & 7)) & ((1 << BITS) - 1)
    else:
        hi = tl.load(ptr + byte + 1, mask=mask & (byte + 1 < limit), other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> (bit & 7)) & ((1 << BITS) - 1)
    return code


@triton.jit
def _gemm_kernel(
    x_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    P0,
    P1,
    P2,
    P3,
    I0,
    I1,
    I2,
    I3,
    DECODE: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    C4: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = DECODE(
            offs_k, offs_n, mask_k, mask_n, P0, P1, P2, P3, I0, I1, I2, I3, C0, C1, C2, C3, C4
        )
        if DOT_FP32:  # the interpreter: the same roundings, products taken in fp32
            acc += tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _gemv_kernel(
    x_ptr,
    part_ptr,
    M,
    N,
    K,
    stride_xm,
    k_per_split,
    P0,
    P1,
    P2,
    P3,
    I0,
    I1,
    I2,
    I3,
    DECODE: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    C4: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_start = pid_s * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    for m in range(0, M):
        acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_stop
            w = DECODE(
                offs_k, offs_n, mask_k, mask_n, P0, P1, P2, P3, I0, I1, I2, I3, C0, C1, C2, C3, C4
            )
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc += w * x[:, None]
        part = part_ptr + (pid_s * M + m).to(tl.int64) * N + offs_n
        tl.store(part, tl.reduce(acc, 0, tl.standard._sum_combine), mask=mask_n)


class Tile:
    """What a format hands the kernels: its decode function and its arguments."""

    def __init__(
        self,
        decode: Any,
        tensors: Sequence[torch.Tensor],
        ints: Sequence[int] = (),
        consts: Sequence[int] = (),
    ) -> None:
        if not tensors or len(tensors) > 4 or len(ints) > 4 or len(consts) > 5:
            raise ValueError("a tile takes 1-4 tensors, at most 4 integers and 5 constants")
        pointers = [t.contiguous() for t in tensors]
        self.decode = decode
        self.pointers = pointers + [pointers[0]] * (4 - len(pointers))  # unused: any pointer
        self.ints = [int(i) for i in ints] + [0] * (4 - len(ints))
        self.consts = [int(c) for c in consts] + [0] * (5 - len(consts))

    def arguments(self) -> dict[str, Any]:
        named: dict[str, Any] = {"DECODE": self.decode}
        named.update({f"P{i}": p for i, p in enumerate(self.pointers)})
        named.update({f"I{i}": v for i, v in enumerate(self.ints)})
        named.update({f"C{i}": v for i, v in enumerate(self.consts)})
        return named


def available(device: str) -> bool:
    """Whether the kernels, as built at import, run on tensors of ``device``."""
    if device == "cuda":
        return not INTERPRETED and torch.cuda.is_available()
    return INTERPRETED and device == "cpu"


def _check(x: torch.Tensor, in_features: int, device: torch.device) -> None:
    if x.shape[-1] != in_features:
        raise FormatError(
            f"input has {x.shape[-1]} features, the packed layer expects {in_features}"
        )
    if x.device != device:
        raise FormatError(
            f"input on {x.device}, packed weights on {device}",
            hint="move the model and its inputs to the same device",
        )
    if x.device.type == "cpu" and not INTERPRETED:
        raise FormatError(
            "the Triton kernels need CUDA tensors",
            hint="run on a GPU, or set TRITON_INTERPRET=1 before importing compress (tests only)",
        )


def dequant_gemm(
    x: torch.Tensor,
    tile: Tile,
    out_features: int,
    in_features: int,
    *,
    block_m: int = 32,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """(M, K) activations x the packed (N, K) weight -> (M, N) in the activation dtype."""
    _check(x, in_features, tile.pointers[0].device)
    x2d = x.reshape(-1, in_features).contiguous()
    rows = x2d.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _gemm_kernel[grid](
        x2d,
        out,
        rows,
        out_features,
        in_features,
        x2d.stride(0),
        out.stride(0),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        # Triton's interpreter multiplies bf16 operands as their raw uint16 bits (triton 3.x)
        DOT_FP32=INTERPRETED and x.dtype == torch.bfloat16,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **tile.arguments(),
    )
    return out


def _splits(n_blocks: int, k_blocks: int, device: torch.device) -> int:
    """How many ways to split K so that about four programs per SM are in flight."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: few programs keep the tests fast, >1 still exercises the split
        target = 2 * n_blocks
    return max(1, min(k_blocks, target // max(1, n_blocks)))


def splitk_gemv(
    x: torch.Tensor,
    tile: Tile,
    out_features: int,
    in_features: int,
    *,
    block_n: int = 64,
    block_k: int = 128,
    splits: int | None = None,
) -> torch.Tensor:
    """Split-K GEMV for a few rows; same contract as :func:`dequant_gemm`."""
    _check(x, in_features, tile.pointers[0].device)
    x2d = x.reshape(-1, in_features).contiguous()
    rows, n, k = x2d.shape[0], out_features, in_features
    if rows == 0:
        return torch.empty(0, n, dtype=x.dtype, device=x.device)
    n_blocks, k_blocks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    splits = max(1, min(splits or _splits(n_blocks, k_blocks, x.device), k_blocks))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(k, k_per_split)  # no empty split after rounding up
    partial = torch.empty(splits, rows, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[(n_blocks, splits)](
        x2d,
        partial,
        rows,
        n,
        k,
        x2d.stride(0),
        k_per_split,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **tile.arguments(),
    )
    return partial.sum(dim=0).to(x.dtype)


def linear(
    x: torch.Tensor,
    tile: Tile,
    out_features: int,
    in_features: int,
    bias: torch.Tensor | None,
    kernel: str | None = None,
) -> torch.Tensor:
    """A packed Linear's forward on the GPU: split-K GEMV for decode, dequant-GEMM for prefill;
    ``kernel`` (``"gemv"`` or ``"gemm"``) overrides the choice by row count."""
    if kernel is None:
        kernel = "gemv" if x.numel() // x.shape[-1] <= GEMV_MAX_ROWS else "gemm"
    run = splitk_gemv if kernel == "gemv" else dequant_gemm
    out = run(x, tile, out_features, in_features)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], out_features)
