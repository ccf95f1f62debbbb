"""Native CPU GEMV for the FP8 format: decodes E4M3 / E5M2 codes in registers (AVX-512 or AVX2
where built), one pass over the bytes.

The C++ source (``fp8_gemv.cpp``, package data) is built on first use by
:func:`compress.utils.native.load_native`, once per instruction-set level, like the other
formats' kernels; without a compiler :func:`native` returns ``None`` and
:mod:`compress.formats.fp8.kernels` keeps to the reference path.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType

import torch

from compress.formats.fp8.packed import PackedFP8
from compress.utils.native import build_in_background, build_isa, is_built, load_native

__all__ = ["MAX_ROWS", "gemv", "native", "prebuild", "vectorized"]

MAX_ROWS = 8
"""Activation rows one call takes (the C++ ``kMaxRows``)."""

_FUNCTIONS = ["gemv", "vectorized"]


@cache
def _source() -> str:
    return resources.files(__package__).joinpath("fp8_gemv.cpp").read_text(encoding="utf-8")


def native() -> ModuleType | None:
    """The extension built for :func:`compress.utils.native.build_isa`, or ``None``."""
    return load_native("fp8_gemv", _source(), _FUNCTIONS, isa=build_isa())


def prebuild() -> None:
    """Start the first-use build in a process of its own unless it is cached."""
    if not is_built("fp8_gemv", _source(), _FUNCTIONS, isa=build_isa()):
        build_in_background(__name__, "native")


def vectorized() -> bool:
    """Whether the extension was built with a vector path (AVX-512 or AVX2)."""
    ext = native()
    return bool(ext is not None and ext.vectorized())


def gemv(x: torch.Tensor, w: PackedFP8) -> torch.Tensor:
    """``x @ W.T + bias`` for rows of ``x`` (..., K) (:data:`MAX_ROWS` a call), in ``x``'s
    dtype; FP8 values, products and sums in fp32, each block's scale applied to its sum."""
    ext = native()
    if ext is None:
        raise RuntimeError("the fp8 native extension is not available")
    fmt = w.fmt
    rows = x.reshape(-1, w.in_features).to(torch.float32).contiguous()
    bn, bk = fmt.block_shape(w.out_features, w.in_features)
    qweight, scales = w.qweight.contiguous(), w.scales.contiguous()
    e4m3 = fmt.variant == "e4m3"
    parts = [ext.gemv(chunk, qweight, scales, e4m3, bn, bk) for chunk in rows.split(MAX_ROWS)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if w.bias is not None:
        out = out + w.bias.to(torch.float32)
    return out.to(x.dtype).view(*x.shape[:-1], w.out_features)
