"""The FP8 format's runtime: packed modules and kernel descriptions, for the registry."""

from __future__ import annotations

from typing import Any

from compress.formats.base import FormatRuntime, register_runtime
from compress.formats.fp8 import cpu, kernels
from compress.formats.fp8.linear import FP8Embedding, FP8Linear
from compress.formats.fp8.spec import FP8Format

__all__ = ["RUNTIME"]


def _linear(fmt: FP8Format, in_features: int, out_features: int, **options: Any) -> FP8Linear:
    return FP8Linear(in_features, out_features, fmt, **options)


def _embedding(
    fmt: FP8Format, num_embeddings: int, embedding_dim: int, **options: Any
) -> FP8Embedding:
    return FP8Embedding(num_embeddings, embedding_dim, fmt, **options)


def _describe(fmt: FP8Format, in_features: int) -> str:
    return kernels.describe(fmt, in_features)


RUNTIME = FormatRuntime(
    linear=_linear,
    linear_from_record=FP8Linear.from_record,
    embedding=_embedding,
    embedding_from_record=FP8Embedding.from_record,
    describe_kernels=_describe,
    prepare=cpu.prebuild,
)
register_runtime(FP8Format.kind, RUNTIME)
