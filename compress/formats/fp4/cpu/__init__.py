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

from compress.formats.fp4.spec import FP4Format
from compress.formats.fp4.table import PackedTable
from compress.utils.native import build_in_background, build_isa, is_built, load_native

__all__ = ["MAX_ROWS", "gemv", "int16_path", "native", "prebuild", "vectorized"]

MAX_ROWS = 8
"""Activation rows one call takes (the C++ ``kMaxRows``)."""

_FUNCTIONS = ["gemv", "gemv_int16", "int16_acts", "vectorized"]
_BYTES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(1, 256)  # every scale code
_NONE = torch.empty(0)
_HALF = (torch.bfloat16, torch.float16)
_SCALE_KINDS = {"mxfp4": 1, "nvfp4": 2}
"""uint8 scales the int16 GEMV decodes in registers (E8M0, E4M3 times the tensor scale) rather
than by a gather from their table (the C++ kScaleE8M0, kScaleE4M3)."""
_TABLE_UNITS = 4096
"""A table that is not on a grid of halves is held as int16 multiples of its largest / 4096
(within 1.3e-4 of it; the C++ bounds a sub-block's int32 dot with this)."""


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


def int16_path(block: int, in_features: int) -> bool:
    """Whether :func:`gemv` can run integer dots for this layout: whole 64-column steps (one
    activation chunk each), and blocks that a step either holds or is a part of."""
    return in_features % 64 == 0 and (block in (16, 32) or block % 64 == 0)


@cache
def _int16_table(fmt: FP4Format) -> tuple[torch.Tensor, float]:
    """The table as int16 values and their unit: E2M1 (MXFP4, NVFP4) doubled exactly, any
    other table in :data:`_TABLE_UNITS` steps of its largest magnitude."""
    table = fmt.table
    doubled = table * 2
    if torch.equal(doubled, doubled.round()):
        return doubled.to(torch.int16), 0.5
    unit = float(table.abs().max()) / _TABLE_UNITS
    return (table / unit).round().to(torch.int16), unit


def gemv(x: torch.Tensor, w: PackedTable, int16_acts: bool | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for rows of ``x`` (..., K) (:data:`MAX_ROWS` a call), in ``x``'s
    dtype.

    ``int16_acts`` (default: x is bf16/fp16 and :func:`int16_path` holds) rounds x to int16 per
    64 columns and runs integer multiply-adds against int16 table values, a third of the fp32
    path's time at 4096x4096 (benchmarks/fp4.md): finer than half precision's own rounding but
    for elements far below their chunk's largest. Otherwise table values, products and sums in
    fp32. Neither rounds the weights to ``x``'s dtype as the reference does."""
    ext = native()
    if ext is None:
        raise RuntimeError("the fp4 native extension is not available")
    fmt = w.fmt
    if int16_acts is None:
        int16_acts = (
            x.dtype in _HALF and bool(ext.int16_acts()) and int16_path(fmt.block, w.in_features)
        )
    rows = x.reshape(-1, w.in_features).to(torch.float32).contiguous()
    qweight, scales = w.qweight.contiguous(), w.scales.contiguous()
    coded = fmt.scale_dtype == torch.uint8
    kind = _SCALE_KINDS.get(fmt.variant, 0) if int16_acts else 0
    # the 256-entry table of the stored scales' values, unless the kernel decodes them itself
    scale_lut = (
        fmt.effective_scales(_BYTES, w.tensor_scale).reshape(256) if coded and kind == 0 else _NONE
    )
    if int16_acts:
        table16, unit = _int16_table(fmt)
        tensor_scale = float(w.tensor_scale) if kind == 2 and w.tensor_scale is not None else 1.0
        parts = [
            ext.gemv_int16(
                chunk, qweight, scales, scale_lut, kind, tensor_scale, table16, unit, fmt.block
            )
            for chunk in rows.split(MAX_ROWS)
        ]
    else:
        parts = [
            ext.gemv(chunk, qweight, scales, scale_lut, fmt.table, fmt.block)
            for chunk in rows.split(MAX_ROWS)  # a forced choice on a prefill: MAX_ROWS a call
        ]
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if w.bias is not None:
        out = out + w.bias.to(torch.float32)
    return out.to(x.dtype).view(*x.shape[:-1], w.out_features)
