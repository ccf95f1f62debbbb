"""The packed bitmask sparse Linear: its buffers are exactly the stored tensors (see
:mod:`compress.formats.bitmask.spec` for their layout)."""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import torch

from compress.formats.base import derived_from
from compress.formats.bitmask import cpu, kernels
from compress.formats.bitmask.packed import PackedBitmask, block_offsets, pack_bitmask
from compress.formats.bitmask.spec import BitmaskFormat
from compress.formats.modules import PackedLinear
from compress.ir import QuantizedWeight

__all__ = ["BitmaskLinear"]


class BitmaskLinear(PackedLinear):
    """Linear layer over the nonzero values of a pruned weight; never holds a dense weight."""

    kernels: ClassVar[ModuleType] = kernels  # the format's kernel table, for KernelDispatch
    decode_rows = cpu.MAX_ROWS
    format_type = BitmaskFormat
    format_what = "bitmask sparse formats"

    bitmask: torch.Tensor
    values: torch.Tensor

    @property
    def qweight(self) -> torch.Tensor:  # type: ignore[override]
        """What KernelDispatch reads the device from."""
        return self.values

    def fill(self, record: QuantizedWeight) -> None:
        """The record's codes are the pruned dense weight."""
        bitmask, values = pack_bitmask(record.codes, self.fmt)
        self.bitmask.copy_(bitmask)
        self.values.copy_(values)

    def packed(self) -> PackedBitmask:
        """The stored tensors and the format: what the kernels read."""
        return PackedBitmask(
            self.bitmask, self.values, self.bias, self.fmt, self.in_features, self._offsets()
        )

    def _offsets(self) -> torch.Tensor:
        """Per-block value offsets, kept until ``bitmask`` changes (its storage or version)."""
        return derived_from(
            self, "_offsets_cache", self.bitmask, lambda: block_offsets(self.bitmask)
        )
