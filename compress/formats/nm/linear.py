"""The packed N:M sparse integer Linear: its buffers are exactly the stored tensors (see
:mod:`compress.formats.nm.spec` for their layout)."""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import torch

from compress.formats.base import derived_from
from compress.formats.int.packed import unpack_zeros
from compress.formats.modules import PackedLinear
from compress.formats.nm import cpu, kernels
from compress.formats.nm.packed import PackedNM, pack_nm
from compress.formats.nm.spec import NMIntFormat
from compress.formats.packing import pack_codes
from compress.ir import QuantizedWeight

__all__ = ["NMLinear"]


class NMLinear(PackedLinear):
    """Linear layer over the kept codes of an N:M sparse weight; never holds a dense weight."""

    kernels: ClassVar[ModuleType] = kernels  # the format's kernel table, for KernelDispatch
    decode_rows = cpu.MAX_ROWS
    format_type = NMIntFormat
    format_what = "N:M sparse integer formats"
    optional_buffers = ("qzeros",)  # symmetric formats store none

    qweight: torch.Tensor
    qindex: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None

    def fill(self, record: QuantizedWeight) -> None:
        """Raises :class:`ValueError` when the record's codes are not N:M sparse."""
        qweight, qindex = pack_nm(record.codes, record.zeros, self.fmt)
        self.qweight.copy_(qweight)
        self.qindex.copy_(qindex)
        self.scales.copy_(record.scales)
        if record.zeros is not None and self.qzeros is not None:
            self.qzeros.copy_(pack_codes(record.zeros.reshape(1, -1), self.fmt.bits)[0])

    def packed(self) -> PackedNM:
        """The stored tensors and the format: what the kernels read."""
        return PackedNM(
            self.qweight,
            self.qindex,
            self.scales,
            self.qzeros,
            self.bias,
            self.fmt,
            self.in_features,
            self._unpacked_zeros(),
        )

    def _unpacked_zeros(self) -> torch.Tensor | None:
        """The zero points unpacked, kept until ``qzeros`` changes (its storage or version)."""
        qzeros = self.qzeros
        if qzeros is None:
            return None

        def unpack() -> torch.Tensor:
            zeros = unpack_zeros(qzeros, self.fmt.values, self.out_features, self.in_features)
            assert zeros is not None  # qzeros is stored
            return zeros.contiguous()

        return derived_from(self, "_zeros_cache", qzeros, unpack)
