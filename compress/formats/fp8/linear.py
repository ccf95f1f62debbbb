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

from compress.formats.fp8 import cpu, kernels
from compress.formats.fp8.packed import PackedFP8
from compress.formats.fp8.spec import FP8Format
from compress.formats.modules import PackedEmbedding, PackedLinear
from compress.ir import QuantizedWeight

__all__ = ["FP8Embedding", "FP8Linear"]


def _fill(module: FP8Linear | FP8Embedding, record: QuantizedWeight) -> None:
    module.qweight.copy_(record.codes)
    module.scales.copy_(record.scales)


class FP8Linear(PackedLinear):
    """Linear layer over FP8 codes and fp32 block scales; never holds a dense weight."""

    kernels: ClassVar[ModuleType] = kernels  # the format's kernel table, for KernelDispatch
    decode_rows = cpu.MAX_ROWS
    format_type = FP8Format
    format_what = "fp8 formats"

    qweight: torch.Tensor
    scales: torch.Tensor

    def fill(self, record: QuantizedWeight) -> None:
        _fill(self, record)

    def packed(self) -> PackedFP8:
        """The stored tensors and the format: what the kernels read."""
        return PackedFP8(self.qweight, self.scales, self.bias, self.fmt)


class FP8Embedding(PackedEmbedding):
    """Embedding over FP8 codes; a lookup dequantizes only the rows it gathers."""

    format_type = FP8Format
    format_what = "fp8 formats"

    qweight: torch.Tensor
    scales: torch.Tensor

    def fill(self, record: QuantizedWeight) -> None:
        _fill(self, record)

    def packed(self) -> PackedFP8:
        return PackedFP8(self.qweight, self.scales, None, self.fmt)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        values = self.qweight.index_select(0, ids).view(self.fmt.torch_dtype).to(torch.float32)
        bn, bk = self.fmt.block_shape(self.num_embeddings, self.embedding_dim)
        rows_of = torch.div(ids, bn, rounding_mode="floor")
        scales = self.fmt.scale_values(self.scales.index_select(0, rows_of))
        if scales.shape[1] > 1:  # (M, K/bk) -> (M, K)
            scales = scales.repeat_interleave(bk, dim=1)[:, : self.embedding_dim]
        return (values * scales).to(self.dtype)
