"""Dense bit packing of integer codes, every width from 2 to 8 bits.

Layout (the contract shared with every kernel): each row of ``K`` codes is one little-endian
bit stream. Code ``k`` of a row occupies bits ``[k*b, (k+1)*b)`` of that row, where bit ``i``
of the stream is bit ``i % 8`` of byte ``i // 8``. A row takes ``ceil(K*b / 8)`` bytes, so 3-,
5-, 6- and 7-bit codes waste no bits (only the last byte of a row can be partly unused when
``K*b`` is not a multiple of 8).

Eight codes of ``b`` bits fill exactly ``b`` bytes, which is how both directions vectorise: a
block of 8 codes is assembled into (or split out of) one 64-bit integer.
"""

from __future__ import annotations

import torch

__all__ = ["pack_codes", "packed_row_bytes", "unpack_codes"]

_BYTE_SHIFTS = torch.arange(8, dtype=torch.int64) * 8


def packed_row_bytes(columns: int, bits: int) -> int:
    """Bytes one packed row of ``columns`` codes takes."""
    return (columns * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, K) integer codes in ``[0, 2**bits)`` → (rows, ceil(K*bits/8)) uint8."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes, got shape {tuple(codes.shape)}")
    rows, columns = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if bits == 4:  # two codes a byte, low nibble first: the common case, kept cheap
        padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, columns % 2))
        return (padded[:, 0::2] | (padded[:, 1::2] << 4)).contiguous()
    blocks = -(-columns // 8)
    padded = torch.zeros(rows, blocks * 8, dtype=torch.int64, device=codes.device)
    padded[:, :columns] = codes.to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    # (rows, blocks, 8 codes) -> one int64 of 8*bits significant bits per block
    words = (padded.view(rows, blocks, 8) << shifts).sum(dim=-1)
    # -> (rows, blocks, bits bytes), little-endian
    data = (words.unsqueeze(-1) >> _BYTE_SHIFTS[:bits].to(codes.device)) & 0xFF
    return data.reshape(rows, blocks * bits)[:, : packed_row_bytes(columns, bits)].to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (rows, ceil(K*bits/8)) uint8 → (rows, K) uint8."""
    _check_bits(bits)
    rows, width = packed.shape
    if width != packed_row_bytes(columns, bits):
        raise ValueError(
            f"packed rows have {width} bytes; {columns} codes of {bits} bits need "
            f"{packed_row_bytes(columns, bits)}"
        )
    if bits == 8:
        return packed
    if bits == 4:
        out = torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(rows, -1)
        return out[:, :columns]
    blocks = -(-columns // 8)
    padded = torch.zeros(rows, blocks * bits, dtype=torch.int64, device=packed.device)
    padded[:, :width] = packed.to(torch.int64)
    words = (padded.view(rows, blocks, bits) << _BYTE_SHIFTS[:bits].to(packed.device)).sum(-1)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.view(rows, blocks * 8)[:, :columns].to(torch.uint8)
