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

from collections.abc import Callable

import torch

from compress.formats.base import PackedKernels
from compress.formats.bitmask import cpu
from compress.formats.bitmask.packed import PackedBitmask
from compress.formats.bitmask.spec import BitmaskFormat

__all__ = ["KERNELS", "Kernel", "describe", "log_choice", "select"]

Kernel = Callable[[torch.Tensor, PackedBitmask], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""

_TABLE = PackedKernels(
    cpu=cpu,
    triton_module="compress.formats.bitmask.triton_kernels",  # the `gpu` extra
    module_class="BitmaskLinear",
    what="the bitmask sparse format",
    tiled=False,
)
KERNELS: dict[str, Kernel] = _TABLE.KERNELS
select = _TABLE.select
log_choice = _TABLE.log_choice
run = _TABLE.run


def describe(fmt: BitmaskFormat, in_features: int) -> str:
    """Human summary of the paths a format takes, for ``compress inspect``."""
    reference = "reference (values scattered into a dense weight, F.linear)"
    if cpu.native() is not None:
        isa = "vector expand" if cpu.vectorized() else "portable"
        native = f"cpu_gemv (native, reads only kept values, {isa}; ≤{cpu.MAX_ROWS} rows)"
        return f"{native}, {reference}"
    return reference
