"""The packed FP8 Linear and Embedding: their buffers are exactly the stored tensors.

Stored tensors of a module quantized to ``FP8Format`` with weight shape ``(N, K)`` and scale
blocks ``(bn, bk)`` (``(N, K)`` per-tensor, ``(1, K)`` per-channel, ``(b, b)`` block):

============  ==========================  =======  ========================================
name          shape                       dtype    meaning
============  ==========================  =======  ========================================
``qweight``   (N, K)                      uint8    FP8 bit patterns (E4M3 or E5M2)
``scales``    (ceil(N/bn), ceil(K/bk))    float32  per-block scale
``bias``      (N,)                        model    only if the original Linear had one
                                          dtype
============  ==========================  =======  ========================================

``W[n, k] = fp8(qweight[n, k]) * scales[n // bn, k // bk]``. An embedding stores the same two
tensors for its ``(num_embeddings, embedding_dim)`` table; a tied ``lm_head`` reads them through
:meth:`FP8Linear.share_buffers`.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

import torch
from torch import nn

from compress.formats.base import KernelDispatch, share_buffers
from compress.formats.fp8 import cpu, kernels
from compress.formats.fp8.packed import PackedFP8
from compress.formats.fp8.spec import FP8Format
from compress.ir import QuantizedWeight
from compress.utils.modules import embed_scale_of

__all__ = ["FP8Embedding", "FP8Linear"]

_BUFFERS = ("qweight", "scales")


def _fp8_format(cls: type, record: QuantizedWeight) -> FP8Format:
    if not isinstance(record.fmt, FP8Format):
        raise TypeError(f"{cls.__name__} packs fp8 formats, not {record.fmt.label()}")
    return record.fmt


class FP8Linear(KernelDispatch, nn.Module):
    """Linear layer over FP8 codes and fp32 block scales; never holds a dense weight."""

    kernels: ClassVar[ModuleType] = kernels  # the format's kernel table, for KernelDispatch
    decode_rows = cpu.MAX_ROWS

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: FP8Format,
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
        self.register_buffer(
            "qweight",
            torch.empty(out_features, in_features, dtype=torch.uint8, device=device),
            persistent=persistent,
        )
        self.register_buffer(
            "scales",
            torch.empty(
                fmt.scale_shape(out_features, in_features), dtype=fmt.scale_dtype, device=device
            ),
            persistent=persistent,
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_record(cls, linear: nn.Linear, record: QuantizedWeight) -> FP8Linear:
        """Pack a quantized Linear's IR record into a new module (same device as the codes)."""
        fmt = _fp8_format(cls, record)
        module = cls(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=record.codes.device,
        )
        module.qweight.copy_(record.codes)
        module.scales.copy_(record.scales)
        if linear.bias is not None and module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def share_buffers(self, source: nn.Module) -> None:
        """Use ``source``'s stored tensors (same format and shape) as this module's: a tied
        ``lm_head`` and the embedding it is tied to hold one copy of the codes."""
        share_buffers(self, source, _BUFFERS)

    def packed(self) -> PackedFP8:
        """The stored tensors and the format: what the kernels read."""
        return PackedFP8(self.qweight, self.scales, self.bias, self.fmt)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight; for the reference kernel and tests only."""
        return self.packed().dequantize(dtype)


class FP8Embedding(nn.Module):
    """Embedding over FP8 codes; a lookup dequantizes only the rows it gathers."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        fmt: FP8Format,
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
        self.register_buffer(
            "qweight",
            torch.empty(num_embeddings, embedding_dim, dtype=torch.uint8, device=device),
        )
        shape = fmt.scale_shape(num_embeddings, embedding_dim)
        self.register_buffer("scales", torch.empty(shape, dtype=fmt.scale_dtype, device=device))

    @classmethod
    def from_record(cls, embedding: nn.Embedding, record: QuantizedWeight) -> FP8Embedding:
        """Pack an embedding's IR record into a new module (same device as the codes)."""
        fmt = _fp8_format(cls, record)
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            fmt,
            dtype=embedding.weight.dtype,
            device=record.codes.device,
            embed_scale=embed_scale_of(embedding),
        )
        module.qweight.copy_(record.codes)
        module.scales.copy_(record.scales)
        return module

    def packed(self) -> PackedFP8:
        return PackedFP8(self.qweight, self.scales, None, self.fmt)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (V, D) table; for tests and the reference path only."""
        return self.packed().dequantize(dtype or self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # ids (...) -> vectors (..., D): only the gathered rows are decoded and scaled
        flat = input_ids.reshape(-1)
        values = self.qweight.index_select(0, flat).view(self.fmt.torch_dtype).to(torch.float32)
        bn, bk = self.fmt.block_shape(self.num_embeddings, self.embedding_dim)
        rows_of = torch.div(flat, bn, rounding_mode="floor")
        scales = self.fmt.scale_values(self.scales.index_select(0, rows_of))
        if scales.shape[1] > 1:  # (M, K/bk) -> (M, K)
            scales = scales.repeat_interleave(bk, dim=1)[:, : self.embedding_dim]
        rows = (values * scales).to(self.dtype)
        if self.embed_scale is not None:
            rows = rows * torch.tensor(self.embed_scale, dtype=self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.fmt.label()}"
