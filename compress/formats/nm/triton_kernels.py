"""Triton kernels of the N:M sparse integer format: GPU prefill (dequant-GEMM) and decode
(split-K GEMV), reading the module's buffers as stored.

Both decode a ``BLOCK_K x BLOCK_N`` tile of ``W.T`` from the kept codes: column ``k`` lies in run
``k // m`` at place ``k % m``; the run's ``n`` kept codes (``j = run * n + t``) and their
positions are read, and the tile takes the code whose position is that place (zero if none).
So a tile costs ``n`` code and position reads per weight, all of them from the same few bytes
(cached), and the kernels are the integer format's with that decode (its ``_extract`` reads the
bit streams). Tests run them on CPU under ``TRITON_INTERPRET=1``, set before import, as for the
integer kernels (see :mod:`compress.formats.int.triton_kernels`).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from compress.formats.int.triton_kernels import (
    GEMV_MAX_ROWS,
    INTERPRETED,
    _extract,
    available,
)
from compress.formats.int.triton_kernels import _splits as splits_for
from compress.formats.nm.packed import PackedNM

__all__ = [
    "GEMV_MAX_ROWS",
    "INTERPRETED",
    "available",
    "dequant_gemm",
    "splitk_gemv",
    "triton_linear",
]


@triton.jit
def _nm_tile(
    qw_ptr,
    qi_ptr,
    scale_ptr,
    qz_ptr,
    offs_k,
    offs_n,
    mask_k,
    mask_n,
    q_bytes,
    i_bytes,
    groups,
    group_size,
    zero_bytes,
    BITS: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    KEEP: tl.constexpr,
    RUN: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    E8M0: tl.constexpr,
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
        position = _extract(qi_ptr, i_start, j, i_start + i_bytes, mask, INDEX_BITS)
        kept = _extract(qw_ptr, q_start, j, q_start + q_bytes, mask, BITS)
        hit = position == place
        code = tl.where(hit, kept, code)
        found = found | hit
    group = row * groups + col // group_size
    scale = tl.load(scale_ptr + group, mask=mask, other=0.0).to(tl.float32)
    if E8M0:
        scale = tl.exp2(scale - 127.0)
    if SYMMETRIC:  # noqa: SIM108 (constexpr: the other branch is never compiled)
        zero = 1 << (BITS - 1)
    else:
        zero = _extract(qz_ptr, 0, group, zero_bytes, mask, BITS)
    return tl.where(found, (code - zero).to(tl.float32) * scale, 0.0)


@triton.jit
def _nm_gemm_kernel(
    x_ptr,
    qw_ptr,
    qi_ptr,
    scale_ptr,
    qz_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    q_bytes,
    i_bytes,
    groups,
    group_size,
    zero_bytes,
    BITS: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    KEEP: tl.constexpr,
    RUN: tl.constexpr,
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
        w = _nm_tile(
            qw_ptr,
            qi_ptr,
            scale_ptr,
            qz_ptr,
            offs_k,
            offs_n,
            mask_k,
            mask_n,
            q_bytes,
            i_bytes,
            groups,
            group_size,
            zero_bytes,
            BITS,
            INDEX_BITS,
            KEEP,
            RUN,
            SYMMETRIC,
            E8M0,
        )
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _nm_gemv_kernel(
    x_ptr,
    qw_ptr,
    qi_ptr,
    scale_ptr,
    qz_ptr,
    part_ptr,
    M,
    N,
    K,
    stride_xm,
    k_per_split,
    q_bytes,
    i_bytes,
    groups,
    group_size,
    zero_bytes,
    BITS: tl.constexpr,
    INDEX_BITS: tl.constexpr,
    KEEP: tl.constexpr,
    RUN: tl.constexpr,
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
        acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
        for k0 in range(k_start, k_stop, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_stop
            w = _nm_tile(
                qw_ptr,
                qi_ptr,
                scale_ptr,
                qz_ptr,
                offs_k,
                offs_n,
                mask_k,
                mask_n,
                q_bytes,
                i_bytes,
                groups,
                group_size,
                zero_bytes,
                BITS,
                INDEX_BITS,
                KEEP,
                RUN,
                SYMMETRIC,
                E8M0,
            )
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            acc += w * x[:, None]
        part = part_ptr + (pid_s * M + m).to(tl.int64) * N + offs_n
        tl.store(part, tl.reduce(acc, 0, tl.standard._sum_combine), mask=mask_n)


def _layout(w: PackedNM) -> dict[str, Any]:
    fmt = w.fmt
    groups = fmt.values.groups(w.in_features)
    return {
        "q_bytes": w.qweight.shape[1],
        "i_bytes": w.qindex.shape[1],
        "groups": groups,
        "group_size": w.in_features // groups,
        "zero_bytes": 0 if w.qzeros is None else w.qzeros.numel(),
        "BITS": fmt.bits,
        "INDEX_BITS": fmt.index_bits,
        "KEEP": fmt.n,
        "RUN": fmt.m,
        "SYMMETRIC": w.qzeros is None,
        "E8M0": fmt.values.power_of_two_scales,
    }


def _check_inputs(w: PackedNM, x: torch.Tensor) -> None:
    from compress.errors import FormatError

    if x.shape[-1] != w.in_features:
        raise FormatError(
            f"input has {x.shape[-1]} features, the packed layer expects {w.in_features}"
        )
    if x.device != w.qweight.device:
        raise FormatError(f"input on {x.device}, packed weights on {w.qweight.device}")
    if x.device.type == "cpu" and not INTERPRETED:
        raise FormatError(
            "the Triton kernels need CUDA tensors",
            hint="run on a GPU, or set TRITON_INTERPRET=1 before importing compress (tests only)",
        )


def dequant_gemm(
    w: PackedNM, x: torch.Tensor, *, block_m: int = 32, block_n: int = 64, block_k: int = 64
) -> torch.Tensor:
    """(M, K) activations x packed (N, K) weight -> (M, N) in the activation dtype (no bias)."""
    _check_inputs(w, x)
    x2d = x.reshape(-1, w.in_features).contiguous()
    rows, n = x2d.shape[0], w.out_features
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    _nm_gemm_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, block_n))](
        x2d,
        w.qweight,
        w.qindex,
        w.scales.contiguous(),
        w.qzeros if w.qzeros is not None else w.qweight,  # a pointer symmetric never reads
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


def splitk_gemv(
    w: PackedNM,
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
    splits = max(1, min(splits or splits_for(n_blocks, k_blocks, x.device), k_blocks))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(k, k_per_split)
    partial = torch.empty(splits, rows, n, dtype=torch.float32, device=x.device)
    _nm_gemv_kernel[(n_blocks, splits)](
        x2d,
        w.qweight,
        w.qindex,
        w.scales.contiguous(),
        w.qzeros if w.qzeros is not None else w.qweight,
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


def triton_linear(x: torch.Tensor, w: PackedNM, kernel: str | None = None) -> torch.Tensor:
    """``NMLinear.forward`` on the GPU: split-K GEMV for decode, dequant-GEMM for prefill."""
    if kernel is None:
        kernel = "gemv" if x.numel() // x.shape[-1] <= GEMV_MAX_ROWS else "gemm"
    out = (splitk_gemv if kernel == "gemv" else dequant_gemm)(w, x)
    if w.bias is not None:
        out = out + w.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], w.out_features)
