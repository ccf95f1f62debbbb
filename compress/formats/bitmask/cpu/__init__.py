"""Native CPU GEMV for the bitmask sparse format: walks each row's bitmask and reads only the
kept values (AVX2, which AVX-512 CPUs run too, where built).

The C++ source (``bitmask_gemv.cpp``, package data) is built on first use by
:func:`compress.utils.native.load_native`, once per instruction-set level, like the other
formats' kernels; without a compiler :func:`native` returns ``None`` and
:mod:`compress.formats.bitmask.kernels` keeps to the reference path.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType

import torch

from compress.formats.bitmask.packed import PackedBitmask
from compress.utils.native import build_in_background, build_isa, is_built, load_native

__all__ = ["MAX_ROWS", "gemv", "native", "prebuild", "vectorized"]

MAX_ROWS = 8
"""Activation rows one call takes (the C++ ``kMaxRows``)."""

_FUNCTIONS = ["gemv", "vectorized"]


@cache
def _source() -> str:
    return resources.files(__package__).joinpath("bitmask_gemv.cpp").read_text(encoding="utf-8")


def native() -> ModuleType | None:
    """The extension built for :func:`compress.utils.native.build_isa`, or ``None``."""
    return load_native("bitmask_gemv", _source(), _FUNCTIONS, isa=build_isa())


def prebuild() -> None:
    """Start the first-use build in a process of its own unless it is cached."""
    if not is_built("bitmask_gemv", _source(), _FUNCTIONS, isa=build_isa()):
        build_in_background(__name__, "native")


def vectorized() -> bool:
    """Whether the extension was built with the AVX2 path."""
    ext = native()
    return bool(ext is not None and ext.vectorized())


def gemv(x: torch.Tensor, w: PackedBitmask) -> torch.Tensor:
    """``x @ W.T + bias`` for rows of ``x`` (..., K) (:data:`MAX_ROWS` a call), in ``x``'s
    dtype; values widened to fp32, products and sums in fp32."""
    ext = native()
    if ext is None:
        raise RuntimeError("the bitmask native extension is not available")
    rows = x.reshape(-1, w.in_features).to(torch.float32).contiguous()
    bitmask, values = w.bitmask.contiguous(), w.values.contiguous()
    parts = [ext.gemv(chunk, bitmask, values) for chunk in rows.split(MAX_ROWS)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if w.bias is not None:
        out = out + w.bias.to(torch.float32)
    return out.to(x.dtype).view(*x.shape[:-1], w.out_features)
