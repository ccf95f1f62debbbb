"""Kernels of the integer format, and the one function that picks one.

Every kernel takes the activations and a :class:`~compress.formats.int.packed.PackedInt` (the
stored tensors and the format), never the module that holds them.

Decode at batch 1 is memory bound: its time is the bytes of packed weights over the memory
bandwidth, so the fast paths never build a dense weight.

``cpu_gemv``: native fused unpack + dequantize + dot (:mod:`compress.formats.int.cpu`), all cores;
bf16/fp16 activations as int16 integer dots (AVX2 ``vpmaddwd``, AVX-512 VNNI ``vpdpwssd``), fp32
ones exact. For decode and small batches.

``cpu_gemm``: for prefill, where the dot products, not the weight bytes, cost most. bf16
activations: on AMX CPUs a GEMM of our own on AMX tiles (weight panels dequantized straight into
tile blocks); elsewhere tiles of rows dequantized to bf16 for torch's bf16 GEMM where the CPU has
bf16 hardware, else to fp32 for its fp32 GEMM (always for fp32 activations, exactly).

Where GEMV hands over to GEMM depends on the build and the activation dtype
(:func:`compress.formats.int.cpu.gemv_max_rows`, measured); the instruction set of the build is the
CPU's (``COMPRESS_CPU_ISA`` forces a lower one, see :mod:`compress.utils.native`).

``reference``: unpack codes, dequantize to the activation dtype, ``F.linear``. The test oracle,
and the path everywhere else: when the native build is unavailable (no compiler; the reason is
logged once) or ``COMPRESS_KERNEL=reference``.

``torch_int8``: PyTorch's ``_weight_int8pack_mm`` for symmetric per-channel int8 with bf16/fp16
activations and few rows; only used without the native build, where it beats the reference.
Only for input widths that are a multiple of 16: otherwise torch 2.13's op kills the process or
returns garbage (measured in subprocesses on an AVX-512 CPU, ATen's AVX-512 and AVX2 kernels
alike: bf16 activations with K % 16 != 0 segfault at two or more rows and come back wrong at one
or three; fp16 passed, and is held to the same rule).

``triton_gemv`` / ``triton_gemm``: on CUDA, when triton is installed (the ``gpu`` extra), the
split-K GEMV (few rows) or dequant-GEMM of :mod:`compress.formats.int.triton_kernels`.

``COMPRESS_KERNEL=<name>`` forces a kernel (``reference`` for tests and comparisons). The chosen
path is logged once per (kernel, format) and shown by ``compress inspect``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress.errors import ExportError, nearest
from compress.formats.int import cpu
from compress.formats.int.packed import PackedInt
from compress.formats.int.spec import IntFormat

__all__ = ["GEMV_MAX_ROWS", "KERNELS", "Kernel", "describe", "log_choice", "run", "select"]

log = logging.getLogger(__name__)

GEMV_MAX_ROWS = 16
"""No build takes a GEMV for more rows than this, and :func:`select`'s answer does not depend on
the row count above it; the crossover itself depends on the build and dtype
(:func:`compress.formats.int.cpu.gemv_max_rows`)."""

_TORCH_INT8_MAX_ROWS = 16
_TORCH_INT8_K_MULTIPLE = 16  # in_features must be a multiple of this (see the module docstring)
_TRITON_GEMV_MAX_ROWS = 4  # triton_kernels.GEMV_MAX_ROWS, not imported here: triton is optional
_LOGGED: set[tuple[str, str]] = set()


Kernel = Callable[[torch.Tensor, PackedInt], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""


def _reference(x: torch.Tensor, w: PackedInt) -> torch.Tensor:
    weight = w.dequantize(x.dtype)
    bias = w.bias.to(x.dtype) if w.bias is not None else None
    return F.linear(x, weight, bias)


def _torch_int8(x: torch.Tensor, w: PackedInt) -> torch.Tensor:
    if w.in_features % _TORCH_INT8_K_MULTIPLE:  # forced: never hand the op such a shape
        key = ("torch_int8 refused", f"K={w.in_features}")
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.warning(
                "COMPRESS_KERNEL=torch_int8: in_features %d is not a multiple of %d, which "
                "torch's _weight_int8pack_mm cannot take; using the reference kernel",
                w.in_features,
                _TORCH_INT8_K_MULTIPLE,
            )
        return _reference(x, w)
    # Offset-128 unsigned codes become two's-complement int8 by flipping the top bit.
    weight = (w.qweight ^ 0x80).view(torch.int8)
    scales = w.fmt.scale_values(w.scales[:, 0]).to(x.dtype)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.aten._weight_int8pack_mm(flat, weight, scales)
    if w.bias is not None:
        out = out + w.bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], w.out_features)


def _native(fn: Callable[..., torch.Tensor]) -> Kernel:
    def kernel(x: torch.Tensor, w: PackedInt) -> torch.Tensor:
        return fn(x, w.qweight, w.scales, w.qzeros, w.fmt.bits, w.fmt.group_size, w.bias)

    return kernel


def _triton(kind: str) -> Kernel:
    def kernel(x: torch.Tensor, w: PackedInt) -> torch.Tensor:
        from compress.formats.int import triton_kernels  # the `gpu` extra; imported on first use

        return triton_kernels.triton_linear(x, w, kind)

    return kernel


KERNELS: dict[str, Kernel] = {
    "reference": _reference,
    "torch_int8": _torch_int8,
    "cpu_gemv": _native(cpu.gemv),
    "cpu_gemm": _native(cpu.gemm),
    "triton_gemv": _triton("gemv"),
    "triton_gemm": _triton("gemm"),
}


def _forced() -> str | None:
    name = os.environ.get("COMPRESS_KERNEL", "")
    if not name:
        return None
    if name not in KERNELS:
        guess = nearest(name, KERNELS)
        raise ExportError(
            f"COMPRESS_KERNEL={name!r} is not a kernel"
            + (f" (did you mean {guess!r}?)" if guess else ""),
            hint=f"use one of {sorted(KERNELS)}, or unset COMPRESS_KERNEL",
        )
    return name


def select(
    fmt: IntFormat, in_features: int, *, rows: int, dtype: torch.dtype, device: str = "cpu"
) -> str:
    """The fastest correct kernel for a format, input width, activation dtype and row count.

    The single place where a path is chosen: one branch per device.
    """
    forced = _forced()
    if forced is not None:
        return forced
    if device == "cpu":
        if cpu.native() is not None:  # first call builds (cached); failure logged once
            return "cpu_gemv" if rows <= cpu.gemv_max_rows(dtype) else "cpu_gemm"
        if (
            fmt.bits == 8
            and fmt.symmetric
            and fmt.group_size in (None, in_features)
            and dtype in (torch.bfloat16, torch.float16)
            and rows <= _TORCH_INT8_MAX_ROWS
            and in_features % _TORCH_INT8_K_MULTIPLE == 0
        ):
            return "torch_int8"
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton_gemv" if rows <= _TRITON_GEMV_MAX_ROWS else "triton_gemm"
    return "reference"


def describe(
    fmt: IntFormat, in_features: int, device: str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> str:
    """Human summary of the paths a format takes for ``dtype`` activations, e.g. ``cpu_gemv
    (≤4 rows; int16 dots), cpu_gemm (amx); amx build``."""
    decode = select(fmt, in_features, rows=1, dtype=dtype, device=device)
    prefill = select(fmt, in_features, rows=GEMV_MAX_ROWS + 1, dtype=dtype, device=device)
    native = device == "cpu" and cpu.native() is not None
    int16 = (
        decode == "cpu_gemv"
        and dtype in (torch.bfloat16, torch.float16)
        and cpu.vectorized()
        and cpu.int16_path(fmt.bits, fmt.group_size, in_features)
    )
    how = (
        f" ({cpu.gemm_path(dtype, fmt.group_size, in_features)})"
        if prefill == "cpu_gemm" and native
        else ""
    )
    if decode == prefill:  # one path for every row count (a forced kernel)
        text = decode + (" (int16 dots)" if int16 else "") + how
    else:
        detail = "; int16 dots" if int16 else ""
        rows = cpu.gemv_max_rows(dtype) if native else GEMV_MAX_ROWS
        text = f"{decode} (≤{rows} rows{detail}), {prefill}{how}"
    if native and decode.startswith("cpu_"):
        text += f"; {cpu.isa()} build"
    if device == "cpu" and decode == "reference" and _forced() is None:
        text += " (native CPU kernels unavailable; see the log)"
    return text


def log_choice(kernel: str, fmt: IntFormat) -> None:
    """Log, once per (kernel, format), which path QuantLinear takes."""
    key = (kernel, f"int{fmt.bits}/g{fmt.group_size}")
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("QuantLinear %s uses kernel %r", key[1], kernel)


def run(kernel: str, x: torch.Tensor, w: PackedInt) -> torch.Tensor:
    log_choice(kernel, w.fmt)
    return KERNELS[kernel](x, w)
