"""Numeric formats as a registered family: one folder per kind (see :mod:`compress.formats.base`
for the protocol and how a format is added).

Builtin kinds: ``int`` (:mod:`compress.formats.int`).
"""

from compress.formats.base import (
    Format,
    FormatRuntime,
    StoredTensor,
    format_from_dict,
    format_kinds,
    register_format,
    register_runtime,
    runtime_for,
)
from compress.formats.int.spec import SCALE_DTYPES, IntFormat, dequantize_int, quantize_int

__all__ = [
    "SCALE_DTYPES",
    "Format",
    "FormatRuntime",
    "IntFormat",
    "StoredTensor",
    "dequantize_int",
    "format_from_dict",
    "format_kinds",
    "quantize_int",
    "register_format",
    "register_runtime",
    "runtime_for",
]
