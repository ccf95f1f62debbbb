"""The FP8 format's runtime: packed modules and kernel descriptions, for the registry."""

from __future__ import annotations

from compress.formats.fp8 import cpu, kernels
from compress.formats.fp8.linear import FP8Embedding, FP8Linear
from compress.formats.fp8.spec import FP8Format
from compress.formats.modules import register_packed_runtime

__all__ = ["RUNTIME"]

RUNTIME = register_packed_runtime(
    FP8Format.kind, FP8Linear, FP8Embedding, describe=kernels.describe, prepare=cpu.prebuild
)
