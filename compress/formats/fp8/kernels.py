"""Kernels of the FP8 format, and the one function that picks one.

Every kernel takes the activations and a :class:`~compress.formats.fp8.packed.PackedFP8` (the
stored tensors and the format), never the module that holds them.

``reference``: FP8 codes to fp32 (torch's cast), times the expanded scales, cast to the
activation dtype, ``F.linear``. The test oracle, and the prefill path.

``cpu_gemv``: the native fused GEMV of :mod:`compress.formats.fp8.cpu` (codes turned into fp16
bit patterns and converted by the hardware, AVX-512 or AVX2; fp32 products and sums, each scale
block's sum scaled once; weights not rounded to the activation dtype), chosen for up
to :data:`~compress.formats.fp8.cpu.MAX_ROWS` activation rows on the CPU when the extension
builds here.

Why no torch-level decode for decode steps (torch 2.13, one thread of a Sapphire Rapids Xeon,
4096×4096 weight, one bf16 row; ``benchmarks/fp8.md``): the bf16 GEMV takes about 3.5 ms, while
any dequantization built from torch element-wise ops costs 30-80× that (the float8 → fp32 cast is
a scalar loop, 110-140 ms; bit tricks through fp16, 200-300 ms; a gathered 256-entry table,
270 ms; ``torch._scaled_mm`` on CPU, 1 s).

``COMPRESS_KERNEL`` names a kernel of the integer format; an FP8 module set to one it does not
have uses the reference and says so once in the log.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compress.formats.base import PackedKernels
from compress.formats.fp8 import cpu
from compress.formats.fp8.packed import PackedFP8
from compress.formats.fp8.spec import FP8Format

__all__ = ["KERNELS", "Kernel", "describe", "log_choice", "run", "select"]

Kernel = Callable[[torch.Tensor, PackedFP8], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""

_TABLE = PackedKernels(
    cpu=cpu,
    triton_module="compress.formats.fp8.triton_kernels",  # the `gpu` extra
    module_class="FP8Linear",
    what="the fp8 format",
    tiled=False,
)
KERNELS: dict[str, Kernel] = _TABLE.KERNELS
select = _TABLE.select
log_choice = _TABLE.log_choice
run = _TABLE.run


def describe(fmt: FP8Format, in_features: int, device: str = "cpu") -> str:
    """Human summary of the path a format takes, for ``compress inspect``."""
    reference = "reference (fp8 → activation dtype, F.linear)"
    if device == "cpu" and cpu.native() is not None:
        isa = "vector" if cpu.vectorized() else "portable"
        return f"cpu_gemv (native fused, {isa}; ≤{cpu.MAX_ROWS} rows), {reference}"
    return reference
