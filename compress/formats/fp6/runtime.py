"""The MXFP6 formats' runtime: packed modules and kernel descriptions, for the registry."""

from __future__ import annotations

from compress.formats.fp6 import cpu, kernels
from compress.formats.fp6.linear import FP6Embedding, FP6Linear
from compress.formats.fp6.spec import FP6Format
from compress.formats.modules import register_packed_runtime

__all__ = ["RUNTIME"]

RUNTIME = register_packed_runtime(
    FP6Format.kind, FP6Linear, FP6Embedding, describe=kernels.describe, prepare=cpu.prebuild
)
