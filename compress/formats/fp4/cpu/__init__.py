"""Native CPU GEMV for the 4-bit table formats: decodes codes in registers (AVX2 where built).

The C++ source (``fp4_gemv.cpp``, package data) is built on first use by
:func:`compress.utils.native.load_native`, once per instruction-set level, like the integer
format's kernels; without a compiler :func:`native` returns ``None`` and
:mod:`compress.formats.fp4.kernels` keeps to its torch paths.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType

import torch

from compress.formats.fp4.packed import PackedFP4
from compress.utils.native import build_in_background, build_isa, is_built, load_native

__all__ = ["MAX_ROWS", "gemv", "native", "prebuild", "vectorized"]

MAX_ROWS = 8
"""Activation rows one call takes (the C++ ``kMaxRows``)."""

_FUNCTIONS = ["gemv", "vectorized"]
_BYTES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 256)  # every scale code
_NONE = torch.empty(0)


@cache
def _source() -> str:
    return resources.files(__package__).joinpath("fp4_gemv.cpp").read_text(encoding="utf-8")


def native() -> ModuleType | None:
    """The extension built for :func:`compress.utils.native.build_isa`, or ``None``."""
    return load_native("fp4_gemv", _source(), _FUNCTIONS, isa=build_isa())


def prebuild() -> None:
    """Start the first-use build in a process of its own unless it is cached (a run calls this
    while its model loads, so the minute of compiling overlaps)."""
    if not is_built("fp4_gemv", _source(), _FUNCTIONS, isa=build_isa()):
        build_in_background(__name__, "native")


def vectorized() -> bool:
    """Whether the extension was built with its AVX2 path."""
    ext = native()
    return bool(ext is not None and ext.vectorized())


def gemv(x: torch.Tensor, w: PackedFP4) -> torch.Tensor:
    """``x @ W.T + bias`` for rows of ``x`` (..., K) (:data:`MAX_ROWS` a call), in ``x``'s
    dtype; table values, products and sums in fp32 (weights not rounded to ``x``'s dtype)."""
    ext = native()
    if ext is None:
        raise RuntimeError("the fp4 native extension is not available")
    fmt = w.fmt
    rows = x.reshape(-1, w.in_features).to(torch.float32).contiguous()
    scale_lut = (
        fmt.effective_scales(_BYTES, w.tensor_scale).reshape(256)
        if fmt.scale_dtype == torch.uint8
        else _NONE
    )
    qweight, scales, table = w.qweight.contiguous(), w.scales.contiguous(), fmt.table
    parts = [
        ext.gemv(chunk, qweight, scales, scale_lut, table, fmt.block)
        for chunk in rows.split(MAX_ROWS)  # a forced choice on a prefill: MAX_ROWS a call
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if w.bias is not None:
        out = out + w.bias.to(torch.float32)
    return out.to(x.dtype).view(*x.shape[:-1], w.out_features)
