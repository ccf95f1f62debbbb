"""The integer format's runtime: packed modules and kernel descriptions, for the registry."""

from __future__ import annotations

from typing import Any

import torch

from compress.formats.base import FormatRuntime, register_runtime
from compress.formats.int import cpu, kernels
from compress.formats.int.embedding import QuantEmbedding
from compress.formats.int.linear import QuantLinear
from compress.formats.int.spec import IntFormat

__all__ = ["RUNTIME"]


def _linear(fmt: IntFormat, in_features: int, out_features: int, **options: Any) -> QuantLinear:
    return QuantLinear(in_features, out_features, fmt, **options)


def _embedding(
    fmt: IntFormat, num_embeddings: int, embedding_dim: int, **options: Any
) -> QuantEmbedding:
    return QuantEmbedding(num_embeddings, embedding_dim, fmt, **options)


def _describe(fmt: IntFormat, in_features: int) -> str:
    return kernels.describe(fmt, in_features, dtype=torch.bfloat16)


RUNTIME = FormatRuntime(
    linear=_linear,
    linear_from_record=QuantLinear.from_record,
    embedding=_embedding,
    embedding_from_record=QuantEmbedding.from_record,
    describe_kernels=_describe,
    prepare=cpu.prebuild,  # the first-use build of the native kernels, in the background
)
register_runtime("int", RUNTIME)
