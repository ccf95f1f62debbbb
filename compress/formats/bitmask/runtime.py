"""The bitmask sparse format's runtime: its packed Linear and kernels, for the registry."""

from __future__ import annotations

from typing import Any

from compress.formats.base import FormatRuntime, register_runtime
from compress.formats.bitmask import cpu, kernels
from compress.formats.bitmask.linear import BitmaskLinear
from compress.formats.bitmask.spec import BitmaskFormat

__all__ = ["RUNTIME"]


def _linear(
    fmt: BitmaskFormat, in_features: int, out_features: int, **options: Any
) -> BitmaskLinear:
    return BitmaskLinear(in_features, out_features, fmt, **options)


RUNTIME = FormatRuntime(
    linear=_linear,
    linear_from_record=BitmaskLinear.from_record,
    describe_kernels=kernels.describe,
    prepare=cpu.prebuild,
)
register_runtime(BitmaskFormat.kind, RUNTIME)
