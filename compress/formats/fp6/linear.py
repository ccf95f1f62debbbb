"""The packed MXFP6 Linear and Embedding: their buffers are exactly the stored tensors.

Stored tensors of a module with weight ``(N, K)`` (see :mod:`compress.formats.fp6.spec`):

============  =================  ===========  ================================================
name          shape              dtype        meaning
============  =================  ===========  ================================================
``qweight``   (N, ceil(6K/8))    uint8        6-bit codes, a little-endian bit stream a row
``scales``    (N, ceil(K/32))    uint8        per-block E8M0 biased exponent
``bias``      (N,)               model dtype  only if the original Linear had one
============  =================  ===========  ================================================
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import torch
from torch import nn

from compress.formats.base import KernelDispatch, share_buffers
from compress.formats.fp6 import cpu, kernels
from compress.formats.fp6.packed import PackedFP6, pack_fp6_codes
from compress.formats.fp6.spec import FP6Format
from compress.formats.packing import packed_row_bytes
from compress.ir import QuantizedWeight
from compress.utils.modules import embed_scale_of

__all__ = ["FP6Embedding", "FP6Linear"]

_BUFFERS = ("qweight", "scales")


def _fp6_format(cls: type, record: QuantizedWeight) -> FP6Format:
    if not isinstance(record.fmt, FP6Format):
        raise TypeError(f"{cls.__name__} packs MXFP6 formats, not {record.fmt.label()}")
    return record.fmt


def _register(
    module: nn.Module,
    fmt: FP6Format,
    rows: int,
    columns: int,
    device: torch.device | str | None,
    persistent: bool,
) -> None:
    module.register_buffer(
        "qweight",
        torch.empty(rows, packed_row_bytes(columns, 6), dtype=torch.uint8, device=device),
        persistent=persistent,
    )
    module.register_buffer(
        "scales",
        torch.empty(fmt.scale_shape(rows, columns), dtype=torch.uint8, device=device),
        persistent=persistent,
    )


def _fill(module: FP6Linear | FP6Embedding, record: QuantizedWeight) -> None:
    module.qweight.copy_(pack_fp6_codes(record.codes))
    module.scales.copy_(record.scales)


class FP6Linear(KernelDispatch, nn.Module):
    """Linear layer over packed MXFP6 codes and E8M0 block scales; never holds a dense weight."""

    kernels: ClassVar[ModuleType] = kernels  # the format's kernel table, for KernelDispatch
    decode_rows = cpu.MAX_ROWS

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: FP6Format,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        persistent: bool = True,
    ) -> None:
        """``persistent=False``: the buffers are another module's (a tied ``lm_head`` reads the
        embedding's codes, see :meth:`share_buffers`), so they are not in the state dict."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fmt = fmt
        fmt.check_width(in_features)
        _register(self, fmt, out_features, in_features, device, persistent)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_record(cls, linear: nn.Linear, record: QuantizedWeight) -> FP6Linear:
        """Pack a quantized Linear's IR record into a new module (same device as the codes)."""
        fmt = _fp6_format(cls, record)
        module = cls(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=record.codes.device,
        )
        _fill(module, record)
        if linear.bias is not None and module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def share_buffers(self, source: nn.Module) -> None:
        """Use ``source``'s stored tensors (same format and shape) as this module's."""
        share_buffers(self, source, _BUFFERS)

    def packed(self) -> PackedFP6:
        """The stored tensors and the format: what the kernels read."""
        return PackedFP6(self.qweight, self.scales, self.bias, self.fmt, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight; for the reference kernel and tests only."""
        return self.packed().dequantize(dtype)


class FP6Embedding(nn.Module):
    """Embedding over packed MXFP6 codes; a lookup decodes only the rows it gathers."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        fmt: FP6Format,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        embed_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.fmt = fmt
        self.dtype = dtype  # of the looked-up vectors: the model's activations
        self.embed_scale = embed_scale  # Gemma scales looked-up rows inside its embedding
        fmt.check_width(embedding_dim)
        _register(self, fmt, num_embeddings, embedding_dim, device, True)

    @classmethod
    def from_record(cls, embedding: nn.Embedding, record: QuantizedWeight) -> FP6Embedding:
        """Pack an embedding's IR record into a new module (same device as the codes)."""
        fmt = _fp6_format(cls, record)
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            fmt,
            dtype=embedding.weight.dtype,
            device=record.codes.device,
            embed_scale=embed_scale_of(embedding),
        )
        _fill(module, record)
        return module

    def packed(self) -> PackedFP6:
        return PackedFP6(self.qweight, self.scales, None, self.fmt, self.embedding_dim)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (V, D) table; for tests and the reference path only."""
        return self.packed().dequantize(dtype or self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # ids (...) -> vectors (..., D): only the gathered rows are decoded and scaled
        flat = input_ids.reshape(-1)
        rows = PackedFP6(
            self.qweight.index_select(0, flat),
            self.scales.index_select(0, flat),
            None,
            self.fmt,
            self.embedding_dim,
        ).dequantize(self.dtype)
        if self.embed_scale is not None:
            rows = rows * torch.tensor(self.embed_scale, dtype=self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.fmt.label()}"
