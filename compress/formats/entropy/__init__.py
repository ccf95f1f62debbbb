"""Lossless entropy coding of weights: BF16 (DFloat11-style) and quantized integer codes.

The codec is a format-side unit: the chunked Huffman stream format, its encoders and decoders
(C++ in ``entropy_decode.cpp``, torch, Triton). The ``entropy_code`` pass that marks a model for
coding is :mod:`compress.lossless.entropy_code`; the export hook and load path (decode at load or
just in time) are :mod:`compress.export.entropy`.
"""

from compress.formats.entropy.codec import (
    CodedTensor,
    StreamSpec,
    decode,
    encode_bf16,
    encode_codes,
)

__all__ = ["CodedTensor", "StreamSpec", "decode", "encode_bf16", "encode_codes"]
