"""The MXFP6 formats' runtime: packed modules and kernel descriptions, for the registry."""

from __future__ import annotations

from typing import Any

from compress.formats.base import FormatRuntime, register_runtime
from compress.formats.fp6 import cpu, kernels
from compress.formats.fp6.linear import FP6Embedding, FP6Linear
from compress.formats.fp6.spec import FP6Format

__all__ = ["RUNTIME"]


def _linear(fmt: FP6Format, in_features: int, out_features: int, **options: Any) -> FP6Linear:
    return FP6Linear(in_features, out_features, fmt, **options)


def _embedding(
    fmt: FP6Format, num_embeddings: int, embedding_dim: int, **options: Any
) -> FP6Embedding:
    return FP6Embedding(num_embeddings, embedding_dim, fmt, **options)


def _describe(fmt: FP6Format, in_features: int) -> str:
    return kernels.describe(fmt, in_features)


RUNTIME = FormatRuntime(
    linear=_linear,
    linear_from_record=FP6Linear.from_record,
    embedding=_embedding,
    embedding_from_record=FP6Embedding.from_record,
    describe_kernels=_describe,
    prepare=cpu.prebuild,
)
register_runtime(FP6Format.kind, RUNTIME)
