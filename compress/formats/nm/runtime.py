"""The N:M sparse integer format's runtime: its packed Linear and kernels, for the registry."""

from __future__ import annotations

from typing import Any

from compress.formats.base import FormatRuntime, register_runtime
from compress.formats.nm import cpu, kernels
from compress.formats.nm.linear import NMLinear
from compress.formats.nm.spec import NMIntFormat

__all__ = ["RUNTIME"]


def _linear(fmt: NMIntFormat, in_features: int, out_features: int, **options: Any) -> NMLinear:
    return NMLinear(in_features, out_features, fmt, **options)


RUNTIME = FormatRuntime(
    linear=_linear,
    linear_from_record=NMLinear.from_record,
    describe_kernels=kernels.describe,
    prepare=cpu.prebuild,
)
register_runtime(NMIntFormat.kind, RUNTIME)
