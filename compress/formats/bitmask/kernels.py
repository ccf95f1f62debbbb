"""Kernels of the bitmask sparse format, and the one function that picks one.

Every kernel takes the activations and a :class:`~compress.formats.bitmask.packed.PackedBitmask`,
never the module that holds the buffers.

``reference``: the values scattered back into a dense weight in the activation dtype, then
``F.linear``. The test oracle, and the prefill path (torch's GEMM on the decoded weight).

``cpu_gemv``: the native GEMV of :mod:`compress.formats.bitmask.cpu`, which walks each row's
bitmask and reads only its kept values; chosen for up to
:data:`~compress.formats.bitmask.cpu.MAX_ROWS` activation rows on the CPU when the extension
builds.

``triton_gemv`` / ``triton_gemm``: on CUDA, when triton is installed (the ``gpu`` extra), the
kernels of :mod:`compress.formats.bitmask.triton_kernels`.

``COMPRESS_KERNEL`` names a kernel; one this format does not have (or ``cpu_gemv`` where the
native build is unavailable) is logged once and the default is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress.formats.base import select_packed_kernel, triton_kernel
from compress.formats.bitmask import cpu
from compress.formats.bitmask.packed import PackedBitmask
from compress.formats.bitmask.spec import BitmaskFormat

__all__ = ["KERNELS", "Kernel", "describe", "log_choice", "select"]

log = logging.getLogger(__name__)

_LOGGED: set[tuple[str, str]] = set()

Kernel = Callable[[torch.Tensor, PackedBitmask], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""


def _reference(x: torch.Tensor, w: PackedBitmask) -> torch.Tensor:
    bias = w.bias.to(x.dtype) if w.bias is not None else None
    return F.linear(x, w.dequantize(x.dtype), bias)


def _cpu_gemv(x: torch.Tensor, w: PackedBitmask) -> torch.Tensor:
    return cpu.gemv(x, w)


_TRITON_MODULE = "compress.formats.bitmask.triton_kernels"  # the `gpu` extra
KERNELS: dict[str, Kernel] = {
    "reference": _reference,
    "cpu_gemv": _cpu_gemv,
    "triton_gemv": triton_kernel(_TRITON_MODULE, "gemv"),
    "triton_gemm": triton_kernel(_TRITON_MODULE, "gemm"),
}


def select(
    fmt: BitmaskFormat, in_features: int, *, rows: int, dtype: torch.dtype, device: str = "cpu"
) -> str:
    """The kernel for a format, input width, activation dtype, row count and device."""
    return select_packed_kernel(
        KERNELS,
        rows=rows,
        device=device,
        native=cpu.native,
        native_rows=cpu.MAX_ROWS,
        fallback="reference",
        what="the bitmask sparse format",
    )


def describe(fmt: BitmaskFormat, in_features: int) -> str:
    """Human summary of the paths a format takes, for ``compress inspect``."""
    reference = "reference (values scattered into a dense weight, F.linear)"
    if cpu.native() is not None:
        isa = "vector expand" if cpu.vectorized() else "portable"
        native = f"cpu_gemv (native, reads only kept values, {isa}; ≤{cpu.MAX_ROWS} rows)"
        return f"{native}, {reference}"
    return reference


def log_choice(kernel: str, fmt: BitmaskFormat) -> None:
    """Log, once per (kernel, format), which path BitmaskLinear takes."""
    key = (kernel, fmt.label())
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("BitmaskLinear %s uses kernel %r", key[1], kernel)
