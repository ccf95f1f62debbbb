"""The FP8 weight format: 8-bit floating-point codes (E4M3 or E5M2) with fp32 scales.

One definition, shared by the algorithms (which choose codes), export (which packs them) and
the kernels (which compute with them).

FP8 format, weight ``W`` of shape ``(N, K)`` = ``(out_features, in_features)``, cut into scale
blocks of ``(bn, bk)``: one block for the whole tensor (``scaling: tensor``, ``(N, K)``), one per
output row (``channel``, ``(1, K)``), square 2-D blocks (``block``, ``(b, b)``, DeepSeek-V3's
128×128 weight blocks) or OCP Microscaling's 32 weights of a row (``mx``, ``(1, 32)``: MXFP8):

* a code is the bit pattern of a ``torch.float8_e4m3fn`` (E4M3, largest finite 448, no inf) or
  ``torch.float8_e5m2`` (E5M2, largest finite 57344) number, stored as uint8;
* ``W ≈ fp8(code) * scale`` per block; the scale maps the block's absolute maximum onto the
  largest finite FP8 value, ``scale = amax / fp8_max``, kept in fp32 (a zero block gets the
  smallest normal fp32 scale, and codes 0);
* quantizing divides by the scale in fp32, saturates to ``±fp8_max`` and casts with torch's
  round-to-nearest-even, so a code is never NaN or inf (torch 2.13 clamps an out-of-range E4M3
  cast but sends E5M2 past 57344 to inf; the saturation is ours, for both); a weight that is
  not finite is refused.
* ``mx`` (MXFP8, OCP Microscaling Formats v1.0): the scale is a power of two, stored as its
  E8M0 biased exponent (uint8, ``2**(e - 127)``), ``scale = 2**(floor(log2(amax)) - emax)`` with
  ``emax`` the exponent of the element's largest normal (8 for E4M3, 15 for E5M2); the block's
  largest weight then lands in ``[2**emax, 2**(emax+1))`` and saturates above the largest finite
  value (448 / 57344), as the specification's conversion does.

Block sizes that do not divide the weight give partial edge blocks, as DeepSeek-V3's checkpoints
and vLLM's block-FP8 layout do (scales of shape ``(ceil(N/b), ceil(K/b))``): SmolLM2's widths
(576, 192) are not multiples of 128, a scale block is a statistic rather than a memory tile
(codes are one byte each, so nothing is packed across a block), and the edge block's scale is
taken over the weights it really holds. Refusing instead would make the common 128 unusable on
half the models and buy nothing.

Stored tensors of a module with weight ``(N, K)``, scale blocks ``(bn, bk)``:

============  ===================================  =======  ===================================
name          shape                                dtype    meaning
============  ===================================  =======  ===================================
``qweight``   (N, K)                               uint8    FP8 bit patterns, row-major
                                                            (``qweight.view(float8 dtype)``)
``scales``    (ceil(N/bn), ceil(K/bk))             float32  per-block scale: (1, 1) per-tensor,
                                                            (N, 1) per-channel
                                                   uint8    ``mx``: E8M0 exponents, (N, K/32)
============  ===================================  =======  ===================================

``W[n, k] = fp8(qweight[n, k]) * scales[n // bn, k // bk]``. Codes are stored as uint8 (not as
safetensors ``F8_E4M3``) so that every stage that handles integer codes (entropy coding, offload
checkpoints, the export summary) handles these unchanged; the format says how to read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from compress.errors import FormatError, nearest
from compress.formats.base import StoredTensor, register_format

__all__ = [
    "FP8_DTYPES",
    "MX_BLOCK",
    "SCALINGS",
    "FP8Format",
    "dequantize_fp8",
    "expand_scales",
    "quantize_fp8",
]

FP8_DTYPES: dict[str, torch.dtype] = {
    "e4m3": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
}
SCALINGS = ("tensor", "channel", "block", "mx")
MX_BLOCK = 32
"""Weights of a row sharing one E8M0 scale in OCP Microscaling formats."""
_E8M0_BIAS = 127

Variant = Literal["e4m3", "e5m2"]
Scaling = Literal["tensor", "channel", "block", "mx"]


@register_format(runtime="compress.formats.fp8.runtime")
@dataclass(frozen=True)
class FP8Format:
    """FP8 weights (E4M3 or E5M2) with fp32 scales per tensor, per channel or per 2-D block, or
    E8M0 scales per 32 weights of a row (MXFP8)."""

    variant: Variant = "e4m3"
    scaling: Scaling = "channel"
    block_size: int | None = None  # the side of a square block; only with scaling "block"

    kind: ClassVar[str] = "fp8"

    def __post_init__(self) -> None:
        if self.variant not in FP8_DTYPES:
            guess = nearest(str(self.variant), FP8_DTYPES)
            raise FormatError(
                f"fp8 variant must be one of {', '.join(FP8_DTYPES)}, got {self.variant!r}",
                hint=f"did you mean {guess!r}?" if guess else None,
            )
        if self.scaling not in SCALINGS:
            guess = nearest(str(self.scaling), SCALINGS)
            raise FormatError(
                f"fp8 scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}",
                hint=f"did you mean {guess!r}?" if guess else None,
            )
        if self.scaling == "block":
            size = self.block_size
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise FormatError(
                    f"fp8 block scaling needs a positive integer block_size, got {size!r}",
                    hint="e.g. block_size: 128 (DeepSeek-V3) or 64",
                )
        elif self.block_size is not None and self.scaling == "mx":
            raise FormatError(
                f"mxfp8 blocks are {MX_BLOCK} weights of a row by definition, got block_size "
                f"{self.block_size}",
                hint="drop block_size, or use scaling: block for 2-D blocks of another size",
            )
        elif self.block_size is not None:
            raise FormatError(
                f"fp8 block_size {self.block_size} is only used with scaling 'block', "
                f"not {self.scaling!r}",
                hint="drop block_size, or use scaling: block",
            )

    @property
    def code_bits(self) -> int:
        return 8

    @property
    def torch_dtype(self) -> torch.dtype:
        """The float8 dtype whose bit patterns the codes are."""
        return FP8_DTYPES[self.variant]

    @property
    def scale_dtype(self) -> torch.dtype:
        """The dtype of the stored ``scales``: uint8 E8M0 exponents for ``mx``, else fp32."""
        return torch.uint8 if self.scaling == "mx" else torch.float32

    def scale_values(self, stored: torch.Tensor) -> torch.Tensor:
        """Stored scales -> float32 values (``mx``: ``2**(e - 127)``, exact)."""
        if self.scaling == "mx":
            exponent = stored.to(torch.int32) - _E8M0_BIAS
            return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)
        return stored.to(torch.float32)

    @property
    def max_exponent(self) -> int:
        """Exponent of the largest normal value (8 for E4M3, 15 for E5M2): MX's ``emax``."""
        return int(torch.tensor(self.max_value).log2().floor())

    @property
    def max_value(self) -> float:
        """Largest finite value of the variant (448 for E4M3, 57344 for E5M2)."""
        return float(torch.finfo(self.torch_dtype).max)

    def block_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """``(bn, bk)``: rows and columns of the weight that share one scale."""
        if self.scaling == "tensor":
            return max(out_features, 1), max(in_features, 1)
        if self.scaling == "channel":
            return 1, max(in_features, 1)
        if self.scaling == "mx":
            return 1, MX_BLOCK
        assert self.block_size is not None  # __post_init__
        return self.block_size, self.block_size

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """Shape of ``scales``: blocks down and across, partial edge blocks included."""
        bn, bk = self.block_shape(out_features, in_features)
        return -(-out_features // bn), -(-in_features // bk)

    def check_width(self, in_features: int) -> None:
        """Any width: a block size that does not divide it gives a partial edge block."""
        if in_features < 1:
            raise FormatError(f"fp8 weights need at least one input column, got {in_features}")

    def bits_per_weight(self, in_features: int) -> float:
        """8 code bits plus the fp32 scales spread over their blocks (nominal: full blocks;
        per-tensor counts as 8, its one scale being negligible)."""
        if self.scaling == "tensor":
            return 8.0
        if self.scaling == "channel":
            return 8 + 32 / in_features
        if self.scaling == "mx":
            return 8 + 8 / MX_BLOCK
        assert self.block_size is not None
        return 8 + 32 / self.block_size**2

    def stored_tensors(self, out_features: int, in_features: int) -> list[StoredTensor]:
        return [
            StoredTensor(
                "qweight",
                torch.uint8,
                (out_features, in_features),
                f"fp8 {self.variant} bit patterns, row-major",
            ),
            StoredTensor(
                "scales",
                self.scale_dtype,
                self.scale_shape(out_features, in_features),
                "E8M0 exponent per 32 weights"
                if self.scaling == "mx"
                else f"per-{self.scaling} fp32 scale",
            ),
        ]

    def label(self) -> str:
        if self.scaling == "mx":
            return f"mxfp8 {self.variant}"
        how = f"block {self.block_size}" if self.scaling == "block" else f"per-{self.scaling}"
        return f"fp8 {self.variant} {how}"

    def quantize(
        self, weight: torch.Tensor, *, clip_ratio: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return quantize_fp8(weight, self, clip_ratio=clip_ratio)

    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        if zeros is not None:
            raise FormatError("fp8 codes have no zero points")
        return dequantize_fp8(codes, scales, self, dtype)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "variant": self.variant, "scaling": self.scaling}
        if self.block_size is not None:
            data["block_size"] = self.block_size
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FP8Format:
        if data.get("kind") != cls.kind:
            raise FormatError(f"not an fp8 format: {data!r}")
        fields = {k: v for k, v in data.items() if k != "kind"}
        unknown = sorted(set(fields) - {"variant", "scaling", "block_size"})
        if unknown:
            raise FormatError(
                f"fp8 format entry has unknown keys {unknown}: {data!r}",
                hint="written by a newer compress? upgrade it",
            )
        return cls(**fields)


def _blocks(x: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    # (N, K) -> (N/bn, bn, K/bk, bk), the edges zero-padded to whole blocks
    out_features, in_features = x.shape
    pad_n, pad_k = -out_features % bn, -in_features % bk
    if pad_n or pad_k:
        x = F.pad(x, (0, pad_k, 0, pad_n))
    return x.view(x.shape[0] // bn, bn, x.shape[1] // bk, bk)


def expand_scales(
    scales: torch.Tensor, fmt: FP8Format, out_features: int, in_features: int
) -> torch.Tensor:
    """``scales`` (blocks down, blocks across) broadcastable against the (N, K) weight: a row
    or column of blocks is repeated only where a dimension holds more than one block."""
    bn, bk = fmt.block_shape(out_features, in_features)
    if scales.shape[0] > 1:
        scales = scales.repeat_interleave(bn, dim=0)[:out_features]
    if scales.shape[1] > 1:
        scales = scales.repeat_interleave(bk, dim=1)[:, :in_features]
    return scales


def quantize_fp8(
    weight: torch.Tensor, fmt: FP8Format, *, clip_ratio: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """Round-to-nearest-even FP8 codes of ``weight`` (out, in) in ``fmt``.

    ``clip_ratio`` (a scalar, or one per scale block) shrinks each block's range before its
    scale is chosen; values beyond it saturate to ``±fp8_max``.

    Returns ``codes`` (out, in) uint8 (the FP8 bit patterns), ``scales`` (blocks down, blocks
    across) float32 and ``None`` (no zero points).
    """
    if weight.dim() != 2:
        raise FormatError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise FormatError(
            "the weight holds NaN or inf values, which FP8 codes cannot stand for",
            hint="check the model's weights (a diverged fine-tune?) before quantizing",
        )
    out_features, in_features = w.shape
    fmt.check_width(in_features)
    bn, bk = fmt.block_shape(out_features, in_features)
    blocks = _blocks(w, bn, bk)  # (N/bn, bn, K/bk, bk)
    amax = blocks.abs().amax(dim=(1, 3))  # (N/bn, K/bk)
    ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=w.device)
    tiny = torch.finfo(torch.float32).tiny
    if fmt.scaling == "mx":
        exponent = torch.floor(torch.log2((amax * ratio).clamp_min(tiny))) - fmt.max_exponent
        exponent = exponent.clamp_(1 - _E8M0_BIAS, 254 - _E8M0_BIAS)  # stored 1..254
        stored = (exponent + _E8M0_BIAS).to(torch.uint8)
        scales = fmt.scale_values(stored)
    else:
        scales = stored = (amax * ratio / fmt.max_value).clamp_min(tiny)
    limit = fmt.max_value
    scaled = (blocks / scales[:, None, :, None]).clamp_(-limit, limit)
    codes = scaled.to(fmt.torch_dtype).view(torch.uint8)
    codes = codes.reshape(scaled.shape[0] * bn, scaled.shape[2] * bk)
    return codes[:out_features, :in_features].contiguous(), stored.contiguous(), None


def _check_stored(codes: torch.Tensor, scales: torch.Tensor, fmt: FP8Format) -> None:
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise FormatError(
            f"fp8 codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}"
        )
    expected = fmt.scale_shape(*codes.shape)
    if tuple(scales.shape) != expected:
        raise FormatError(
            f"{fmt.label()} of a {codes.shape[0]}x{codes.shape[1]} weight has scales of shape "
            f"{expected}, got {tuple(scales.shape)}"
        )


def dequantize_fp8(
    codes: torch.Tensor,
    scales: torch.Tensor,
    fmt: FP8Format,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``fp8(code) * scale`` in fp32, then ``dtype``; codes (out, in) → weight (out, in)."""
    _check_stored(codes, scales, fmt)
    values = codes.view(fmt.torch_dtype).to(torch.float32)
    expanded = expand_scales(fmt.scale_values(scales), fmt, *codes.shape)
    return (values * expanded).to(dtype)
