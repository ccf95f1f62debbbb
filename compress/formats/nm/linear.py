"""The packed N:M sparse integer Linear: its buffers are exactly the stored tensors (see
:mod:`compress.formats.nm.spec` for their layout)."""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import torch
from torch import nn

from compress.formats.base import KernelDispatch, derived_from, share_buffers
from compress.formats.int.packed import unpack_zeros
from compress.formats.nm import cpu, kernels
from compress.formats.nm.packed import PackedNM, pack_nm
from compress.formats.nm.spec import NMIntFormat
from compress.formats.packing import pack_codes
from compress.ir import QuantizedWeight

__all__ = ["NMLinear"]

_BUFFERS = ("qweight", "qindex", "scales", "qzeros")


class NMLinear(KernelDispatch, nn.Module):
    """Linear layer over the kept codes of an N:M sparse weight; never holds a dense weight."""

    kernels: ClassVar[ModuleType] = kernels  # the format's kernel table, for KernelDispatch
    decode_rows = cpu.MAX_ROWS

    qweight: torch.Tensor
    qindex: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: NMIntFormat,
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
        if fmt.symmetric:
            self.qzeros = None
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_record(cls, linear: nn.Linear, record: QuantizedWeight) -> NMLinear:
        """Pack a quantized Linear's IR record (dense codes, N:M sparse) into a new module.

        Raises :class:`ValueError` when the codes are not N:M sparse."""
        fmt = record.fmt
        if not isinstance(fmt, NMIntFormat):
            raise TypeError(f"{cls.__name__} packs N:M sparse integer formats, not {fmt.label()}")
        module = cls(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=record.codes.device,
        )
        qweight, qindex = pack_nm(record.codes, record.zeros, fmt)
        module.qweight.copy_(qweight)
        module.qindex.copy_(qindex)
        module.scales.copy_(record.scales)
        if record.zeros is not None and module.qzeros is not None:
            module.qzeros.copy_(pack_codes(record.zeros.reshape(1, -1), fmt.bits)[0])
        if linear.bias is not None and module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def share_buffers(self, source: nn.Module) -> None:
        share_buffers(self, source, _BUFFERS)

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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight; for the reference kernel and tests only."""
        return self.packed().dequantize(dtype)
