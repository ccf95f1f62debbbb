"""Packing of MXFP6 codes; the packed weight the kernels read is
:class:`compress.formats.fp4.table.PackedTable`, which every table format shares."""

from __future__ import annotations

import torch

from compress.formats.packing import pack_codes, unpack_codes

__all__ = ["pack_fp6_codes", "unpack_fp6_codes"]


def pack_fp6_codes(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 63] -> (N, ceil(6K/8)) uint8, a little-endian bit stream a row."""
    return pack_codes(codes, 6)


def unpack_fp6_codes(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp6_codes`: (N, ceil(6K/8)) uint8 -> (N, K) uint8."""
    return unpack_codes(qweight, 6, in_features)
