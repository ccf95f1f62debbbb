"""The packed MXFP6 Linear and Embedding: their buffers are exactly the stored tensors.

Stored tensors of a module with weight ``(N, K)`` (see :mod:`compress.formats.fp6.spec`):

============  =================  ===========  ================================================
name          shape              dtype        meaning
============  =================  ===========  ================================================
``qweight``   (N, ceil(6K/8))    uint8        6-bit codes, a little-endian bit stream a row
``scales``    (N, ceil(K/32))    uint8        per-block E8M0 biased exponent
``bias``      (N,)               model dtype  only if the original Linear had one
============  =================  ===========  ================================================
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

from compress.formats.fp4.table import TableEmbedding, TableLinear
from compress.formats.fp6 import cpu, kernels
from compress.formats.fp6.spec import FP6Format

__all__ = ["FP6Embedding", "FP6Linear"]


class FP6Linear(TableLinear):
    """Linear over packed MXFP6 codes and E8M0 block scales."""

    kernels: ClassVar[ModuleType] = kernels  # the format's kernel table, for KernelDispatch
    decode_rows = cpu.MAX_ROWS
    format_type = FP6Format
    format_what = "MXFP6 formats"


class FP6Embedding(TableEmbedding):
    """Embedding over packed MXFP6 codes."""

    format_type = FP6Format
    format_what = "MXFP6 formats"
