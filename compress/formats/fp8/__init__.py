"""The FP8 weight format (E4M3 / E5M2; per-tensor, per-channel or 2-D block fp32 scales):
spec, packed module, kernels."""

from compress.formats.fp8.spec import (
    FP8_DTYPES,
    SCALINGS,
    FP8Format,
    dequantize_fp8,
    expand_scales,
    quantize_fp8,
)

__all__ = ["FP8_DTYPES", "SCALINGS", "FP8Format", "dequantize_fp8", "expand_scales", "quantize_fp8"]
