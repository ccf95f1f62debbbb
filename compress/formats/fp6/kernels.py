"""Kernels of the MXFP6 formats, and the one function that picks one.

Every kernel takes the activations and a :class:`~compress.formats.fp6.packed.PackedFP6` (the
stored tensors and the format), never the module that holds them.

``reference``: the whole weight decoded (6-bit codes -> table values -> times the expanded
E8M0 scales) into the activation dtype, then ``F.linear``. The test oracle.

``cpu_tiled``: the same decode a slab of output rows at a time, each slab multiplied as soon as
it is decoded, so a forward holds one slab of dense weight (at most ``_SLAB_BYTES``) beside the
packed codes instead of the whole dense matrix. The same products as the reference; only the
BLAS blocking may differ.

``cpu_gemv``: the native fused GEMV of :mod:`compress.formats.fp6.cpu` (C++, not a torch path):
one pass over the packed bytes, codes decoded in AVX2 registers (or a portable loop) through
the 64-entry table, products and sums in fp32, weights not rounded to the activation dtype.
Chosen for up to :data:`~compress.formats.fp6.cpu.MAX_ROWS` activation rows on the CPU when the
extension builds here. Prefill (more rows) stays on ``cpu_tiled``, whose slabs feed torch's GEMM.

``triton_gemv`` / ``triton_gemm``: :mod:`compress.formats.fp6.triton_kernels` (CUDA).

``COMPRESS_KERNEL`` names a kernel; one this format does not have (or ``cpu_gemv`` where the
native build is unavailable) is logged once and the default is used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress.formats.base import select_packed_kernel, triton_kernel
from compress.formats.fp6 import cpu
from compress.formats.fp6.packed import PackedFP6
from compress.formats.fp6.spec import FP6Format

__all__ = ["KERNELS", "Kernel", "describe", "log_choice", "run", "select"]

log = logging.getLogger(__name__)

_LOGGED: set[tuple[str, str]] = set()
_SLAB_BYTES = 4 << 20

Kernel = Callable[[torch.Tensor, PackedFP6], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""


def _bias(x: torch.Tensor, w: PackedFP6) -> torch.Tensor | None:
    return w.bias.to(x.dtype) if w.bias is not None else None


def _reference(x: torch.Tensor, w: PackedFP6) -> torch.Tensor:
    return F.linear(x, w.dequantize(x.dtype), _bias(x, w))


def _cpu_tiled(x: torch.Tensor, w: PackedFP6) -> torch.Tensor:
    rows = max(1, _SLAB_BYTES // max(1, 4 * w.in_features))
    if rows >= w.out_features:
        return _reference(x, w)
    bias = _bias(x, w)
    parts = []
    for start in range(0, w.out_features, rows):
        stop = min(start + rows, w.out_features)
        slab = w.dequantize_rows(start, stop, x.dtype)  # (rows, K)
        parts.append(F.linear(x, slab, None if bias is None else bias[start:stop]))
    return torch.cat(parts, dim=-1)


def _cpu_gemv(x: torch.Tensor, w: PackedFP6) -> torch.Tensor:
    return cpu.gemv(x, w)


_TRITON_MODULE = "compress.formats.fp6.triton_kernels"  # the `gpu` extra
KERNELS: dict[str, Kernel] = {
    "reference": _reference,
    "cpu_tiled": _cpu_tiled,
    "cpu_gemv": _cpu_gemv,
    "triton_gemv": triton_kernel(_TRITON_MODULE, "gemv"),
    "triton_gemm": triton_kernel(_TRITON_MODULE, "gemm"),
}


def select(
    fmt: FP6Format, in_features: int, *, rows: int, dtype: torch.dtype, device: str = "cpu"
) -> str:
    """The kernel for a format, input width, activation dtype, row count and device."""
    return select_packed_kernel(
        KERNELS,
        rows=rows,
        device=device,
        native=cpu.native,
        native_rows=cpu.MAX_ROWS,
        fallback="cpu_tiled",
        what="the MXFP6 formats",
    )


def describe(fmt: FP6Format, in_features: int, device: str = "cpu") -> str:
    """Human summary of the path a format takes, for ``compress inspect``."""
    tiled = "cpu_tiled (decode a slab of rows to the activation dtype, F.linear)"
    if device == "cpu" and cpu.native() is not None:
        isa = "AVX2" if cpu.vectorized() else "portable"
        return f"cpu_gemv (native fused, {isa}; ≤{cpu.MAX_ROWS} rows), {tiled}"
    return tiled


def log_choice(kernel: str, fmt: FP6Format) -> None:
    """Log, once per (kernel, format), which path FP6Linear takes."""
    key = (kernel, fmt.label())
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("FP6Linear %s uses kernel %r", key[1], kernel)


def run(kernel: str, x: torch.Tensor, w: PackedFP6) -> torch.Tensor:
    log_choice(kernel, w.fmt)
    return KERNELS[kernel](x, w)
