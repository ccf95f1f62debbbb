"""The stored tensors of one 4-bit table weight, as the kernels receive them.

Kernels take this and the activations, never the module that holds the buffers, so they can be
tested and benchmarked without a module around them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compress.formats.fp4.spec import FP4Format, expand_blocks
from compress.formats.packing import pack_codes, unpack_codes

__all__ = ["PackedFP4", "pack_fp4_codes", "unpack_fp4_codes"]


def pack_fp4_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, ceil(K/2)) uint8, two a byte, low nibble first."""
    return pack_codes(codes, 4)


def unpack_fp4_codes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp4_codes`: (N, ceil(K/2)) uint8 -> (N, K) uint8."""
    return unpack_codes(qweight, 4, in_features)


class PackedFP4(NamedTuple):
    """``W[n, k] = table[code[n, k]] * scale[n, k // B] (* tensor_scale)`` (see
    :mod:`compress.formats.fp4.spec` for the layout)."""

    qweight: torch.Tensor  # (N, ceil(K/2)) uint8
    scales: torch.Tensor  # (N, ceil(K/B)) float32 or uint8
    tensor_scale: torch.Tensor | None  # (1,) float32, nvfp4 only
    bias: torch.Tensor | None
    fmt: FP4Format
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight: the reference kernel's and the tests' oracle."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` of the dense weight, ``(stop - start, K)``."""
        fmt = self.fmt
        packed = self.qweight[start:stop]
        # (rows, K/2) bytes -> (rows, K) table values: low nibble is the even column
        table = fmt.table.to(packed.device)
        values = torch.stack((table[(packed & 0x0F).long()], table[(packed >> 4).long()]), dim=-1)
        values = values.view(packed.shape[0], -1)[:, : self.in_features]
        effective = fmt.effective_scales(self.scales[start:stop], self.tensor_scale)
        return (values * expand_blocks(effective, fmt.block, self.in_features)).to(dtype)
