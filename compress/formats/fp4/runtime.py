"""The 4-bit table formats' runtime: packed modules and kernel descriptions, for the registry."""

from __future__ import annotations

from typing import Any

from compress.formats.base import FormatRuntime, register_runtime
from compress.formats.fp4 import cpu, kernels
from compress.formats.fp4.linear import FP4Embedding, FP4Linear
from compress.formats.fp4.spec import FP4Format

__all__ = ["RUNTIME"]


def _linear(fmt: FP4Format, in_features: int, out_features: int, **options: Any) -> FP4Linear:
    return FP4Linear(in_features, out_features, fmt, **options)


def _embedding(
    fmt: FP4Format, num_embeddings: int, embedding_dim: int, **options: Any
) -> FP4Embedding:
    return FP4Embedding(num_embeddings, embedding_dim, fmt, **options)


def _describe(fmt: FP4Format, in_features: int) -> str:
    return kernels.describe(fmt, in_features)


RUNTIME = FormatRuntime(
    linear=_linear,
    linear_from_record=FP4Linear.from_record,
    embedding=_embedding,
    embedding_from_record=FP4Embedding.from_record,
    describe_kernels=_describe,
    prepare=cpu.prebuild,
)
register_runtime(FP4Format.kind, RUNTIME)
