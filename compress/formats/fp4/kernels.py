"""Kernels of the 4-bit table formats, and the one function that picks one.

Every kernel takes the activations and a :class:`~compress.formats.fp4.table.PackedTable` (the
stored tensors and the format), never the module that holds them.

``reference``: the whole weight decoded (nibbles -> table values -> times the expanded block
scales) into the activation dtype, then ``F.linear``. The test oracle.

``cpu_tiled``: the same decode a slab of output rows at a time, each slab multiplied as soon as
it is decoded, so a forward holds one slab of dense weight
(:data:`~compress.formats.base.TILED_SLAB_BYTES`) beside the packed codes instead of the whole
dense matrix. The same products as the reference (each output column is the dot product with
one row of the weight); only the BLAS blocking may differ.

``cpu_gemv``: the native fused GEMV of :mod:`compress.formats.fp4.cpu`, one pass over the packed
bytes, weights not rounded to the activation dtype: for bf16/fp16 rows (where the layout has
whole 32-column steps) integer dots of int16-rounded activations against int16 table values;
otherwise codes decoded in AVX-512 or AVX2 registers by table permutes, products and sums in
fp32. Chosen for up to
:data:`~compress.formats.fp4.cpu.MAX_ROWS` activation rows on the CPU when the extension builds
here. Prefill (more rows) stays on ``cpu_tiled``, whose slabs feed torch's GEMM.

``COMPRESS_KERNEL`` names a kernel; one this format does not have (or ``cpu_gemv`` where the
native build is unavailable) is logged once and the default is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compress.formats.base import PackedKernels
from compress.formats.fp4 import cpu
from compress.formats.fp4.spec import FP4Format
from compress.formats.fp4.table import PackedTable

__all__ = ["KERNELS", "Kernel", "describe", "log_choice", "run", "select"]

Kernel = Callable[[torch.Tensor, PackedTable], torch.Tensor]
"""``(x, packed) -> x @ W.T + bias`` in the activation dtype."""

_TABLE = PackedKernels(
    cpu=cpu,
    triton_module="compress.formats.fp4.triton_kernels",  # the `gpu` extra
    module_class="FP4Linear",
    what="the 4-bit table formats",
    tiled=True,
)
KERNELS: dict[str, Kernel] = _TABLE.KERNELS
select = _TABLE.select
log_choice = _TABLE.log_choice
run = _TABLE.run


def describe(fmt: FP4Format, in_features: int, device: str = "cpu") -> str:
    """Human summary of the path a format takes, for ``compress inspect``."""
    tiled = "cpu_tiled (decode a slab of rows to the activation dtype, F.linear)"
    if device == "cpu" and cpu.native() is not None:
        isa = "AVX2" if cpu.vectorized() else "portable"
        int16 = (
            "; int16 dots" if cpu.vectorized() and cpu.int16_path(fmt.block, in_features) else ""
        )
        return f"cpu_gemv (native fused, {isa}{int16}; ≤{cpu.MAX_ROWS} rows), {tiled}"
    return tiled
