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

from collections.abc import Callable

import torch

from compress.formats.base import PackedKernels
from compress.formats.nm import cpu
from compress.formats.nm.packed import PackedNM
from compress.formats.nm.spec import NMIntFormat

__all__ = ["KERNELS", "Kernel", "describe", "log_choice", "select"]

Kernel = Callable[[torch.Tensor, PackedNM], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""

_TABLE = PackedKernels(
    cpu=cpu,
    triton_module="compress.formats.nm.triton_kernels",  # the `gpu` extra
    module_class="NMLinear",
    what="the N:M sparse format",
    tiled=False,
)
KERNELS: dict[str, Kernel] = _TABLE.KERNELS
select = _TABLE.select
log_choice = _TABLE.log_choice
run = _TABLE.run


def describe(fmt: NMIntFormat, in_features: int) -> str:
    """Human summary of the paths a format takes, for ``compress inspect``."""
    reference = "reference (kept codes scattered into a dense weight, F.linear)"
    if cpu.native() is not None:
        isa = "vector gather" if cpu.vectorized() else "portable"
        return f"cpu_gemv (native, reads only kept codes, {isa}; ≤{cpu.MAX_ROWS} rows), {reference}"
    return reference
