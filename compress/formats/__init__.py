"""Numeric formats as a registered family: one folder per kind (see :mod:`compress.formats.base`
for the protocol and how a format is added).

Builtin kinds: ``int`` (:mod:`compress.formats.int`), ``fp8`` (:mod:`compress.formats.fp8`),
``fp4``, the 4-bit table formats NF4, FP4 (bitsandbytes), MXFP4 and NVFP4
(:mod:`compress.formats.fp4`), and ``fp6``, OCP MXFP6 E2M3 / E3M2 (:mod:`compress.formats.fp6`).
This package holds only what every kind shares (the protocol, the registry, bit packing); it
imports no kind, so a kind's folder is imported when a format of that kind is first named
(:data:`compress.formats.base.BUILTIN_KINDS`).
"""

from compress.formats.base import (
    BUILTIN_KINDS,
    Format,
    FormatRuntime,
    StoredTensor,
    format_from_dict,
    format_kinds,
    register_format,
    register_runtime,
    runtime_for,
)

__all__ = [
    "BUILTIN_KINDS",
    "Format",
    "FormatRuntime",
    "StoredTensor",
    "format_from_dict",
    "format_kinds",
    "register_format",
    "register_runtime",
    "runtime_for",
]
