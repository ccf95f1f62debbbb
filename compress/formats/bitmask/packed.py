"""The stored tensors of one bitmask sparse weight, as the kernels receive them, and the packing
of a dense (pruned) weight into them."""

from __future__ import annotations

from typing import NamedTuple

import torch

from compress.formats.bitmask.spec import BitmaskFormat

__all__ = ["PackedBitmask", "block_offsets", "pack_bitmask", "pack_bits", "unpack_bits"]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, ceil(K/8)) uint8, column ``8i + j`` in bit ``j`` of byte ``i``."""
    rows, columns = mask.shape
    padded = torch.zeros(rows, -(-columns // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :columns] = mask.to(torch.uint8)
    weights = _BIT_WEIGHTS.to(mask.device)
    return (padded.view(rows, -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_bits(bitmask: torch.Tensor, columns: int) -> torch.Tensor:
    """(N, ceil(K/8)) uint8 -> (N, K) bool; the inverse of :func:`pack_bits`."""
    weights = _BIT_WEIGHTS.to(bitmask.device)
    bits = (bitmask.unsqueeze(2) & weights) != 0
    return bits.reshape(bitmask.shape[0], -1)[:, :columns]


def pack_bitmask(weight: torch.Tensor, fmt: BitmaskFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (N, K) weight -> ``(bitmask, values)``.

    Raises :class:`~compress.errors.FormatError` when a row has more than ``fmt.kept`` nonzeros."""
    codes, _, _ = fmt.quantize(weight)  # the dtype, and the row-count check
    nonzero = codes != 0
    rows = codes.shape[0]
    # each row's nonzero columns first (in column order), then its zeros: a stable sort
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, : fmt.kept]
    values = codes.gather(1, order)
    values = values.masked_fill(~nonzero.gather(1, order), 0)  # padding, and -0.0 -> +0.0
    return pack_bits(nonzero), values.reshape(rows, fmt.kept)


class PackedBitmask(NamedTuple):
    """Bitmask, values and bias (see :mod:`compress.formats.bitmask.spec` for the layout)."""

    bitmask: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None
    fmt: BitmaskFormat
    in_features: int
    # (N, ceil(K/64)) int32: the values of each row before every 64-column block (what a kernel
    # that starts mid-row needs); derived from the bitmask and cached by the module, never stored
    block_offsets: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return int(self.bitmask.shape[0])

    def mask(self) -> torch.Tensor:
        """(N, K) bool: where the weight is nonzero."""
        return unpack_bits(self.bitmask, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight: the reference kernel's and the tests' oracle."""
        mask = self.mask()
        dense = torch.zeros(mask.shape, dtype=dtype, device=self.values.device)
        counts = mask.sum(dim=1)
        # row-major order of the set bits is row-major order of each row's leading values
        leading = torch.arange(self.fmt.kept, device=mask.device) < counts.unsqueeze(1)
        dense[mask] = self.values[leading].to(dtype)
        return dense

    def offsets(self) -> torch.Tensor:
        """(N, ceil(K/64)) int32: stored values of each row before each 64-column block."""
        if self.block_offsets is not None:
            return self.block_offsets
        return block_offsets(self.bitmask)


def block_offsets(bitmask: torch.Tensor) -> torch.Tensor:
    """(N, ceil(K/64)) int32 exclusive prefix counts of set bits per 64-column block."""
    rows, nbytes = bitmask.shape
    padded = torch.zeros(rows, -(-nbytes // 8) * 8, dtype=torch.uint8, device=bitmask.device)
    padded[:, :nbytes] = bitmask
    table = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int32)
    per_block = table.to(bitmask.device)[padded.long()].view(rows, -1, 8).sum(dim=2)
    return (per_block.cumsum(dim=1) - per_block).to(torch.int32)
