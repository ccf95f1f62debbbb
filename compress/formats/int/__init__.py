"""The integer format (INT2-INT8, group-wise, symmetric or not): spec, packed modules, kernels."""

from compress.formats.int.spec import SCALE_DTYPES, IntFormat, dequantize_int, quantize_int

__all__ = ["SCALE_DTYPES", "IntFormat", "dequantize_int", "quantize_int"]
