"""The packed 4-bit table Linear and Embedding: their buffers are exactly the stored tensors.

Stored tensors of a module with weight ``(N, K)``, blocks of ``B`` (see
:mod:`compress.formats.fp4.spec`):

================  ===============  ===============  ====================================
name              shape            dtype            meaning
================  ===============  ===============  ====================================
``qweight``       (N, ceil(K/2))   uint8            codes, two a byte, low nibble first
``scales``        (N, ceil(K/B))   float32 / uint8  per-block scale as the variant stores it
``tensor_scale``  (1,)             float32          nvfp4 only
``bias``          (N,)             model dtype      only if the original Linear had one
================  ===============  ===============  ====================================
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

from compress.formats.fp4 import cpu, kernels
from compress.formats.fp4.spec import FP4Format
from compress.formats.fp4.table import TableEmbedding, TableLinear

__all__ = ["FP4Embedding", "FP4Linear"]


class FP4Linear(TableLinear):
    """Linear over packed 4-bit table codes (NF4, FP4, MXFP4, NVFP4) and block scales."""

    kernels: ClassVar[ModuleType] = kernels  # the format's kernel table, for KernelDispatch
    decode_rows = cpu.MAX_ROWS
    format_type = FP4Format
    format_what = "4-bit table formats"


class FP4Embedding(TableEmbedding):
    """Embedding over packed 4-bit table codes."""

    format_type = FP4Format
    format_what = "4-bit table formats"
