"""The stored tensors of one MXFP6 weight, as the kernels receive them.

Kernels take this and the activations, never the module that holds the buffers, so they can be
tested and benchmarked without a module around them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from compress.formats.fp4.spec import expand_blocks
from compress.formats.fp6.spec import FP6Format
from compress.formats.packing import pack_codes, unpack_codes

__all__ = ["PackedFP6", "pack_fp6_codes", "unpack_fp6_codes"]


def pack_fp6_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 63] -> (N, ceil(6K/8)) uint8, a little-endian bit stream a row."""
    return pack_codes(codes, 6)


def unpack_fp6_codes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp6_codes`: (N, ceil(6K/8)) uint8 -> (N, K) uint8."""
    return unpack_codes(qweight, 6, in_features)


class PackedFP6(NamedTuple):
    """``W[n, k] = table[code[n, k]] * 2**(scales[n, k // 32] - 127)`` (see
    :mod:`compress.formats.fp6.spec` for the layout)."""

    qweight: torch.Tensor  # (N, ceil(6K/8)) uint8
    scales: torch.Tensor  # (N, ceil(K/32)) uint8 E8M0
    bias: torch.Tensor | None
    fmt: FP6Format
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight: the reference kernel's and the tests' oracle."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` of the dense weight, ``(stop - start, K)``: the same fp32
        products as :func:`~compress.formats.fp6.spec.dequantize_fp6`, then ``dtype``."""
        fmt, columns = self.fmt, self.in_features
        values = _decode_values(self.qweight[start:stop], fmt)  # (rows, 4 * ceil(K/4))
        rows = values.shape[0]
        effective = fmt.effective_scales(self.scales[start:stop], None)
        if values.shape[1] == columns and columns % fmt.block == 0:  # no expanded scales
            blocks = values.view(rows, -1, fmt.block) * effective.unsqueeze(-1)
            return blocks.view(rows, columns).to(dtype)
        return (values[:, :columns] * expand_blocks(effective, fmt.block, columns)).to(dtype)


def _decode_values(packed: torch.Tensor, fmt: FP6Format) -> torch.Tensor:
    """(rows, B) packed bytes -> (rows, 4 * ceil(B/3)) float32 element values: three bytes
    hold four codes, so each 12-bit half of a 24-bit word is two codes, looked up in one gather
    of a (4096, 2) pair table (2.5x faster than unpacking codes and gathering them one by one,
    on one core at 1536x576)."""
    rows, width = packed.shape
    pad = -width % 3
    if pad:
        packed = F.pad(packed, (0, pad))
    triples = packed.view(rows, -1, 3).to(torch.int32)
    word = triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16)
    index = torch.stack((word & 0xFFF, word >> 12), dim=-1)  # (rows, B/3, 2)
    pairs = _pair_table(fmt, packed.device)
    return pairs.index_select(0, index.reshape(-1)).view(rows, -1)


_PAIRS: dict[tuple[str, str], torch.Tensor] = {}


def _pair_table(fmt: FP6Format, device: torch.device) -> torch.Tensor:
    """(4096, 2) float32: 12 bits -> (value of their low code, value of their high code)."""
    key = (fmt.variant, str(device))
    if key not in _PAIRS:
        table = fmt.table
        bits = torch.arange(4096, device="cpu")  # explicit: a meta-device load may be active
        _PAIRS[key] = torch.stack((table[bits & 0x3F], table[bits >> 6]), dim=-1).to(device)
    return _PAIRS[key]
