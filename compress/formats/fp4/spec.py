"""The 4-bit table formats: a 4-bit code indexes a 16-value table, times a scale per block.

One definition, shared by the algorithms (which choose codes), export (which packs them) and
the kernels (which compute with them). Four variants, each as its source defines it; blocks run
along a row (the input dimension) of the weight ``(N, K)`` = ``(out_features, in_features)``:

``nf4``, ``fp4`` (bitsandbytes, ``bnb_4bit_quant_type``)
    the block's absolute maximum is its fp32 scale (``absmax``); ``x * (1 / absmax)`` is rounded
    to the nearest table value, a tie going to the lower value (bitsandbytes' decision trees
    compare ``x > midpoint``). ``nf4``: the 16 normal-float values of QLoRA, code ``i`` the
    ``i``-th smallest (-1 ... 0 ... 1). ``fp4``: sign bit ``0b1000`` and a 3-bit magnitude
    ``{0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4}`` (an E2M1 with bias 3, normalised by its maximum
    12). Blocks of 64 by default (``block_size``, any positive size; bitsandbytes offers powers
    of two from 64 up). bitsandbytes cuts the *flattened* tensor into blocks: for ``K`` a
    multiple of the block size that is the same as blocks along rows.
``mxfp4`` (OCP Microscaling Formats v1.0)
    E2M1 elements (sign bit ``0b1000``, magnitudes ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``), blocks of
    32, one shared E8M0 scale ``X = 2**(floor(log2(amax)) - 2)`` (2 = E2M1's largest exponent),
    stored as its biased exponent (127 = 1.0); values beyond ±6 after scaling saturate, and
    rounding is to nearest, ties to even (the code with an even last bit).
``nvfp4`` (NVIDIA Blackwell)
    E2M1 elements, blocks of 16, an E4M3 scale per block and one fp32 scale per tensor:
    ``tensor_scale = amax(W) / (6 * 448)``; block scale ``e4m3(amax_block / 6 / tensor_scale)``
    (round to nearest even, at most 448); the element is ``x / (e4m3 * tensor_scale)`` rounded
    like MXFP4's.

Edge blocks may be partial (``K`` not a multiple of the block): their scale is taken over the
weights they hold; the packed row is padded to whole bytes.

Stored tensors of a module with weight ``(N, K)``, blocks of ``B``, ``G = ceil(K / B)``:

================  ===============  =======  ==========================================
name              shape            dtype    meaning
================  ===============  =======  ==========================================
``qweight``       (N, ceil(K/2))   uint8    4-bit codes, two a byte, low nibble first
                                            (:func:`compress.formats.packing.pack_codes`)
``scales``        (N, G)           float32  ``nf4``/``fp4``: the block's absmax
                                   uint8    ``mxfp4``: E8M0 biased exponent
                                   uint8    ``nvfp4``: E4M3 bit patterns
``tensor_scale``  (1,)             float32  ``nvfp4`` only: the per-tensor scale
================  ===============  =======  ==========================================

``W[n, k] = table[code[n, k]] * scale[n, k // B]`` (times ``tensor_scale`` for ``nvfp4``). The IR
record (:class:`compress.ir.QuantizedWeight`) holds the unpacked codes ``(N, K)``, ``scales``
as stored, and, for ``nvfp4``, ``tensor_scale`` in its ``zeros`` slot (the record has no other
place for a second scale; no variant has zero points).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F

from compress.errors import FormatError, nearest
from compress.formats.base import StoredTensor, register_format

__all__ = [
    "BNB_FP4",
    "CLIP_CANDIDATES",
    "DEFAULT_BLOCKS",
    "E2M1",
    "NF4",
    "VARIANTS",
    "FP4Format",
    "Rounding",
    "TableFormat",
    "dequantize_fp4",
    "dequantize_table",
    "e8m0_scales",
    "e8m0_values",
    "expand_blocks",
    "magnitude_rounding",
    "quantize_fp4",
    "quantize_table",
    "search_clip",
]

NF4: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""QLoRA's NormalFloat4, code ``i`` -> value (bitsandbytes' ``nf4`` table)."""

BNB_FP4: tuple[float, ...] = (0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4)
"""bitsandbytes' ``fp4`` magnitudes, 3-bit code -> value; bit ``0b1000`` is the sign."""

E2M1: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""OCP E2M1 magnitudes, 3-bit code -> value; bit ``0b1000`` is the sign."""

VARIANTS = ("nf4", "fp4", "mxfp4", "nvfp4")
Variant = Literal["nf4", "fp4", "mxfp4", "nvfp4"]

DEFAULT_BLOCKS: dict[str, int] = {"nf4": 64, "fp4": 64, "mxfp4": 32, "nvfp4": 16}
"""Block sizes; only the bitsandbytes variants take another (MX and NVFP4 fix theirs)."""

CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 1.05, 1.1, 1.2, 1.3)
"""Ratios of a block's absmax that :meth:`FP4Format.search_clip` tries for its scale."""

_E4M3_MAX = 448.0
_E2M1_MAX = 6.0


def _signed_table(magnitudes: tuple[float, ...]) -> torch.Tensor:
    values = torch.tensor(magnitudes, dtype=torch.float64)
    return torch.cat([values, -values]).to(torch.float32)


@dataclass(frozen=True)
class Rounding:
    """Nearest-value rounding onto a sorted set of values, with a tie rule per midpoint."""

    values: torch.Tensor  # (V,) float32, ascending
    codes: torch.Tensor  # (V,) uint8, the code of each value
    midpoints: torch.Tensor  # (V-1,) float32
    tie_up: torch.Tensor  # (V-1,) bool: a value exactly on midpoint i goes to values[i+1]

    @classmethod
    def build(cls, values: list[float], codes: list[int], tie_up: list[bool]) -> Rounding:
        exact = torch.tensor(values, dtype=torch.float64)
        return cls(
            exact.to(torch.float32),
            torch.tensor(codes, dtype=torch.uint8),
            ((exact[1:] + exact[:-1]) / 2).to(torch.float32),
            torch.tensor(tie_up, dtype=torch.bool),
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (uint8) of the nearest values to ``x`` (float32, any shape)."""
        midpoints = self.midpoints.to(x.device)
        index = torch.bucketize(x, midpoints)  # x == midpoint[i] -> i (the lower value)
        at = index.clamp(max=midpoints.numel() - 1)
        index = index + ((x == midpoints[at]) & self.tie_up.to(x.device)[at]).to(index.dtype)
        return self.codes.to(x.device)[index]


def magnitude_rounding(magnitudes: tuple[float, ...], *, ties_to_even: bool) -> Rounding:
    """Rounding onto ``magnitudes`` (code -> value, any order); ``ties_to_even``: a value halfway
    between two goes to the one whose code is even (a float's round half to even, its last
    mantissa bit being the code's), else to the lower one (bitsandbytes)."""
    order = sorted(range(len(magnitudes)), key=lambda code: magnitudes[code])
    ranked = [magnitudes[code] for code in order]
    # a tie goes up where the upper neighbour's code is even (round half to even), else down
    ups = [ties_to_even and order[i + 1] % 2 == 0 for i in range(len(order) - 1)]
    return Rounding.build(ranked, order, ups)


_NF4_ROUNDING = Rounding.build(list(NF4), list(range(16)), [False] * 15)
_BNB_FP4_ROUNDING = magnitude_rounding(BNB_FP4, ties_to_even=False)
_E2M1_ROUNDING = magnitude_rounding(E2M1, ties_to_even=True)
_E2M1_EMAX = 2  # E2M1's largest exponent: 6 = 1.5 * 2**2


@cache
def _scale_table(variant: str) -> torch.Tensor:
    """(256,) float32: a stored uint8 scale -> its value (E8M0 2**(e-127); E4M3 by torch's cast);
    one gather decodes a weight's scales (the elementwise ldexp or float8 cast is 10x slower)."""
    byte = torch.arange(256)
    if variant == "mxfp4":
        return torch.ldexp(torch.ones(256), byte - 127)
    return byte.to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def e8m0_values(biased: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(e - 127)`` of E8M0 biased exponents ``biased`` (uint8, any shape)."""
    return _scale_table("mxfp4").to(biased.device)[biased.long()]  # 256 entries: exact decodes


def e8m0_scales(amax: torch.Tensor, emax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP Microscaling shared scales of blocks with absolute maxima ``amax`` (float32, any
    shape): ``X = 2**(floor(log2(amax)) - emax)`` (``emax``: the element format's largest
    exponent), as its E8M0 biased exponent (uint8, 127 = 1.0; a zero block gets the smallest,
    0) and as float32. The block's largest value then lands in ``[2**emax, 2**(emax+1))`` and
    saturates above the element format's largest value."""
    _, exponent = torch.frexp(amax)  # amax = m * 2**e, m in [0.5, 1): floor(log2) = e-1
    shared = torch.where(amax > 0, exponent - 1 - emax, torch.full_like(exponent, -127))
    biased = (shared.clamp(-127, 127) + 127).to(torch.uint8)
    return biased, e8m0_values(biased)


class TableFormat(Protocol):
    """What the table helpers (:func:`quantize_table`, :func:`dequantize_table`,
    :func:`search_clip`, GPTQ's table grid) read of a format whose codes index a fixed table,
    times a scale per block along the rows: :class:`FP4Format`, and MXFP6
    (:mod:`compress.formats.fp6`)."""

    @property
    def variant(self) -> str: ...

    @property
    def code_bits(self) -> int: ...

    @property
    def block(self) -> int: ...

    @property
    def table(self) -> torch.Tensor: ...

    @property
    def zero_code(self) -> int: ...

    @property
    def scale_dtype(self) -> torch.dtype: ...

    def __hash__(self) -> int: ...  # frozen dataclasses: kernels cache tables per format

    def label(self) -> str: ...

    def check_width(self, in_features: int) -> None: ...

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]: ...

    def tensor_scale(self, weight: torch.Tensor) -> torch.Tensor | None: ...

    def block_scales(
        self, amax: torch.Tensor, tensor_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def effective_scales(
        self, scales: torch.Tensor, tensor_scale: torch.Tensor | None
    ) -> torch.Tensor: ...

    def encode(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...

    def search_clip(
        self, weight: torch.Tensor, tensor_scale: torch.Tensor | None = None
    ) -> torch.Tensor: ...


@register_format(runtime="compress.formats.fp4.runtime")
@dataclass(frozen=True)
class FP4Format:
    """4-bit codes into a 16-value table (NF4, bitsandbytes FP4, MXFP4, NVFP4), a scale per
    block along the rows."""

    variant: Variant = "nf4"
    block_size: int | None = None  # None: the variant's default (only nf4/fp4 take another)

    kind: ClassVar[str] = "fp4"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            guess = nearest(str(self.variant), VARIANTS)
            raise FormatError(
                f"4-bit table variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}",
                hint=f"did you mean {guess!r}?" if guess else None,
            )
        size = self.block_size
        if size is None:  # the default, spelled out: nf4 == nf4 with block_size 64
            object.__setattr__(self, "block_size", DEFAULT_BLOCKS[self.variant])
            return
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise FormatError(
                f"{self.variant} block_size must be a positive integer, got {size!r}",
                hint="e.g. 64 (bitsandbytes' default)",
            )
        if self.variant in ("mxfp4", "nvfp4") and size != DEFAULT_BLOCKS[self.variant]:
            raise FormatError(
                f"{self.variant} blocks are {DEFAULT_BLOCKS[self.variant]} wide by definition, "
                f"got block_size {size}",
                hint="drop block_size, or use nf4 / fp4 for other block sizes",
            )

    @property
    def code_bits(self) -> int:
        return 4

    @property
    def block(self) -> int:
        """Columns sharing one scale."""
        return self.block_size or DEFAULT_BLOCKS[self.variant]

    @property
    def table(self) -> torch.Tensor:
        """(16,) float32: code -> value before scaling."""
        if self.variant == "nf4":
            return torch.tensor(NF4, dtype=torch.float32)
        return _signed_table(BNB_FP4 if self.variant == "fp4" else E2M1)

    @property
    def max_value(self) -> float:
        """Largest table value: what a block's absmax is scaled to."""
        return 1.0 if self.variant in ("nf4", "fp4") else _E2M1_MAX

    @property
    def zero_code(self) -> int:
        """The code of exact zero (a pruned weight's)."""
        return 7 if self.variant == "nf4" else 0

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.variant in ("nf4", "fp4") else torch.uint8

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features, -(-in_features // self.block)

    def check_width(self, in_features: int) -> None:
        """Any width: a block size that does not divide it gives a partial edge block."""
        if in_features < 1:
            raise FormatError(f"{self.variant} weights need at least one input column")

    def bits_per_weight(self, in_features: int) -> float:
        """4 code bits plus the block scale spread over its block (full blocks)."""
        scale_bits = 32 if self.variant in ("nf4", "fp4") else 8
        return 4 + scale_bits / self.block

    def stored_tensors(self, out_features: int, in_features: int) -> list[StoredTensor]:
        meaning = {
            "nf4": "per-block absmax",
            "fp4": "per-block absmax",
            "mxfp4": "per-block E8M0 biased exponent",
            "nvfp4": "per-block E4M3 bit patterns",
        }[self.variant]
        tensors = [
            StoredTensor(
                "qweight",
                torch.uint8,
                (out_features, (in_features + 1) // 2),
                f"{self.variant} 4-bit codes, two a byte, low nibble first",
            ),
            StoredTensor(
                "scales", self.scale_dtype, self.scale_shape(out_features, in_features), meaning
            ),
        ]
        if self.variant == "nvfp4":
            tensors.append(StoredTensor("tensor_scale", torch.float32, (1,), "fp32 tensor scale"))
        return tensors

    def label(self) -> str:
        return f"{self.variant} b{self.block}"

    # ------------------------------------------------------------------------ scales and codes

    def tensor_scale(self, weight: torch.Tensor) -> torch.Tensor | None:
        """``nvfp4``: (1,) float32 per-tensor scale of ``weight``; None for the other variants."""
        if self.variant != "nvfp4":
            return None
        amax = weight.detach().abs().amax().to(torch.float32).reshape(1)
        scale = amax / (_E2M1_MAX * _E4M3_MAX)
        return torch.where(scale > 0, scale, torch.ones_like(scale))

    def block_scales(
        self, amax: torch.Tensor, tensor_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(stored, effective)`` scales of blocks with absolute maxima ``amax`` (any shape):
        ``stored`` in :attr:`scale_dtype`, ``effective`` the float32 multiplier of a code's
        table value (tensor scale included)."""
        amax = amax.to(torch.float32)
        if self.variant in ("nf4", "fp4"):
            return amax, amax
        if self.variant == "mxfp4":
            return e8m0_scales(amax, _E2M1_EMAX)
        if tensor_scale is None:
            raise FormatError("nvfp4 block scales need the tensor scale")
        wanted = (amax / _E2M1_MAX / tensor_scale.to(amax.device)).clamp(max=_E4M3_MAX)
        stored = wanted.to(torch.float8_e4m3fn).view(torch.uint8)
        return stored, self.effective_scales(stored, tensor_scale)

    def effective_scales(
        self, scales: torch.Tensor, tensor_scale: torch.Tensor | None
    ) -> torch.Tensor:
        """Stored block scales (and tensor scale) as float32 multipliers, same shape."""
        if self.variant in ("nf4", "fp4"):
            return scales.to(torch.float32)
        table = _scale_table(self.variant).to(scales.device)  # 256 entries: exact decodes
        values = table[scales.long()]
        if self.variant == "mxfp4":
            return values
        if tensor_scale is None:
            raise FormatError("nvfp4 scales need the tensor scale (the record's zeros slot)")
        return values * tensor_scale.to(device=scales.device, dtype=torch.float32)

    def encode(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Codes (uint8, shape of ``x``) of ``x`` with effective ``scale`` (broadcastable):
        ``x * (1 / scale)`` rounded to the nearest table value; a zero scale gives code zero."""
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        scaled = x.to(torch.float32) * inverse
        if self.variant == "nf4":
            return _NF4_ROUNDING(scaled.clamp(-1.0, 1.0))
        rounding = _BNB_FP4_ROUNDING if self.variant == "fp4" else _E2M1_ROUNDING
        magnitude = rounding(scaled.abs().clamp(max=self.max_value))
        return magnitude | (scaled < 0).to(torch.uint8) << 3

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Table values (float32) of ``codes``."""
        return self.table.to(codes.device)[codes.long()]

    def search_clip(
        self, weight: torch.Tensor, tensor_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, G) float32 clip ratio per block of ``weight`` (N, K): :func:`search_clip`.
        ``tensor_scale`` (NVFP4): the whole weight's, when ``weight`` is a part of it; by
        default ``weight``'s own."""
        return search_clip(self, weight, tensor_scale)

    # ----------------------------------------------------------------------- the Format API

    def quantize(
        self, weight: torch.Tensor, *, clip_ratio: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return quantize_fp4(weight, self, clip_ratio=clip_ratio)

    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return dequantize_fp4(codes, scales, zeros, self, dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "variant": self.variant, "block_size": self.block}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FP4Format:
        if data.get("kind") != cls.kind:
            raise FormatError(f"not a 4-bit table format: {data!r}")
        fields = {k: v for k, v in data.items() if k != "kind"}
        unknown = sorted(set(fields) - {"variant", "block_size"})
        if unknown:
            raise FormatError(
                f"fp4 format entry has unknown keys {unknown}: {data!r}",
                hint="written by a newer compress? upgrade it",
            )
        return cls(**fields)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    # (N, K) -> (N, G, block), the edge block zero-padded
    pad = -x.shape[1] % block
    if pad:
        x = F.pad(x, (0, pad))
    return x.view(x.shape[0], -1, block)


def expand_blocks(per_block: torch.Tensor, block: int, in_features: int) -> torch.Tensor:
    """(N, G) per-block values -> (N, K)."""
    return per_block.repeat_interleave(block, dim=1)[:, :in_features]


def search_clip(
    fmt: TableFormat, weight: torch.Tensor, tensor_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, G) float32 clip ratio per block of ``weight`` (N, K): the one of
    :data:`CLIP_CANDIDATES` whose scale (``ratio * absmax``, as ``fmt`` stores it) rounds the
    block with the least squared error (the first candidate on a tie). Ratios below 1 clip the
    block's largest values; above 1 they leave the table's ends unused, which can pay where a
    scale's rounding (E8M0's powers of two, E4M3's 3 bits) would saturate them.
    ``tensor_scale`` (NVFP4): the whole weight's, when ``weight`` is a part of it; by default
    ``weight``'s own."""
    w = weight.detach().to(torch.float32)
    blocks = _blocks(w, fmt.block)  # (N, G, B)
    amax = blocks.abs().amax(dim=2)
    if tensor_scale is None:
        tensor_scale = fmt.tensor_scale(w)
    best = torch.ones_like(amax)
    best_error = torch.full_like(amax, float("inf"))
    for ratio in CLIP_CANDIDATES:
        _, effective = fmt.block_scales(amax * ratio, tensor_scale)
        scale = effective.unsqueeze(-1)
        error = (blocks - fmt.decode(fmt.encode(blocks, scale)) * scale).square().sum(2)
        better = error < best_error
        best = torch.where(better, torch.full_like(best, ratio), best)
        best_error = torch.where(better, error, best_error)
    return best


def quantize_table(
    weight: torch.Tensor, fmt: TableFormat, *, clip_ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest codes of ``weight`` (out, in) in the table format ``fmt``.

    ``clip_ratio`` (a scalar, or one per block) shrinks each block's absmax before its scale is
    chosen; values beyond the table's ends saturate.

    Returns ``codes`` (out, in) uint8 (indices into ``fmt.table``), ``scales`` (out, blocks) as
    stored and the per-tensor scale (1,) for ``nvfp4`` (else None).
    """
    if weight.dim() != 2:
        raise FormatError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise FormatError(
            f"the weight holds NaN or inf values, which {fmt.variant} codes cannot stand for",
            hint="check the model's weights before quantizing",
        )
    in_features = w.shape[1]
    fmt.check_width(in_features)
    tensor_scale = fmt.tensor_scale(w)
    ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=w.device)
    amax = _blocks(w, fmt.block).abs().amax(dim=2) * ratio  # (N, G)
    stored, effective = fmt.block_scales(amax, tensor_scale)
    codes = fmt.encode(w, expand_blocks(effective, fmt.block, in_features))
    return codes, stored.contiguous(), tensor_scale


def quantize_fp4(
    weight: torch.Tensor, fmt: FP4Format, *, clip_ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest codes of ``weight`` (out, in) in ``fmt`` (:func:`quantize_table`):
    ``codes`` (out, in) uint8 in [0, 15], ``scales`` (out, blocks) as stored and the per-tensor
    scale (1,) for ``nvfp4`` (else None)."""
    return quantize_table(weight, fmt, clip_ratio=clip_ratio)


def _check_stored(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, fmt: TableFormat
) -> None:
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise FormatError(
            f"{fmt.variant} codes must be a 2-D uint8 tensor, got {codes.dtype} "
            f"{tuple(codes.shape)}"
        )
    expected = fmt.scale_shape(*codes.shape)
    if tuple(scales.shape) != expected or scales.dtype != fmt.scale_dtype:
        raise FormatError(
            f"{fmt.label()} of a {codes.shape[0]}x{codes.shape[1]} weight has {fmt.scale_dtype} "
            f"scales of shape {expected}, got {scales.dtype} {tuple(scales.shape)}"
        )
    if (zeros is not None) != (fmt.variant == "nvfp4"):
        raise FormatError(
            "nvfp4 needs its tensor scale (the record's zeros slot)"
            if fmt.variant == "nvfp4"
            else f"{fmt.variant} codes have no zero points"
        )


def dequantize_table(
    codes: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    fmt: TableFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``table[code] * scale`` in float32, then ``dtype``; codes (out, in) -> weight (out, in)."""
    _check_stored(codes, scales, tensor_scale, fmt)
    effective = fmt.effective_scales(scales, tensor_scale)
    expanded = expand_blocks(effective, fmt.block, codes.shape[1])
    return (fmt.decode(codes) * expanded).to(dtype)


def dequantize_fp4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    tensor_scale: torch.Tensor | None,
    fmt: FP4Format,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight 4-bit ``codes`` stand for (:func:`dequantize_table`)."""
    return dequantize_table(codes, scales, tensor_scale, fmt, dtype)
