"""The packed integer Linear module: its buffers are exactly the stored tensors.

Stored tensors of a module quantized to ``IntFormat(bits=b, group_size=g, symmetric=s)`` with
weight shape ``(N, K)`` and ``G = K // g`` groups (``G = 1`` per-channel):

============  ======================  ===========  ==========================================
name          shape                   dtype        meaning
============  ======================  ===========  ==========================================
``qweight``   (N, ceil(K*b/8))        uint8        codes, each row a little-endian bit stream
``scales``    (N, G)                  scale dtype  per-group scale
``qzeros``    (ceil(N*G*b/8),)        uint8        per-group zero points, row-major, packed
                                                   as one bit stream (no per-row padding);
                                                   absent when symmetric (zero = 2**(b-1))
``bias``      (N,)                    model dtype  only if the original Linear had one
============  ======================  ===========  ==========================================

``W[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g]``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from compress.formats.base import share_buffers
from compress.formats.int import kernels
from compress.formats.int.packed import PackedInt, unpack_zeros
from compress.formats.int.spec import IntFormat
from compress.formats.packing import pack_codes, packed_row_bytes, unpack_codes
from compress.ir import QuantizedWeight

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """Linear layer over densely packed integer codes; never holds a dense weight."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: IntFormat,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        persistent: bool = True,
    ) -> None:
        """``persistent=False``: the packed buffers are another module's (a tied ``lm_head``
        reads the embedding's codes, see :meth:`share_buffers`), so they are not in this
        module's state dict and a loader does not look for them."""
        super().__init__()
        self._decode_kernels: dict[tuple[int, torch.dtype, str, str | None, str | None], str] = {}
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        groups = fmt.groups(in_features)
        row_bytes = packed_row_bytes(in_features, fmt.bits)
        self.register_buffer(
            "qweight",
            torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device),
            persistent=persistent,
        )
        self.register_buffer(
            "scales",
            torch.empty(out_features, groups, dtype=fmt.torch_scale_dtype, device=device),
            persistent=persistent,
        )
        if fmt.symmetric:
            self.qzeros = None
        else:
            zero_bytes = packed_row_bytes(out_features * groups, fmt.bits)
            self.register_buffer(
                "qzeros",
                torch.empty(zero_bytes, dtype=torch.uint8, device=device),
                persistent=persistent,
            )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_record(cls, linear: nn.Linear, record: QuantizedWeight) -> QuantLinear:
        """Pack a quantized Linear's IR record into a new module (same device as the codes)."""
        fmt = record.fmt
        if not isinstance(fmt, IntFormat):
            raise TypeError(f"{cls.__name__} packs integer formats, not {fmt.label()}")
        module = cls(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=record.codes.device,
        )
        module.qweight.copy_(pack_codes(record.codes, fmt.bits))
        module.scales.copy_(record.scales)
        if record.zeros is not None and module.qzeros is not None:
            module.qzeros.copy_(pack_codes(record.zeros.reshape(1, -1), fmt.bits)[0])
        if linear.bias is not None and module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def share_buffers(self, source: nn.Module) -> None:
        """Use ``source``'s packed tensors (same format and shape) as this module's: a tied
        ``lm_head`` and the embedding it is tied to hold one copy of the codes."""
        share_buffers(self, source, ("qweight", "scales", "qzeros"))

    def codes(self) -> torch.Tensor:
        """(N, K) uint8 codes, unpacked."""
        return unpack_codes(self.qweight, self.fmt.bits, self.in_features)

    def zeros(self) -> torch.Tensor | None:
        """(N, G) uint8 zero points, or None for symmetric formats."""
        return unpack_zeros(self.qzeros, self.fmt, self.out_features, self.in_features)

    def packed(self) -> PackedInt:
        """The stored tensors and the format: what the kernels read."""
        return PackedInt(
            self.qweight, self.scales, self.qzeros, self.bias, self.fmt, self.in_features
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight; for the reference kernel and tests only."""
        return self.packed().dequantize(dtype)

    @property
    def kernel(self) -> str:
        """The kernel the next CPU forward in this module's activation dtype will use."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return self._select(rows=1, dtype=dtype)

    def _select(self, *, rows: int, dtype: torch.dtype) -> str:
        device = self.qweight.device.type
        return kernels.select(self.fmt, self.in_features, rows=rows, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        # Decode calls a module once per token, prefill once per layer and prompt: the choice
        # is remembered per (rows, dtype, device, COMPRESS_KERNEL, COMPRESS_CPU_ISA: the
        # crossover depends on the build), which saves tens of microseconds a call (a SmolLM2
        # prompt makes 210 calls). Above GEMV_MAX_ROWS the choice no longer depends on rows.
        env = os.environ
        device = x.device.type
        key = (
            min(rows, kernels.GEMV_MAX_ROWS + 1),
            x.dtype,
            device,
            env.get("COMPRESS_KERNEL"),
            env.get("COMPRESS_CPU_ISA"),
        )
        kernel = self._decode_kernels.get(key)
        if kernel is None:
            kernel = self._decode_kernels[key] = self._select(rows=rows, dtype=x.dtype)
            kernels.log_choice(kernel, self.fmt)
        return kernels.KERNELS[kernel](x, self.packed())

    def extra_repr(self) -> str:
        fmt = self.fmt
        group = fmt.group_size or "channel"
        kind = "sym" if fmt.symmetric else "asym"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int{fmt.bits} g{group} {kind}, bias={self.bias is not None}"
        )
