"""Packing of 4-bit table codes; the packed weight the kernels read is
:class:`compress.formats.fp4.table.PackedTable`, which every table format shares."""

from __future__ import annotations

import torch

from compress.formats.packing import pack_codes, unpack_codes

__all__ = ["pack_fp4_codes", "unpack_fp4_codes"]


def pack_fp4_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, ceil(K/2)) uint8, two a byte, low nibble first."""
    return pack_codes(codes, 4)


def unpack_fp4_codes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp4_codes`: (N, ceil(K/2)) uint8 -> (N, K) uint8."""
    return unpack_codes(qweight, 4, in_features)
