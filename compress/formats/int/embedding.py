"""The packed integer embedding: a lookup that dequantizes only the rows it gathers.

Stored tensors are those of :class:`~compress.formats.int.linear.QuantLinear` for a weight of shape
``(num_embeddings, embedding_dim)`` (one row per token, groups along the embedding dimension):

============  ======================  ===========  ==========================================
name          shape                   dtype        meaning
============  ======================  ===========  ==========================================
``qweight``   (V, ceil(D*b/8))        uint8        codes, each row a little-endian bit stream
``scales``    (V, G)                  scale dtype  per-group scale
``qzeros``    (ceil(V*G*b/8),)        uint8        zero points, one packed stream; absent when
                                                   symmetric
============  ======================  ===========  ==========================================

When the model ties its output projection to the embedding (``lm_head.weight is
embed_tokens.weight``), the export stores these tensors once; the loader gives ``lm_head`` a
:class:`QuantLinear` whose buffers are these same tensors (:meth:`QuantLinear.share_buffers`),
so the tie survives on disk and in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.formats.int.spec import IntFormat, dequantize_int
from compress.formats.packing import pack_codes, packed_row_bytes, unpack_codes
from compress.ir import QuantizedWeight
from compress.utils.modules import embed_scale_of

__all__ = ["QuantEmbedding"]


class QuantEmbedding(nn.Module):
    """Embedding over densely packed integer codes; a lookup never builds the dense table."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        fmt: IntFormat,
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
        # Gemma multiplies looked-up rows by sqrt(hidden) inside its embedding module
        self.embed_scale = embed_scale
        groups = fmt.groups(embedding_dim)
        row_bytes = packed_row_bytes(embedding_dim, fmt.bits)
        self.register_buffer(
            "qweight", torch.empty(num_embeddings, row_bytes, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales",
            torch.empty(num_embeddings, groups, dtype=fmt.torch_scale_dtype, device=device),
        )
        if fmt.symmetric:
            self.qzeros = None
        else:
            zero_bytes = packed_row_bytes(num_embeddings * groups, fmt.bits)
            self.register_buffer(
                "qzeros", torch.empty(zero_bytes, dtype=torch.uint8, device=device)
            )
        self._zeros_cache: torch.Tensor | None = None

    @classmethod
    def from_record(cls, embedding: nn.Embedding, record: QuantizedWeight) -> QuantEmbedding:
        """Pack an embedding's IR record into a new module (same device as the codes)."""
        fmt = record.fmt
        if not isinstance(fmt, IntFormat):
            raise TypeError(f"{cls.__name__} packs integer formats, not {fmt.label()}")
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            fmt,
            dtype=embedding.weight.dtype,
            device=record.codes.device,
            embed_scale=embed_scale_of(embedding),
        )
        module.qweight.copy_(pack_codes(record.codes, fmt.bits))
        module.scales.copy_(record.scales)
        if record.zeros is not None and module.qzeros is not None:
            module.qzeros.copy_(pack_codes(record.zeros.reshape(1, -1), fmt.bits)[0])
        return module

    def _zeros(self) -> torch.Tensor | None:
        """(V, G) uint8 zero points, unpacked once (they are a few hundred KB)."""
        if self.qzeros is None:
            return None
        cached = self._zeros_cache
        if cached is None or cached.device != self.qzeros.device:
            groups = self.fmt.groups(self.embedding_dim)
            count = self.num_embeddings * groups
            flat = unpack_codes(self.qzeros.unsqueeze(0), self.fmt.bits, count)
            cached = self._zeros_cache = flat.view(self.num_embeddings, groups)
        return cached

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (V, D) table; for tests and the reference path only."""
        codes = unpack_codes(self.qweight, self.fmt.bits, self.embedding_dim)
        return dequantize_int(codes, self.scales, self._zeros(), self.fmt, dtype or self.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # ids (...) -> vectors (..., D): only the gathered rows are unpacked and scaled
        flat = input_ids.reshape(-1)
        codes = unpack_codes(self.qweight.index_select(0, flat), self.fmt.bits, self.embedding_dim)
        zeros = self._zeros()
        rows = dequantize_int(
            codes,
            self.scales.index_select(0, flat),
            None if zeros is None else zeros.index_select(0, flat),
            self.fmt,
            self.dtype,
        )
        if self.embed_scale is not None:
            rows = rows * torch.tensor(self.embed_scale, dtype=self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        fmt = self.fmt
        group = fmt.group_size or "channel"
        kind = "sym" if fmt.symmetric else "asym"
        return f"{self.num_embeddings}, {self.embedding_dim}, int{fmt.bits} g{group} {kind}"
