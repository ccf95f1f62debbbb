"""Native CPU kernels for packed integer weights: fused GEMV for decode, tiled GEMM for prefill.

The C++ source (``qmatmul*.cpp``, shipped as package data; one translation unit) is built on
first use by :func:`compress.utils.native.load_native`, once per instruction-set level (generic,
AVX2, AVX-512 with VNNI, AMX; ``COMPRESS_CPU_ISA`` forces a lower one), so a plain ``pip
install`` needs no build step and no binary runs on a CPU it was not built for. Without a
compiler :func:`native` returns ``None`` (logged once) and :mod:`compress.formats.int.kernels` keeps
to the plain-torch reference.

Prefill (:func:`gemm`) with bf16 activations: on AMX builds a GEMM of our own (weight panels
dequantized into AMX tiles); elsewhere bf16 tiles through torch's bf16 GEMM where the CPU
multiplies bf16 natively (AVX512-BF16 or AMX), else fp32 tiles through torch's fp32 GEMM.
fp32 activations always take fp32 tiles (exact).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from types import ModuleType

import torch

from compress.utils.native import (
    bf16_arithmetic,
    build_in_background,
    build_isa,
    is_built,
    load_native,
)

__all__ = [
    "GEMM_TILE_ROWS",
    "SOURCES",
    "amx",
    "amx_path",
    "bf16_gemm_native",
    "dequantize",
    "dequantize_bf16",
    "gemm",
    "gemm_path",
    "gemv",
    "gemv_max_rows",
    "int16_path",
    "isa",
    "native",
    "prebuild",
    "vectorized",
]

GEMM_TILE_ROWS = 0
"""Weight rows per tile of torch's GEMM paths; 0: 2 MiB of bf16 weights per tile (256 rows at
4096 inputs, whole SmolLM2 matrices; measured, see qmatmul_api.cpp)."""

DOT_MAX_ROWS = 1024
"""The most activation rows the AVX512-BF16 GEMM takes; more go to torch's GEMM on bf16 tiles.
On a Zen 4 it was at least as fast as the tiles from 16 to 1024 rows (4096x4096 and SmolLM2's
shapes; benchmarks/kernels_zen4.md), and its packed copy of the activations (rows x inputs x 2
bytes, kept by the calling thread for the next call) stays bounded."""

SOURCES = ("qmatmul.cpp", "qmatmul_avx512.cpp", "qmatmul_amx.cpp", "qmatmul_api.cpp")
"""The translation unit's parts, in order (each later one uses what the earlier define)."""

_FUNCTIONS = [
    "amx",
    "bf16_dot",
    "dequantize",
    "dequantize_bf16",
    "gemm",
    "gemv",
    "isa",
    "vectorized",
]
_EMPTY = torch.empty(0, dtype=torch.uint8)
_EMPTY_FLOAT = torch.empty(0)
_HALF = (torch.bfloat16, torch.float16)


@cache
def _source() -> str:
    folder = resources.files(__package__)
    return "\n".join(folder.joinpath(name).read_text(encoding="utf-8") for name in SOURCES)


def int16_path(bits: int, group_size: int | None, in_features: int) -> bool:
    """Whether :func:`gemv` runs integer dots for bf16/fp16 activations in this format: whole
    64-code blocks inside a group, and any width but 7 (two 7-bit codes span three bytes)."""
    per_channel = group_size in (None, in_features)
    blocks = per_channel or (group_size is not None and group_size % 64 == 0)
    return bits != 7 and blocks and in_features >= 64


def amx_path(group_size: int | None, in_features: int) -> bool:
    """Whether the AMX GEMM takes this format (on an AMX build): whole 32-input blocks inside a
    group; other group sizes take bf16 tiles."""
    return group_size in (None, in_features) or (group_size is not None and group_size % 32 == 0)


def native() -> ModuleType | None:
    """The extension built for :func:`compress.utils.native.build_isa` (``COMPRESS_CPU_ISA``
    is read on every call, so tests can switch builds), or ``None`` when none builds here."""
    return load_native("qmatmul", _source(), _FUNCTIONS, isa=build_isa())


def prebuild() -> None:
    """Start the first-use build in a process of its own unless it is cached: a run calls this
    before loading its model, so the minute of compiling overlaps with the download."""
    if not is_built("qmatmul", _source(), _FUNCTIONS, isa=build_isa()):
        build_in_background(__name__, "native")


def isa() -> str | None:
    """The instruction-set level of the running build (``None`` without one)."""
    ext = native()
    return None if ext is None else str(ext.isa())


def vectorized() -> bool:
    """Whether the extension was built with its AVX2 (or wider) paths, else portable loops."""
    ext = native()
    return bool(ext is not None and ext.vectorized())


def amx() -> bool:
    """Whether bf16 prefill runs the AMX GEMM (an AMX build, and the OS granted tile state)."""
    ext = native()
    return bool(ext is not None and ext.amx())


def bf16_dot() -> bool:
    """Whether bf16 prefill of up to :data:`DOT_MAX_ROWS` rows runs our AVX512-BF16 GEMM (an
    AVX-512 build on a CPU with VDPBF16PS, and no AMX, which goes first)."""
    ext = native()
    return bool(ext is not None and ext.bf16_dot())


@cache
def bf16_gemm_native() -> bool:
    """Whether torch's bf16 GEMM runs on bf16 hardware here (AVX512-BF16 or AMX): then bf16
    tiles beat fp32 ones. Without it torch converts, and its bf16 GEMM is slower than fp32.

    A property of the CPU, not of our build: torch picks its own kernels."""
    return bf16_arithmetic()


def gemv_max_rows(dtype: torch.dtype) -> int:
    """The most activation rows :func:`gemv` takes before :func:`gemm` is faster, for the
    running build and activation dtype (0 without a build).

    Measured at 4096x4096 int4 g128 (one core, benchmarks/kernels.md): on the AMX build the
    AMX GEMM beats the GEMV from 5 bf16 rows; where torch's bf16 GEMM is native (AVX512-BF16,
    AMX) bf16 tiles beat it from 10-12 rows on the AVX-512 and AVX2 builds (8 kept, the margin
    is thin there); fp32 activations (exact fp32 GEMV against fp32 tiles) cross at 12-16. Where
    the GEMM has only fp32 tiles for half activations (no bf16 hardware: Zen 3) the int16 GEMV
    stays ahead longer: 16 (from the AVX2 machine's table: 8 rows 1.9 ms, 32 rows 12.3 ms). The
    portable build's scalar GEMV loses to torch's GEMM on fp32 tiles from 2 rows.
    """
    ext = native()
    if ext is None:
        return 0
    return _crossover(str(ext.isa()), bool(ext.amx()), dtype)


@cache
def _crossover(level: str, amx_gemm: bool, dtype: torch.dtype) -> int:
    if level == "generic":
        return 1
    if dtype == torch.float32:
        return 12
    if dtype == torch.bfloat16 and amx_gemm:
        return 4
    if dtype == torch.bfloat16 and bf16_gemm_native():
        return 8
    return 16


def gemm_path(
    dtype: torch.dtype, group_size: int | None, in_features: int, rows: int | None = None
) -> str:
    """How :func:`gemm` multiplies ``rows`` activation rows (any number if ``None``) of this
    dtype and format: ``amx``, ``avx512-bf16`` (``avx512-bf16 to N rows, then bf16 tiles``
    for any number), ``bf16 tiles`` or ``fp32 tiles``."""
    if dtype == torch.bfloat16:
        panels = amx_path(group_size, in_features)
        if amx() and panels:
            return "amx"
        if bf16_dot() and panels:
            if rows is None:
                return f"avx512-bf16 to {DOT_MAX_ROWS} rows, then bf16 tiles"
            if rows <= DOT_MAX_ROWS:
                return "avx512-bf16"
        if bf16_gemm_native():
            return "bf16 tiles"
    return "fp32 tiles"


def _extension() -> ModuleType:
    """The built extension; callers check :func:`native` first, so absence is a bug."""
    ext = native()
    if ext is None:
        raise RuntimeError("the native qmatmul extension is not available")
    return ext


def _zeros(qzeros: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY if qzeros is None else qzeros


def _bias(bias: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY_FLOAT if bias is None else bias


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    bias: torch.Tensor | None = None,
    int16_acts: bool | None = None,
) -> torch.Tensor:
    """x (..., K) fp32/bf16/fp16 x packed (N, ·) weight (+ bias) → (..., N) in x's dtype.

    For few rows (decode). ``int16_acts`` (default: x is bf16/fp16) rounds x to int16 per chunk
    of up to 128 inputs, finer than half precision's own rounding but for elements far below
    the chunk's largest, so the dots run as integer multiply-adds: about 2.5x fewer
    instructions per weight than the exact fp32 path, which fp32 inputs keep.
    """
    if int16_acts is None:
        int16_acts = x.dtype in _HALF
    ext = _extension()
    return ext.gemv(
        x, qweight, scales, _zeros(qzeros), bits, group_size or 0, _bias(bias), int16_acts
    )


def gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    bias: torch.Tensor | None = None,
    tile_rows: int = GEMM_TILE_ROWS,
    bf16_tiles: bool | None = None,
    dot_max_rows: int = DOT_MAX_ROWS,
) -> torch.Tensor:
    """x (..., K) x packed weight (+ bias) → (..., N) in x's dtype; for many rows (prefill).

    bf16 x: the AMX GEMM on AMX builds; else, up to ``dot_max_rows`` rows, the AVX512-BF16
    GEMM where the build and CPU have it (0 turns it off); else ``bf16_tiles`` (default
    :func:`bf16_gemm_native`) dequantizes tiles of ``tile_rows`` weight rows to bf16 for
    torch's bf16 GEMM, as the reference does, or to fp32 for its fp32 GEMM. Other dtypes: fp32
    tiles (exact for fp32 x)."""
    if bf16_tiles is None:
        bf16_tiles = bf16_gemm_native()
    ext = _extension()
    return ext.gemm(
        x,
        qweight,
        scales,
        _zeros(qzeros),
        bits,
        group_size or 0,
        _bias(bias),
        tile_rows,
        bf16_tiles,
        dot_max_rows,
    )


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    in_features: int,
) -> torch.Tensor:
    """The (N, K) fp32 weight, unpacked natively; for tests."""
    ext = _extension()
    return ext.dequantize(qweight, scales, _zeros(qzeros), bits, group_size or 0, in_features)


def dequantize_bf16(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    in_features: int,
) -> torch.Tensor:
    """The (N, K) bf16 weight as the prefill tiles hold it; for tests."""
    ext = _extension()
    return ext.dequantize_bf16(qweight, scales, _zeros(qzeros), bits, group_size or 0, in_features)
