"""The integer format: group-wise INT2-INT8 codes with scales (and zero points).

One definition, shared by the algorithms (which choose codes), export (which packs them) and
the kernels (which compute with them).

Integer format, ``b`` bits, weight ``W`` of shape ``(out_features, in_features)`` split along the
input dimension into groups of ``group_size`` columns (``None``: one group per row):

* codes are unsigned integers in ``[0, 2**b - 1]``;
* ``W ≈ (code - zero) * scale`` per group;
* symmetric: ``zero`` is the constant ``2**(b-1)`` and is not stored; the scale maps the group's
  absolute maximum to ``2**(b-1) - 1``;
* asymmetric: ``zero`` is an integer in ``[0, 2**b - 1]`` stored per group (at ``b`` bits), the
  scale maps the group's range onto all ``2**b`` levels;
* scales are stored in ``scale_dtype`` (fp16 by default) and the codes are computed with the
  already-rounded scale, so the dequantized weight is exactly what a loader reproduces.

**Block floating point** is the symmetric format with ``scale_dtype: e8m0``: each group (block)
shares a power-of-two scale stored as one byte, its biased exponent ``e`` (scale ``2**(e-127)``,
the OCP Microscaling E8M0 encoding), and each weight is a ``b``-bit two's-complement mantissa
(``code - 2**(b-1)``). The exponent follows the OCP Microscaling rule for integer elements:
``scale = 2**(floor(log2(amax)) - (b - 2))``, so the block's largest weight lands in the top
octave of the mantissa (``[2**(b-2), 2**(b-1))``) and a weight that rounds past ``2**(b-1) - 1``
saturates. ``int8 g32 e8m0`` is OCP **MXINT8** (an INT8 element read as 1.6 fixed point, times
the shared scale); 16/32/64 wide blocks with 3-8-bit mantissas are the block floating point of
the outlier-rearrangement paper. A block of zeros gets ``e = 1`` (the encoder never writes 0 or
255; a reader decodes 0 as ``2**-127`` and 255 as infinity).

Stored tensors of a module with weight ``(N, K)``, ``G = K // group_size`` groups (``G = 1``
per-channel):

============  ======================  ===========  ==========================================
name          shape                   dtype        meaning
============  ======================  ===========  ==========================================
``qweight``   (N, ceil(K*b/8))        uint8        codes, each row a little-endian bit stream
``scales``    (N, G)                  scale dtype  per-group scale (``e8m0``: uint8 exponent)
``qzeros``    (ceil(N*G*b/8),)        uint8        per-group zero points, row-major, packed
                                                   as one bit stream (no per-row padding);
                                                   absent when symmetric (zero = 2**(b-1))
============  ======================  ===========  ==========================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch

from compress.errors import FormatError
from compress.formats.base import StoredTensor, register_format

__all__ = [
    "E8M0_BIAS",
    "SCALE_DTYPES",
    "IntFormat",
    "ScaleDtype",
    "dequantize_int",
    "quantize_int",
]

SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "e8m0": torch.uint8,
}
"""Scale encodings -> the dtype of the stored tensor (``e8m0``: a biased power-of-two exponent)."""

ScaleDtype = Literal["float16", "bfloat16", "float32", "e8m0"]
E8M0_BIAS = 127


@register_format(runtime="compress.formats.int.runtime")
@dataclass(frozen=True)
class IntFormat:
    """Group-wise integer format for a weight matrix."""

    bits: int
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: ScaleDtype = "float16"

    kind: ClassVar[str] = "int"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise FormatError(f"integer bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise FormatError(f"group_size must be positive, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}")
        if self.power_of_two_scales and not self.symmetric:
            raise FormatError(
                "scale_dtype e8m0 (block floating point) has no zero points, but symmetric is "
                "false",
                hint="set symmetric: true, or use a float scale_dtype for asymmetric codes",
            )
        if self.power_of_two_scales and self.group_size is None:
            raise FormatError(
                "scale_dtype e8m0 (block floating point) shares an exponent per block, but "
                "group_size is null (one scale per row)",
                hint="give group_size, e.g. 32 (MXINT8) or 16 / 64",
            )

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def midpoint(self) -> int:
        """The implicit zero point of symmetric codes."""
        return 1 << (self.bits - 1)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        """The dtype of the stored ``scales`` tensor (uint8 for ``e8m0``)."""
        return SCALE_DTYPES[self.scale_dtype]

    @property
    def power_of_two_scales(self) -> bool:
        """Block floating point: scales are powers of two stored as E8M0 exponents."""
        return self.scale_dtype == "e8m0"

    def store_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """float32 scales (already representable: see :func:`quantize_int`) -> as stored."""
        if self.power_of_two_scales:
            exponent = torch.round(torch.log2(scales.to(torch.float32)))
            return (exponent + E8M0_BIAS).clamp_(0, 255).to(torch.uint8)
        return scales.to(self.torch_scale_dtype)

    def scale_values(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored scales -> float32 values (``e8m0``: ``2**(e - 127)``, exact)."""
        if self.power_of_two_scales:
            exponent = stored.to(torch.int32) - E8M0_BIAS
            return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)
        return stored.to(torch.float32)

    def groups(self, in_features: int) -> int:
        """Groups per row; raises if the group size does not divide ``in_features``."""
        size = self.group_size or in_features
        if in_features % size:
            divisors = [d for d in (32, 64, 96, 128, 192, 256) if in_features % d == 0]
            raise FormatError(
                f"group_size {size} does not divide the input dimension {in_features}",
                hint=f"use a divisor of {in_features}"
                + (f" such as {divisors}" if divisors else "")
                + " or group_size: null for per-channel scales",
            )
        return in_features // size

    def bits_per_weight(self, in_features: int) -> float:
        """Nominal stored cost: code bits plus scale (and zero) bits spread over each group."""
        size = self.group_size or in_features
        dtype = self.torch_scale_dtype
        scale_bits = 8 if self.power_of_two_scales else torch.finfo(dtype).bits
        zero_bits = 0 if self.symmetric else self.bits
        return self.bits + (scale_bits + zero_bits) / size

    def check_width(self, in_features: int) -> None:
        self.groups(in_features)

    def stored_tensors(self, out_features: int, in_features: int) -> list[StoredTensor]:
        groups = self.groups(in_features)
        tensors = [
            StoredTensor(
                "qweight",
                torch.uint8,
                (out_features, (in_features * self.bits + 7) // 8),
                f"{self.bits}-bit codes, each row a little-endian bit stream",
            ),
            StoredTensor(
                "scales", self.torch_scale_dtype, (out_features, groups), "per-group scale"
            ),
        ]
        if not self.symmetric:
            zero_bytes = (out_features * groups * self.bits + 7) // 8
            tensors.append(
                StoredTensor(
                    "qzeros", torch.uint8, (zero_bytes,), "per-group zero points, one bit stream"
                )
            )
        return tensors

    def label(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        if self.power_of_two_scales:
            return f"int{self.bits} {group} e8m0"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"

    def quantize(
        self, weight: torch.Tensor, *, clip_ratio: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return quantize_int(weight, self, clip_ratio=clip_ratio)

    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return dequantize_int(codes, scales, zeros, self, dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    describe = to_dict  # the name the manifest code has always used

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntFormat:
        fields = {k: v for k, v in data.items() if k != "kind"}
        if data.get("kind", "int") != "int":
            raise FormatError(f"not an integer format: {data!r}")
        return cls(**fields)


def _grouped(weight: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    # (out, in) -> (out, groups, group_size)
    out_features, in_features = weight.shape
    groups = fmt.groups(in_features)
    return weight.reshape(out_features, groups, in_features // groups)


def quantize_int(
    weight: torch.Tensor,
    fmt: IntFormat,
    *,
    clip_ratio: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest codes of ``weight`` (out, in) in ``fmt``.

    ``clip_ratio`` (scalar or (out, groups)) shrinks the range before the scale is chosen; an
    MSE observer searches it, min-max uses 1.0.

    Returns ``codes`` (out, in) uint8, ``scales`` (out, groups) in ``fmt.scale_dtype`` and
    ``zeros`` (out, groups) uint8 or ``None`` when symmetric.
    """
    if weight.dim() != 2:
        raise FormatError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = _grouped(weight.detach().to(torch.float32), fmt)
    ratio = torch.as_tensor(clip_ratio, dtype=torch.float32)
    if ratio.dim() == 2:
        ratio = ratio.unsqueeze(-1)
    if fmt.power_of_two_scales:
        scale = _power_of_two_scales(w.abs().amax(dim=-1, keepdim=True) * ratio, fmt.bits)
        codes = (torch.round(w / scale) + fmt.midpoint).clamp_(0, fmt.levels - 1)
        codes_2d = codes.reshape(weight.shape).to(torch.uint8)
        return codes_2d, fmt.store_scales(scale.squeeze(-1)), None
    tiny = torch.finfo(fmt.torch_scale_dtype).tiny
    if fmt.symmetric:
        # codes run from -midpoint to midpoint - 1 around the midpoint (two's complement's
        # range): the smallest scale that clips neither end, so a group whose extreme is
        # negative uses code 0 (at 4 bits a step of |min| / 8 rather than / 7)
        positive = (w.amax(dim=-1, keepdim=True) * ratio).clamp(min=0)
        negative = (-w.amin(dim=-1, keepdim=True) * ratio).clamp(min=0)
        scale = torch.maximum(positive / (fmt.midpoint - 1), negative / fmt.midpoint)
        scale = scale.clamp_min(tiny)
        scale = scale.to(fmt.torch_scale_dtype).to(torch.float32)
        codes = torch.round(w / scale) + fmt.midpoint
        codes = codes.clamp_(0, fmt.levels - 1)
        zeros = None
    else:
        low = (w.amin(dim=-1, keepdim=True) * ratio).clamp(max=0)
        high = (w.amax(dim=-1, keepdim=True) * ratio).clamp(min=0)
        scale = ((high - low) / (fmt.levels - 1)).clamp_min(tiny)
        scale = scale.to(fmt.torch_scale_dtype).to(torch.float32)
        zero = torch.round(-low / scale).clamp_(0, fmt.levels - 1)
        codes = (torch.round(w / scale) + zero).clamp_(0, fmt.levels - 1)
        zeros = zero.squeeze(-1).to(torch.uint8)
    codes_2d = codes.reshape(weight.shape).to(torch.uint8)
    return codes_2d, scale.squeeze(-1).to(fmt.torch_scale_dtype), zeros


def _power_of_two_scales(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """OCP Microscaling's shared scale for ``bits``-bit integer elements:
    ``2**(floor(log2(amax)) - (bits - 2))``, exponent clamped to E8M0's ``[-126, 127]``."""
    exponent = torch.floor(torch.log2(amax.clamp_min(torch.finfo(torch.float32).tiny)))
    exponent = (exponent - (bits - 2)).clamp_(1 - E8M0_BIAS, 254 - E8M0_BIAS)
    return torch.ldexp(torch.ones_like(exponent), exponent.to(torch.int32))


def dequantize_int(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    fmt: IntFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(code - zero) * scale`` per group; codes (out, in) → weight (out, in) in ``dtype``."""
    grouped = _grouped(codes, fmt).to(torch.float32)
    zero: torch.Tensor | float
    zero = float(fmt.midpoint) if zeros is None else zeros.to(torch.float32).unsqueeze(-1)
    weight = (grouped - zero) * fmt.scale_values(scales).unsqueeze(-1)
    return weight.reshape(codes.shape).to(dtype)
