"""The stored tensors of one N:M sparse integer weight, as the kernels receive them, and the
packing of dense codes into them."""

from __future__ import annotations

from typing import NamedTuple

import torch

from compress.formats.int.packed import unpack_zeros
from compress.formats.int.spec import dequantize_int
from compress.formats.nm.spec import NMIntFormat, kept_positions, nonzero_codes
from compress.formats.packing import pack_codes, unpack_codes

__all__ = ["PackedNM", "pack_nm"]


def pack_nm(
    codes: torch.Tensor, zeros: torch.Tensor | None, fmt: NMIntFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (N, K) codes (pruned positions at the zero point) -> ``(qweight, qindex)``.

    Raises :class:`ValueError` when a run of ``m`` holds more than ``n`` nonzero codes."""
    positions = kept_positions(nonzero_codes(codes, zeros, fmt), fmt.n, fmt.m)
    kept = codes.gather(1, positions)
    within = positions % fmt.m
    return pack_codes(kept, fmt.bits), pack_codes(within, fmt.index_bits)


class PackedNM(NamedTuple):
    """Kept codes, their positions, the integer format's scales and zeros (see
    :mod:`compress.formats.nm.spec` for the layout)."""

    qweight: torch.Tensor
    qindex: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    bias: torch.Tensor | None
    fmt: NMIntFormat
    in_features: int
    # (N, G) uint8 zero points already unpacked from qzeros (the module keeps them, so that a
    # decode step does not unpack them again for every Linear); None: unpack on demand
    unpacked_zeros: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def kept(self) -> int:
        return self.fmt.kept(self.in_features)

    def kept_codes(self) -> torch.Tensor:
        """(N, kept) uint8 codes."""
        return unpack_codes(self.qweight, self.fmt.bits, self.kept)

    def positions(self) -> torch.Tensor:
        """(N, kept) int64: the input column of each kept code."""
        fmt = self.fmt
        within = unpack_codes(self.qindex, fmt.index_bits, self.kept).to(torch.int64)
        run = torch.arange(self.kept, device=within.device) // fmt.n * fmt.m
        return within + run

    def zeros(self) -> torch.Tensor | None:
        if self.unpacked_zeros is not None:
            return self.unpacked_zeros
        return unpack_zeros(self.qzeros, self.fmt.values, self.out_features, self.in_features)

    def codes(self) -> torch.Tensor:
        """(N, K) uint8 dense codes, the zero point at every pruned position."""
        fmt, zeros = self.fmt, self.zeros()
        if zeros is None:
            dense = torch.full(
                (self.out_features, self.in_features),
                fmt.values.midpoint,
                dtype=torch.uint8,
                device=self.qweight.device,
            )
        else:
            dense = zeros.repeat_interleave(self.in_features // zeros.shape[1], dim=1)
        return dense.scatter(1, self.positions(), self.kept_codes())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight: the reference kernel's and the tests' oracle."""
        return dequantize_int(self.codes(), self.scales, self.zeros(), self.fmt.values, dtype)
