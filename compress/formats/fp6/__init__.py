"""OCP MXFP6 (E2M3 and E3M2 elements, an E8M0 scale per 32 weights): spec, packed module,
kernels."""

from compress.formats.fp6.spec import (
    LAYOUTS,
    MX_BLOCK,
    VARIANTS,
    FP6Format,
    dequantize_fp6,
    fp6_magnitudes,
    quantize_fp6,
)

__all__ = [
    "LAYOUTS",
    "MX_BLOCK",
    "VARIANTS",
    "FP6Format",
    "dequantize_fp6",
    "fp6_magnitudes",
    "quantize_fp6",
]
