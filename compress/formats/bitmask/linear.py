"""The packed bitmask sparse Linear: its buffers are exactly the stored tensors (see
:mod:`compress.formats.bitmask.spec` for their layout)."""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import torch
from torch import nn

from compress.formats.base import KernelDispatch, derived_from, share_buffers
from compress.formats.bitmask import cpu, kernels
from compress.formats.bitmask.packed import PackedBitmask, block_offsets, pack_bitmask
from compress.formats.bitmask.spec import BitmaskFormat
from compress.ir import QuantizedWeight

__all__ = ["BitmaskLinear"]

_BUFFERS = ("bitmask", "values")


class BitmaskLinear(KernelDispatch, nn.Module):
    """Linear layer over the nonzero values of a pruned weight; never holds a dense weight."""

    kernels: ClassVar[ModuleType] = kernels  # the format's kernel table, for KernelDispatch
    decode_rows = cpu.MAX_ROWS

    bitmask: torch.Tensor
    values: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: BitmaskFormat,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        persistent: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        for stored in fmt.stored_tensors(out_features, in_features):
            self.register_buffer(
                stored.name,
                torch.empty(stored.shape, dtype=stored.dtype, device=device),
                persistent=persistent,
            )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @property
    def qweight(self) -> torch.Tensor:  # type: ignore[override]
        """What KernelDispatch reads the device from."""
        return self.values

    @classmethod
    def from_record(cls, linear: nn.Linear, record: QuantizedWeight) -> BitmaskLinear:
        """Pack a pruned Linear's record (its dense weight as the codes) into a new module."""
        fmt = record.fmt
        if not isinstance(fmt, BitmaskFormat):
            raise TypeError(f"{cls.__name__} packs bitmask sparse formats, not {fmt.label()}")
        module = cls(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=record.codes.device,
        )
        bitmask, values = pack_bitmask(record.codes, fmt)
        module.bitmask.copy_(bitmask)
        module.values.copy_(values)
        if linear.bias is not None and module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def share_buffers(self, source: nn.Module) -> None:
        share_buffers(self, source, _BUFFERS)

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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight; for the reference kernel and tests only."""
        return self.packed().dequantize(dtype)
