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
        """Rows ``start:stop`` of the dense weight, ``(stop - start, K)``: the same fp32
        products as :func:`~compress.formats.fp4.spec.dequantize_fp4`, then ``dtype``."""
        fmt, columns = self.fmt, self.in_features
        packed = self.qweight[start:stop]
        rows = packed.shape[0]
        # one gather of a byte's two values (low nibble: the even column) instead of two of
        # one value each and a stack: 2.5x faster on one core (scripts/bench_fp4.py --speed)
        pairs = _pair_table(fmt, packed.device)
        values = pairs.index_select(0, packed.reshape(-1).to(torch.int32)).view(rows, -1)
        effective = fmt.effective_scales(self.scales[start:stop], self.tensor_scale)
        if values.shape[1] == columns and columns % fmt.block == 0:  # no expanded scales
            blocks = values.view(rows, -1, fmt.block) * effective.unsqueeze(-1)
            return blocks.view(rows, columns).to(dtype)
        return (values[:, :columns] * expand_blocks(effective, fmt.block, columns)).to(dtype)


_PAIRS: dict[tuple[str, str], torch.Tensor] = {}


def _pair_table(fmt: FP4Format, device: torch.device) -> torch.Tensor:
    """(256, 2) float32: byte -> (value of its low nibble, value of its high nibble)."""
    key = (fmt.variant, str(device))
    if key not in _PAIRS:
        table = fmt.table
        byte = torch.arange(256)
        _PAIRS[key] = torch.stack((table[byte & 0x0F], table[byte >> 4]), dim=-1).to(device)
    return _PAIRS[key]
