"""Native CPU GEMV for the MXFP6 formats: decodes 6-bit codes in registers (AVX2 where built).

The C++ source (``fp6_gemv.cpp``, package data) is built on first use by
:func:`compress.utils.native.load_native`, once per instruction-set level, like the 4-bit table
formats' kernels; without a compiler :func:`native` returns ``None`` and
:mod:`compress.formats.fp6.kernels` keeps to its torch paths.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType

import torch

from compress.formats.fp4.table import PackedTable
from compress.formats.fp6.spec import FP6Format
from compress.utils.native import build_in_background, build_isa, is_built, load_native

__all__ = ["MAX_ROWS", "gemv", "native", "prebuild", "vectorized"]

MAX_ROWS = 8
"""Activation rows one call takes (the C++ ``kMaxRows``)."""

_FUNCTIONS = ["gemv", "vectorized"]
# every scale code; an explicit device, since this module is first imported while a model loads
# under torch.device("meta") (a meta tensor here failed the GEMV: "data is not allocated")
_BYTES = torch.arange(256, dtype=torch.int32, device="cpu").to(torch.uint8)


@cache
def _source() -> str:
    return resources.files(__package__).joinpath("fp6_gemv.cpp").read_text(encoding="utf-8")


def native() -> ModuleType | None:
    """The extension built for :func:`compress.utils.native.build_isa`, or ``None``."""
    return load_native("fp6_gemv", _source(), _FUNCTIONS, isa=build_isa())


def prebuild() -> None:
    """Start the first-use build in a process of its own unless it is cached (a run calls this
    while its model loads, so the minute of compiling overlaps)."""
    if not is_built("fp6_gemv", _source(), _FUNCTIONS, isa=build_isa()):
        build_in_background(__name__, "native")


def vectorized() -> bool:
    """Whether the extension was built with its AVX2 path."""
    ext = native()
    return bool(ext is not None and ext.vectorized())


@cache
def _tables(fmt: FP6Format) -> tuple[torch.Tensor, torch.Tensor]:
    """The element table (64,) and the E8M0 scale table (256,), float32, as the C++ reads them.
    Its AVX2 decode looks up magnitudes and applies bit 5 as the sign, so the table must be
    sign-magnitude (every FP6 table is)."""
    table = fmt.table.contiguous()
    if not torch.equal(table[32:], -table[:32]):
        raise ValueError(f"{fmt.label()}: the native GEMV needs a sign-magnitude table")
    return table, fmt.effective_scales(_BYTES, None).contiguous()


def gemv(x: torch.Tensor, w: PackedTable) -> torch.Tensor:
    """``x @ W.T + bias`` for rows of ``x`` (..., K) (:data:`MAX_ROWS` a call), in ``x``'s
    dtype: table values, products and sums in fp32 (the weights are not rounded to ``x``'s
    dtype as the reference does)."""
    ext = native()
    if ext is None:
        raise RuntimeError("the fp6 native extension is not available")
    table, scale_lut = _tables(w.fmt)
    rows = x.reshape(-1, w.in_features).to(torch.float32).contiguous()
    qweight, scales = w.qweight.contiguous(), w.scales.contiguous()
    parts = [
        ext.gemv(chunk, qweight, scales, scale_lut, table, w.fmt.block)
        for chunk in rows.split(MAX_ROWS)  # a forced choice on a prefill: MAX_ROWS a call
    ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if w.bias is not None:
        out = out + w.bias.to(torch.float32)
    return out.to(x.dtype).view(*x.shape[:-1], w.out_features)
