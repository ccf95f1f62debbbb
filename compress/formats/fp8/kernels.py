"""Kernels of the FP8 format, and the one function that picks one.

Every kernel takes the activations and a :class:`~compress.formats.fp8.packed.PackedFP8` (the
stored tensors and the format), never the module that holds them.

``reference``: FP8 codes to fp32 (torch's cast), times the expanded scales, cast to the
activation dtype, ``F.linear``. The test oracle, and for now the only CPU path.

Measured before choosing (torch 2.13, one thread of a Sapphire Rapids Xeon, 4096×4096 weight,
one bf16 row; ``benchmarks/fp8.md``): the bf16 GEMV takes about 3.5 ms, while any
dequantization built from torch element-wise ops costs 30-80× that: the float8 → fp32 cast is a
scalar loop (about 110-140 ms), decoding the bit patterns through fp16 with integer ops
(sign | exponent-mantissa << 7, × 256) about 200-300 ms, a 256-entry table gathered by int32
indices about 270 ms, and ``torch._scaled_mm`` on CPU about 1 s. None pays, so there is no second
path: the fast CPU path is a fused native FP8 GEMV (decode in registers, like the integer
format's ``cpu_gemv``), left for the step that adds it.

``COMPRESS_KERNEL`` names a kernel of the integer format; an FP8 module set to one it does not
have uses the reference and says so once in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compress.formats.fp8.packed import PackedFP8
from compress.formats.fp8.spec import FP8Format

__all__ = ["KERNELS", "Kernel", "describe", "log_choice", "run", "select"]

log = logging.getLogger(__name__)

_LOGGED: set[tuple[str, str]] = set()

Kernel = Callable[[torch.Tensor, PackedFP8], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""


def _reference(x: torch.Tensor, w: PackedFP8) -> torch.Tensor:
    weight = w.dequantize(x.dtype)
    bias = w.bias.to(x.dtype) if w.bias is not None else None
    return F.linear(x, weight, bias)


KERNELS: dict[str, Kernel] = {"reference": _reference}


def select(
    fmt: FP8Format, in_features: int, *, rows: int, dtype: torch.dtype, device: str = "cpu"
) -> str:
    """The kernel for a format, input width, activation dtype, row count and device."""
    forced = os.environ.get("COMPRESS_KERNEL", "")
    if forced and forced not in KERNELS:
        key = ("forced", forced)
        if key not in _LOGGED:
            _LOGGED.add(key)
            log.warning(
                "COMPRESS_KERNEL=%s: the fp8 format has no such kernel (it has %s); "
                "fp8 modules use the reference kernel",
                forced,
                ", ".join(sorted(KERNELS)),
            )
    return "reference"


def describe(fmt: FP8Format, in_features: int, device: str = "cpu") -> str:
    """Human summary of the path a format takes, for ``compress inspect``."""
    return "reference (fp8 → activation dtype, F.linear; no fused FP8 kernel yet)"


def log_choice(kernel: str, fmt: FP8Format) -> None:
    """Log, once per (kernel, format), which path FP8Linear takes."""
    key = (kernel, fmt.label())
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("FP8Linear %s uses kernel %r", key[1], kernel)


def run(kernel: str, x: torch.Tensor, w: PackedFP8) -> torch.Tensor:
    log_choice(kernel, w.fmt)
    return KERNELS[kernel](x, w)
