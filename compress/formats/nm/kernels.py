"""Kernels of the N:M sparse integer format, and the one function that picks one.

Every kernel takes the activations and a :class:`~compress.formats.nm.packed.PackedNM`, never
the module that holds the buffers.

``reference``: the kept codes scattered back into a dense weight in the activation dtype, then
``F.linear``. The test oracle, and the prefill path (torch's GEMM on the decoded weight).

``cpu_gemv``: the native GEMV of :mod:`compress.formats.nm.cpu`, which reads only the kept codes
and their positions and gathers the activations they multiply; chosen for up to
:data:`~compress.formats.nm.cpu.MAX_ROWS` activation rows on the CPU when the extension builds.

``triton_gemv`` / ``triton_gemm``: on CUDA, when triton is installed (the ``gpu`` extra), the
split-K GEMV (few rows) or dequant-GEMM of :mod:`compress.formats.nm.triton_kernels`.

``COMPRESS_KERNEL`` names a kernel; one this format does not have (or ``cpu_gemv`` where the
native build is unavailable) is logged once and the default is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress.formats.base import select_packed_kernel, triton_kernel
from compress.formats.nm import cpu
from compress.formats.nm.packed import PackedNM
from compress.formats.nm.spec import NMIntFormat

__all__ = ["KERNELS", "Kernel", "describe", "log_choice", "select"]

log = logging.getLogger(__name__)

_LOGGED: set[tuple[str, str]] = set()

Kernel = Callable[[torch.Tensor, PackedNM], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""


def _reference(x: torch.Tensor, w: PackedNM) -> torch.Tensor:
    bias = w.bias.to(x.dtype) if w.bias is not None else None
    return F.linear(x, w.dequantize(x.dtype), bias)


def _cpu_gemv(x: torch.Tensor, w: PackedNM) -> torch.Tensor:
    return cpu.gemv(x, w)


_TRITON_MODULE = "compress.formats.nm.triton_kernels"  # the `gpu` extra
KERNELS: dict[str, Kernel] = {
    "reference": _reference,
    "cpu_gemv": _cpu_gemv,
    "triton_gemv": triton_kernel(_TRITON_MODULE, "gemv"),
    "triton_gemm": triton_kernel(_TRITON_MODULE, "gemm"),
}


def select(
    fmt: NMIntFormat, in_features: int, *, rows: int, dtype: torch.dtype, device: str = "cpu"
) -> str:
    """The kernel for a format, input width, activation dtype, row count and device."""
    return select_packed_kernel(
        KERNELS,
        rows=rows,
        device=device,
        native=cpu.native,
        native_rows=cpu.MAX_ROWS,
        fallback="reference",
        what="the N:M sparse format",
    )


def describe(fmt: NMIntFormat, in_features: int) -> str:
    """Human summary of the paths a format takes, for ``compress inspect``."""
    reference = "reference (kept codes scattered into a dense weight, F.linear)"
    if cpu.native() is not None:
        isa = "vector gather" if cpu.vectorized() else "portable"
        return f"cpu_gemv (native, reads only kept codes, {isa}; ≤{cpu.MAX_ROWS} rows), {reference}"
    return reference


def log_choice(kernel: str, fmt: NMIntFormat) -> None:
    """Log, once per (kernel, format), which path NMLinear takes."""
    key = (kernel, fmt.label())
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("NMLinear %s uses kernel %r", key[1], kernel)
