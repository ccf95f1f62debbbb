"""The 4-bit table formats (NF4 and FP4 as bitsandbytes defines them, OCP MXFP4, NVIDIA NVFP4):
spec, packed module, kernels."""

from compress.formats.fp4.spec import (
    BNB_FP4,
    DEFAULT_BLOCKS,
    E2M1,
    NF4,
    VARIANTS,
    FP4Format,
    dequantize_fp4,
    quantize_fp4,
)

__all__ = [
    "BNB_FP4",
    "DEFAULT_BLOCKS",
    "E2M1",
    "NF4",
    "VARIANTS",
    "FP4Format",
    "dequantize_fp4",
    "quantize_fp4",
]
