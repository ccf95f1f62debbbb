"""Kernels of the 4-bit table formats, and the one function that picks one.

Every kernel takes the activations and a :class:`~compress.formats.fp4.packed.PackedFP4` (the
stored tensors and the format), never the module that holds them.

``reference``: the whole weight decoded (nibbles -> table values -> times the expanded block
scales) into the activation dtype, then ``F.linear``. The test oracle.

``cpu_tiled``: the same decode a slab of output rows at a time, each slab multiplied as soon as
it is decoded, so a forward holds one slab of dense weight (at most ``_SLAB_BYTES``) beside the
packed codes instead of the whole dense matrix. The same products as the reference (each output
column is the dot product with one row of the weight); only the BLAS blocking may differ.

``COMPRESS_KERNEL`` names a kernel; one this format does not have is logged once and the default
(``cpu_tiled``) is used.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress.formats.fp4.packed import PackedFP4
from compress.formats.fp4.spec import FP4Format

__all__ = ["KERNELS", "Kernel", "describe", "log_choice", "run", "select"]

log = logging.getLogger(__name__)

_LOGGED: set[tuple[str, str]] = set()
_SLAB_BYTES = 4 << 20

Kernel = Callable[[torch.Tensor, PackedFP4], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""


def _bias(x: torch.Tensor, w: PackedFP4) -> torch.Tensor | None:
    return w.bias.to(x.dtype) if w.bias is not None else None


def _reference(x: torch.Tensor, w: PackedFP4) -> torch.Tensor:
    return F.linear(x, w.dequantize(x.dtype), _bias(x, w))


def _cpu_tiled(x: torch.Tensor, w: PackedFP4) -> torch.Tensor:
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


KERNELS: dict[str, Kernel] = {"reference": _reference, "cpu_tiled": _cpu_tiled}


def select(
    fmt: FP4Format, in_features: int, *, rows: int, dtype: torch.dtype, device: str = "cpu"
) -> str:
    """The kernel for a format, input width, activation dtype, row count and device."""
    forced = os.environ.get("COMPRESS_KERNEL", "")
    if forced in KERNELS:
        return forced
    if forced:
        key = ("forced", forced)
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.warning(
                "COMPRESS_KERNEL=%s: the 4-bit table formats have no such kernel (they have "
                "%s); their modules use cpu_tiled",
                forced,
                ", ".join(sorted(KERNELS)),
            )
    return "cpu_tiled"


def describe(fmt: FP4Format, in_features: int, device: str = "cpu") -> str:
    """Human summary of the path a format takes, for ``compress inspect``."""
    return "cpu_tiled (decode a slab of rows to the activation dtype, F.linear; no fused kernel)"


def log_choice(kernel: str, fmt: FP4Format) -> None:
    """Log, once per (kernel, format), which path FP4Linear takes."""
    key = (kernel, fmt.label())
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("FP4Linear %s uses kernel %r", key[1], kernel)


def run(kernel: str, x: torch.Tensor, w: PackedFP4) -> torch.Tensor:
    log_choice(kernel, w.fmt)
    return KERNELS[kernel](x, w)
