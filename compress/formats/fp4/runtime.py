"""The 4-bit table formats' runtime: packed modules and kernel descriptions, for the registry."""

from __future__ import annotations

from compress.formats.fp4 import cpu, kernels
from compress.formats.fp4.linear import FP4Embedding, FP4Linear
from compress.formats.fp4.spec import FP4Format
from compress.formats.modules import register_packed_runtime

__all__ = ["RUNTIME"]

RUNTIME = register_packed_runtime(
    FP4Format.kind, FP4Linear, FP4Embedding, describe=kernels.describe, prepare=cpu.prebuild
)
