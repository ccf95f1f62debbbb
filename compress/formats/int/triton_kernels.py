"""Triton kernels of the integer format (packed buffers + format): GPU prefill and decode.

Both read the module's buffers exactly as they are stored (the layout in ``packing.py`` and
``qlinear.py``), so a loaded export runs on the GPU with no repacking:

``dequant_gemm``
    prefill (many rows). Tiles of ``BLOCK_M x BLOCK_N`` outputs; each step over ``K`` unpacks a
    ``BLOCK_K x BLOCK_N`` tile of codes, dequantizes it in registers and feeds ``tl.dot``.
``splitk_gemv``
    decode (a few rows). A GEMV has too few output tiles to fill a GPU, so ``K`` is also split
    across programs; each writes an fp32 partial sum and the partials are added afterwards
    (deterministic, unlike atomics).

Code ``k`` of a row starts at bit ``k*b`` of the row's little-endian bit stream, so it lies in
byte ``k*b >> 3`` and, for widths that do not divide 8, may spill into the next byte: every
width 2..8 is one two-byte load, a shift and a mask. Zero points (asymmetric formats) are one
bit stream over the ``(N, G)`` grid, read the same way.

Tests run these kernels on CPU with ``TRITON_INTERPRET=1`` set before this module is imported
(Triton picks interpreter or compiler when a kernel is decorated). Without it they need CUDA
tensors; :func:`available` says whether they can run on a device. The kernels use only
``triton.language`` builtins (``tl.full``, ``tl.reduce``), not its ``@jit`` helpers
(``tl.zeros``, ``tl.sum``), because those stay compiled-mode functions when triton itself was
imported before the variable was set (transformers imports it), and the interpreter cannot
call them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from compress.errors import FormatError
from compress.formats.int.packed import PackedInt

__all__ = [
    "GEMV_MAX_ROWS",
    "INTERPRETED",
    "available",
    "dequant_gemm",
    "splitk_gemv",
    "triton_linear",
]

GEMV_MAX_ROWS = 4
"""Row counts up to this use the split-K GEMV; more rows use the dequant-GEMM."""

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Whether the kernels were built for Triton's CPU interpreter (set at import time)."""


def available(device: str) -> bool:
    """Whether the kernels, as built at import, run on tensors of ``device``."""
    if device == "cuda":
        return not INTERPRETED and torch.cuda.is_available()
    return INTERPRETED and device == "cpu"


@triton.jit
def _extract(ptr, row_offset, index, limit, mask, BITS: tl.constexpr):
    """Codes ``index`` of the bit streams starting at ``ptr + row_offset`` (``limit`` bytes)."""
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
def _dequant_tile(
    qw_ptr,
    scale_ptr,
    qz_ptr,
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    row_bytes,
    groups,
    group_size,
    zero_bytes,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    E8M0: tl.constexpr,
):
    """(BLOCK_K, BLOCK_N) fp32 tile of ``W.T``: ``(code - zero) * scale``."""
    mask = mask_k[:, None] & mask_n[None, :]
    row = offs_n[None, :].to(tl.int64)
    start = row * row_bytes
    code = _extract(qw_ptr, start, offs_k[:, None], start + row_bytes, mask, BITS)
    group = row * groups + offs_k[:, None] // group_size
    scale = tl.load(scale_ptr + group, mask=mask, other=0.0).to(tl.float32)
    if E8M0:  # a power-of-two exponent byte: 2**(e - 127), exact in fp32
        scale = tl.exp2(scale - 127.0)
    if SYMMETRIC:  # noqa: SIM108 (constexpr: the other branch is never compiled)
        zero = 1 << (BITS - 1)
    else:
        zero = _extract(qz_ptr, 0, group, zero_bytes, mask, BITS)
    return (code - zero).to(tl.float32) * scale


@triton.jit
def _dequant_gemm_kernel(
    x_ptr,
    qw_ptr,
    scale_ptr,
    qz_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    row_bytes,
    groups,
    group_size,
    zero_bytes,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    E8M0: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
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
        w = _dequant_tile(
            qw_ptr,
            scale_ptr,
            qz_ptr,
            offs_k,
            offs_n,
            mask_k,
            mask_n,
            row_bytes,
            groups,
            group_size,
            zero_bytes,
            BITS,
            SYMMETRIC,
            E8M0,
        )
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_gemv_kernel(
    x_ptr,
    qw_ptr,
    scale_ptr,
    qz_ptr,
    part_ptr,
    M,
    N,
    K,
    stride_xm,
    k_per_split,
    row_bytes,
    groups,
    group_size,
    zero_bytes,
    BITS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    E8M0: tl.constexpr,
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
        # Elementwise partial products, reduced over K once at the end rather than every step.
        acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_stop
            w = _dequant_tile(
                qw_ptr,
                scale_ptr,
                qz_ptr,
                offs_k,
                offs_n,
                mask_k,
                mask_n,
                row_bytes,
                groups,
                group_size,
                zero_bytes,
                BITS,
                SYMMETRIC,
                E8M0,
            )
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc += w * x[:, None]
        part = part_ptr + (pid_s * M + m).to(tl.int64) * N + offs_n
        tl.store(part, tl.reduce(acc, 0, tl.standard._sum_combine), mask=mask_n)


def _check_inputs(w: PackedInt, x: torch.Tensor) -> None:
    if x.shape[-1] != w.in_features:
        raise FormatError(
            f"input has {x.shape[-1]} features, the packed layer expects {w.in_features}"
        )
    if x.device != w.qweight.device:
        raise FormatError(
            f"input on {x.device}, packed weights on {w.qweight.device}",
            hint="move the model and its inputs to the same device",
        )
    if x.device.type == "cpu" and not INTERPRETED:
        raise FormatError(
            "the Triton kernels need CUDA tensors",
            hint="run on a GPU, or set TRITON_INTERPRET=1 before importing compress (tests only)",
        )


def _layout(w: PackedInt) -> dict[str, Any]:
    groups = w.fmt.groups(w.in_features)
    return {
        "row_bytes": w.qweight.shape[1],
        "groups": groups,
        "group_size": w.in_features // groups,
        "zero_bytes": 0 if w.qzeros is None else w.qzeros.numel(),
        "BITS": w.fmt.bits,
        "SYMMETRIC": w.qzeros is None,
        "E8M0": w.fmt.power_of_two_scales,
    }


def _zeros_or_dummy(w: PackedInt) -> torch.Tensor:
    # Symmetric kernels never read it, but the launcher wants a pointer.
    return w.qzeros if w.qzeros is not None else w.qweight


def dequant_gemm(
    w: PackedInt,
    x: torch.Tensor,
    *,
    block_m: int = 32,
    block_n: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """(M, K) activations x packed (N, K) weight → (M, N) in the activation dtype (no bias)."""
    _check_inputs(w, x)
    x2d = x.reshape(-1, w.in_features).contiguous()
    rows, n = x2d.shape[0], w.out_features
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    grid = (triton.cdiv(rows, block_m), triton.cdiv(n, block_n))
    _dequant_gemm_kernel[grid](
        x2d,
        w.qweight,
        w.scales.contiguous(),
        _zeros_or_dummy(w),
        out,
        rows,
        n,
        w.in_features,
        x2d.stride(0),
        out.stride(0),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **_layout(w),
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
    w: PackedInt,
    x: torch.Tensor,
    *,
    block_n: int = 64,
    block_k: int = 128,
    splits: int | None = None,
) -> torch.Tensor:
    """Split-K GEMV for a few rows; same contract as :func:`dequant_gemm`."""
    _check_inputs(w, x)
    x2d = x.reshape(-1, w.in_features).contiguous()
    rows, n, k = x2d.shape[0], w.out_features, w.in_features
    if rows == 0:
        return torch.empty(0, n, dtype=x.dtype, device=x.device)
    n_blocks, k_blocks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    splits = splits or _splits(n_blocks, k_blocks, x.device)
    splits = max(1, min(splits, k_blocks))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(k, k_per_split)  # no empty split after rounding up
    partial = torch.empty(splits, rows, n, dtype=torch.float32, device=x.device)
    _splitk_gemv_kernel[(n_blocks, splits)](
        x2d,
        w.qweight,
        w.scales.contiguous(),
        _zeros_or_dummy(w),
        partial,
        rows,
        n,
        k,
        x2d.stride(0),
        k_per_split,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        **_layout(w),
    )
    return partial.sum(dim=0).to(x.dtype)


def triton_linear(x: torch.Tensor, w: PackedInt, kernel: str | None = None) -> torch.Tensor:
    """``QuantLinear.forward`` on the GPU: split-K GEMV for decode, dequant-GEMM for prefill.

    ``kernel`` (``"gemv"`` or ``"gemm"``) overrides the choice by row count.
    """
    if kernel is None:
        kernel = "gemv" if x.numel() // x.shape[-1] <= GEMV_MAX_ROWS else "gemm"
    out = (splitk_gemv if kernel == "gemv" else dequant_gemm)(w, x)
    if w.bias is not None:
        out = out + w.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], w.out_features)
