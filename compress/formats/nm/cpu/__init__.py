"""Native CPU GEMV for the N:M sparse integer format: reads only the kept codes and gathers the
activations at their columns (AVX-512 or AVX2 where built).

The C++ source (``nm_gemv.cpp``, package data) is built on first use by
:func:`compress.utils.native.load_native`, once per instruction-set level, like the other
formats' kernels; without a compiler :func:`native` returns ``None`` and
:mod:`compress.formats.nm.kernels` keeps to the reference path.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType

import torch

from compress.formats.nm.packed import PackedNM
from compress.utils.native import build_in_background, build_isa, is_built, load_native

__all__ = ["MAX_ROWS", "gemv", "native", "prebuild", "vectorized"]

MAX_ROWS = 8
"""Activation rows one call takes (the C++ ``kMaxRows``)."""

_FUNCTIONS = ["gemv", "vectorized"]
_NONE = torch.empty(0, dtype=torch.uint8)


@cache
def _source() -> str:
    return resources.files(__package__).joinpath("nm_gemv.cpp").read_text(encoding="utf-8")


def native() -> ModuleType | None:
    """The extension built for :func:`compress.utils.native.build_isa`, or ``None``."""
    return load_native("nm_gemv", _source(), _FUNCTIONS, isa=build_isa())


def prebuild() -> None:
    """Start the first-use build in a process of its own unless it is cached."""
    if not is_built("nm_gemv", _source(), _FUNCTIONS, isa=build_isa()):
        build_in_background(__name__, "native")


def vectorized() -> bool:
    """Whether the extension was built with a vector path (AVX-512 or AVX2)."""
    ext = native()
    return bool(ext is not None and ext.vectorized())


def gemv(x: torch.Tensor, w: PackedNM) -> torch.Tensor:
    """``x @ W.T + bias`` for rows of ``x`` (..., K) (:data:`MAX_ROWS` a call), in ``x``'s
    dtype; weights formed, multiplied and summed in fp32."""
    ext = native()
    if ext is None:
        raise RuntimeError("the nm_int native extension is not available")
    fmt = w.fmt
    rows = x.reshape(-1, w.in_features).to(torch.float32).contiguous()
    zeros = w.zeros()
    zeros = _NONE if zeros is None else zeros.contiguous()
    group = fmt.group_size or w.in_features
    args = (w.qweight.contiguous(), w.qindex.contiguous(), w.scales.contiguous(), zeros)
    parts = [
        ext.gemv(chunk, *args, fmt.bits, fmt.index_bits, fmt.n, fmt.m, group)
        for chunk in rows.split(MAX_ROWS)
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if w.bias is not None:
        out = out + w.bias.to(torch.float32)
    return out.to(x.dtype).view(*x.shape[:-1], w.out_features)
