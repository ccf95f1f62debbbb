"""OCP MXFP6 (Microscaling Formats v1.0): 6-bit float elements, an E8M0 scale per 32 weights.

One definition, shared by the algorithms (which choose codes), export (which packs them) and
the kernels (which compute with them). Blocks run along a row (the input dimension) of the
weight ``(N, K)`` = ``(out_features, in_features)``; the 32 weights of a block share one scale
``X = 2**(floor(log2(amax)) - emax)`` (the block's absolute maximum, ``emax`` the element
format's largest exponent), stored as its E8M0 biased exponent (uint8, 127 = 1.0; an all-zero
block gets 0). An element is ``x / X`` rounded to the nearest FP6 value, ties to even (the code
with an even last bit), and saturated to ``±max``: neither variant has inf or NaN.

``e2m3``
    sign, 2 exponent bits (bias 1), 3 mantissa bits: normals ``(1 + m/8) * 2**(e-1)`` up to
    7.5, subnormals ``m/8`` (steps of 0.125); ``emax`` 2.
``e3m2``
    sign, 3 exponent bits (bias 3), 2 mantissa bits: normals ``(1 + m/4) * 2**(e-3)`` up to
    28, subnormals ``m/16`` (steps of 0.0625); ``emax`` 4.

A code is the element's bit pattern, ``sign << 5 | exponent << M | mantissa``: 64 codes, their
values computed from that layout (:func:`fp6_magnitudes`; torch has no 6-bit float dtype), so
``table[code | 32] == -table[code]`` and the magnitudes rise with the code. Edge blocks may be
partial (``K`` not a multiple of 32), as the repository's MXFP4 and MXFP8 allow: their scale is
taken over the weights they hold.

Stored tensors of a module with weight ``(N, K)``, ``G = ceil(K / 32)``:

============  ====================  =====  ====================================================
name          shape                 dtype  meaning
============  ====================  =====  ====================================================
``qweight``   (N, ceil(6K/8))       uint8  6-bit codes, each row one little-endian bit stream
                                           (four codes in three bytes; code ``k`` in bits
                                           ``[6k, 6k+6)``, :mod:`compress.formats.packing`)
``scales``    (N, G)                uint8  E8M0 biased exponents, ``2**(e - 127)``
============  ====================  =====  ====================================================

``W[n, k] = table[code[n, k]] * 2**(scales[n, k // 32] - 127)``. The IR record
(:class:`compress.ir.QuantizedWeight`) holds the unpacked codes ``(N, K)`` and the scales as
stored; no zero points. The rounding, the scale search (``observer: mse``) and GPTQ's grid are
the 4-bit table formats' (:mod:`compress.formats.fp4.spec`), which take any
:class:`~compress.formats.fp4.spec.TableFormat`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Literal

import torch

from compress.errors import FormatError, nearest
from compress.formats.base import StoredTensor, register_format
from compress.formats.fp4.spec import (
    Rounding,
    dequantize_table,
    e8m0_scales,
    e8m0_values,
    magnitude_rounding,
    quantize_table,
    search_clip,
)
from compress.formats.packing import packed_row_bytes

__all__ = [
    "LAYOUTS",
    "MX_BLOCK",
    "VARIANTS",
    "FP6Format",
    "dequantize_fp6",
    "fp6_magnitudes",
    "quantize_fp6",
]

MX_BLOCK = 32
"""Weights of a row sharing one E8M0 scale in OCP Microscaling formats."""

LAYOUTS: dict[str, tuple[int, int, int]] = {"e2m3": (2, 3, 1), "e3m2": (3, 2, 3)}
"""Variant -> (exponent bits, mantissa bits, exponent bias) of the OCP FP6 element."""

VARIANTS = tuple(LAYOUTS)
Variant = Literal["e2m3", "e3m2"]

_SIGN = 0b100000


def fp6_magnitudes(variant: str) -> tuple[float, ...]:
    """The 32 non-negative values of an FP6 variant, 5-bit code (exponent, mantissa) -> value:
    ``(1 + m / 2**M) * 2**(e - bias)`` for ``e > 0``, ``m / 2**M * 2**(1 - bias)`` for the
    subnormals (``e == 0``); every code is a finite number."""
    exponent_bits, mantissa_bits, bias = LAYOUTS[variant]
    values = []
    for code in range(1 << (exponent_bits + mantissa_bits)):
        e, m = code >> mantissa_bits, code & ((1 << mantissa_bits) - 1)
        fraction = m / (1 << mantissa_bits)
        values.append(2.0 ** (e - bias) * (1 + fraction) if e else 2.0 ** (1 - bias) * fraction)
    return tuple(values)


@cache
def _table(variant: str) -> torch.Tensor:
    # an explicit device: the first call may come while a model loads under torch.device("meta")
    magnitudes = torch.tensor(fp6_magnitudes(variant), dtype=torch.float64, device="cpu")
    return torch.cat([magnitudes, -magnitudes]).to(torch.float32)  # (64,), bit 5 the sign


@cache
def _rounding(variant: str) -> Rounding:
    return magnitude_rounding(fp6_magnitudes(variant), ties_to_even=True)


@register_format(runtime="compress.formats.fp6.runtime")
@dataclass(frozen=True)
class FP6Format:
    """OCP MXFP6 weights (E2M3 or E3M2 elements), an E8M0 scale per 32 weights of a row."""

    variant: Variant = "e2m3"
    block_size: int = MX_BLOCK  # fixed by the specification; a field so manifests say it

    kind: ClassVar[str] = "fp6"

    def __post_init__(self) -> None:
        if self.variant not in LAYOUTS:
            guess = nearest(str(self.variant), VARIANTS)
            raise FormatError(
                f"mxfp6 variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}",
                hint=f"did you mean {guess!r}?"
                if guess
                else "e2m3 has more precision, e3m2 more range",
            )
        if type(self.block_size) is not int or self.block_size != MX_BLOCK:
            raise FormatError(
                f"mxfp6 blocks are {MX_BLOCK} weights of a row by definition, got block_size "
                f"{self.block_size!r}",
                hint="drop block_size, or use nf4 / fp4 or int with e8m0 scales for other "
                "block sizes",
            )

    @property
    def code_bits(self) -> int:
        return 6

    @property
    def block(self) -> int:
        """Columns sharing one scale."""
        return MX_BLOCK

    @property
    def emax(self) -> int:
        """The element format's largest exponent (2 for E2M3, 4 for E3M2)."""
        exponent_bits, _, bias = LAYOUTS[self.variant]
        return (1 << exponent_bits) - 1 - bias

    @property
    def table(self) -> torch.Tensor:
        """(64,) float32: code -> value before scaling."""
        return _table(self.variant)

    @property
    def max_value(self) -> float:
        """Largest element value (7.5 or 28): where scaled weights saturate."""
        return fp6_magnitudes(self.variant)[-1]

    @property
    def zero_code(self) -> int:
        """The code of exact zero (a pruned weight's)."""
        return 0

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.uint8

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, -(-in_features // MX_BLOCK)

    def check_width(self, in_features: int) -> None:
        """Any width: a width that 32 does not divide gives a partial edge block."""
        if in_features < 1:
            raise FormatError(f"{self.label()} weights need at least one input column")

    def bits_per_weight(self, in_features: int) -> float:
        """6 code bits plus the 8-bit scale spread over its 32 weights (full blocks)."""
        return 6 + 8 / MX_BLOCK

    def stored_tensors(self, out_features: int, in_features: int) -> list[StoredTensor]:
        return [
            StoredTensor(
                "qweight",
                torch.uint8,
                (out_features, packed_row_bytes(in_features, 6)),
                f"{self.variant} 6-bit codes, a little-endian bit stream per row",
            ),
            StoredTensor(
                "scales",
                torch.uint8,
                self.scale_shape(out_features, in_features),
                "per-block E8M0 biased exponent",
            ),
        ]

    def label(self) -> str:
        return f"mxfp6_{self.variant} b{MX_BLOCK}"

    # ------------------------------------------------------------------------ scales and codes

    def tensor_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        """None: MX formats have block scales only."""
        return None

    def block_scales(
        self, amax: torch.Tensor, tensor_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stored, effective)`` scales of blocks with absolute maxima ``amax`` (any shape):
        E8M0 biased exponents and their float32 values."""
        return e8m0_scales(amax.to(torch.float32), self.emax)

    def effective_scales(
        self, scales: torch.Tensor, tensor_scale: torch.Tensor | None
    ) -> torch.Tensor:
        """Stored E8M0 scales as float32 multipliers, same shape."""
        return e8m0_values(scales)

    def encode(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes (uint8, shape of ``x``) of ``x`` with effective ``scale`` (broadcastable):
        ``x * (1 / scale)`` (exact: a power of two) saturated to ``±max`` and rounded to the
        nearest FP6 value, ties to even; a zero scale gives code zero."""
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        scaled = x.to(torch.float32) * inverse
        magnitude = _rounding(self.variant)(scaled.abs().clamp(max=self.max_value))
        return magnitude | (scaled < 0).to(torch.uint8) << 5

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Element values (float32) of ``codes``."""
        return self.table.to(codes.device)[codes.long()]

    def search_clip(
        self, weight: torch.Tensor, tensor_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, G) float32 clip ratio per block of ``weight`` (N, K) with the least rounding
        error (:func:`compress.formats.fp4.spec.search_clip`)."""
        return search_clip(self, weight, tensor_scale)

    # ----------------------------------------------------------------------- the Format API

    def quantize(
        self, weight: torch.Tensor, *, clip_ratio: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return quantize_fp6(weight, self, clip_ratio=clip_ratio)

    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return dequantize_fp6(codes, scales, zeros, self, dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "variant": self.variant, "block_size": MX_BLOCK}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FP6Format:
        if data.get("kind") != cls.kind:
            raise FormatError(f"not an MXFP6 format: {data!r}")
        fields = {k: v for k, v in data.items() if k != "kind"}
        unknown = sorted(set(fields) - {"variant", "block_size"})
        if unknown:
            raise FormatError(
                f"fp6 format entry has unknown keys {unknown}: {data!r}",
                hint="written by a newer compress? upgrade it",
            )
        return cls(**fields)


def quantize_fp6(
    weight: torch.Tensor, fmt: FP6Format, *, clip_ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest codes of ``weight`` (out, in): ``codes`` (out, in) uint8 in [0, 63],
    ``scales`` (out, ceil(in/32)) uint8 E8M0, and None (no zero points). ``clip_ratio`` (a
    scalar, or one per block) shrinks each block's absmax before its scale is chosen."""
    codes, scales, _ = quantize_table(weight, fmt, clip_ratio=clip_ratio)
    return codes, scales, None


def dequantize_fp6(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    fmt: FP6Format,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``table[code] * 2**(scale - 127)`` in float32, then ``dtype``; (out, in) -> (out, in)."""
    return dequantize_table(codes, scales, zeros, fmt, dtype)
