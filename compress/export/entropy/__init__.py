"""Lossless entropy coding of weights: BF16 (DFloat11-style) and quantized integer codes.

- :mod:`.codec`: the chunked Huffman stream format, encoders, decoders (C++, torch, Triton).
- :mod:`.passes`: the ``entropy_code`` pass (marks a model for coding at export).
- :mod:`.storage`: the export writer hook and the load path (decode at load or just in time).
"""

from compress.export.entropy.codec import CodedTensor, StreamSpec, decode, encode_bf16, encode_codes
from compress.export.entropy.passes import EntropyCodeConfig, entropy_code
from compress.export.entropy.storage import decode_mode, encoder_for, loader_for

__all__ = [
    "CodedTensor",
    "EntropyCodeConfig",
    "StreamSpec",
    "decode",
    "decode_mode",
    "encode_bf16",
    "encode_codes",
    "encoder_for",
    "entropy_code",
    "loader_for",
]
