"""The packed Linear and Embedding that the float and sparse formats build on.

Their buffers are exactly the tensors the format declares (:meth:`Format.stored_tensors`), so a
state dict is the export's tensors and nothing else. What differs between formats is how an IR
record fills those buffers (``fill``), the packed weight the kernels read (``packed``) and, for
an embedding, how a lookup decodes the rows it gathers (``lookup``); the rest (construction,
``from_record``, the bias, tied ``lm_head`` buffer sharing, ``dequantize``) is here once.
A ``record`` is an IR :class:`~compress.ir.QuantizedWeight`, typed ``Any`` here: the IR is a
layer above the formats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Self

import torch
from torch import nn

from compress.formats.base import (
    Format,
    FormatRuntime,
    KernelDispatch,
    register_runtime,
    share_buffers,
)
from compress.utils.modules import embed_scale_of

__all__ = ["PackedEmbedding", "PackedLinear", "register_packed_runtime"]


def _register_stored(
    module: nn.Module,
    fmt: Format,
    rows: int,
    columns: int,
    device: torch.device | str | None,
    persistent: bool,
    optional: tuple[str, ...],
) -> tuple[str, ...]:
    """Register an empty buffer for each tensor ``fmt`` stores for a ``(rows, columns)`` weight,
    ``None`` for each ``optional`` one it does not store; the names, for buffer sharing."""
    stored = fmt.stored_tensors(rows, columns)
    for tensor in stored:
        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        module.register_buffer(tensor.name, empty, persistent=persistent)
    names = tuple(t.name for t in stored)
    for name in optional:
        if name not in names:
            module.register_buffer(name, None, persistent=persistent)
    return (*names, *(n for n in optional if n not in names))


def _checked_format(cls: type, record: Any, format_type: type, what: str) -> Any:
    """``record.fmt``, or a TypeError when a record of another format reached this module."""
    if not isinstance(record.fmt, format_type):
        raise TypeError(f"{cls.__name__} packs {what}, not {record.fmt.label()}")
    return record.fmt


class PackedLinear(KernelDispatch, nn.Module):
    """A Linear over a format's stored tensors; never holds a dense weight.

    Subclasses set ``kernels`` and ``decode_rows`` (for :class:`KernelDispatch`),
    ``format_type`` and ``format_what`` (the format class they pack and its name in errors),
    ``optional_buffers`` (names some variants of the format do not store: ``None`` there), and
    implement ``fill`` and ``packed``."""

    format_type: ClassVar[type]
    format_what: ClassVar[str]
    optional_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fmt: Any,
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
        self._stored_names = _register_stored(
            self, fmt, out_features, in_features, device, persistent, self.optional_buffers
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_record(cls, linear: nn.Linear, record: Any) -> Self:
        """Pack a Linear's IR record into a new module (same device as the codes)."""
        fmt = _checked_format(cls, record, cls.format_type, cls.format_what)
        module = cls(
            linear.in_features,
            linear.out_features,
            fmt,
            bias=linear.bias is not None,
            dtype=linear.weight.dtype,
            device=record.codes.device,
        )
        module.fill(record)
        if linear.bias is not None and module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def fill(self, record: Any) -> None:
        """Copy a record's codes, scales (and whatever else the format stores) into the
        buffers, packed as the format lays them out."""
        raise NotImplementedError

    def share_buffers(self, source: nn.Module) -> None:
        """Use ``source``'s stored tensors (same format and shape) as this module's: a tied
        ``lm_head`` and the embedding it is tied to hold one copy of the codes."""
        share_buffers(self, source, self._stored_names)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight; for the reference kernel and tests only."""
        result: torch.Tensor = self.packed().dequantize(dtype)
        return result


class PackedEmbedding(nn.Module):
    """An Embedding over a format's stored tensors; a lookup decodes only the rows it gathers.

    Subclasses set ``format_type``, ``format_what`` and ``optional_buffers`` as
    :class:`PackedLinear`'s do, and implement ``fill``, ``packed`` and ``lookup``."""

    format_type: ClassVar[type]
    format_what: ClassVar[str]
    optional_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        fmt: Any,
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
        _register_stored(
            self, fmt, num_embeddings, embedding_dim, device, True, self.optional_buffers
        )

    @classmethod
    def from_record(cls, embedding: nn.Embedding, record: Any) -> Self:
        """Pack an embedding's IR record into a new module (same device as the codes)."""
        fmt = _checked_format(cls, record, cls.format_type, cls.format_what)
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            fmt,
            dtype=embedding.weight.dtype,
            device=record.codes.device,
            embed_scale=embed_scale_of(embedding),
        )
        module.fill(record)
        return module

    def fill(self, record: Any) -> None:
        """As :meth:`PackedLinear.fill`."""
        raise NotImplementedError

    def packed(self) -> Any:
        """The stored tensors and the format, as the format's kernels take them."""
        raise NotImplementedError

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (1-D) of the table, decoded to :attr:`dtype`: ``(len(ids), D)``."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (V, D) table; for tests and the reference path only."""
        result: torch.Tensor = self.packed().dequantize(dtype or self.dtype)
        return result

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.lookup(input_ids.reshape(-1))
        if self.embed_scale is not None:
            rows = rows * torch.tensor(self.embed_scale, dtype=self.dtype)
        return rows.view(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.fmt.label()}"


def register_packed_runtime(
    kind: str,
    linear: type[PackedLinear],
    embedding: type[PackedEmbedding] | None,
    *,
    describe: Callable[[Any, int], str],
    prepare: Callable[[], object],
) -> FormatRuntime:
    """Register (and return) the runtime of a format whose modules are these classes."""

    def new_linear(fmt: Any, in_features: int, out_features: int, **options: Any) -> nn.Module:
        return linear(in_features, out_features, fmt, **options)

    def new_embedding(fmt: Any, num_embeddings: int, dim: int, **options: Any) -> nn.Module:
        assert embedding is not None
        return embedding(num_embeddings, dim, fmt, **options)

    runtime = FormatRuntime(
        linear=new_linear,
        linear_from_record=linear.from_record,
        embedding=new_embedding if embedding is not None else None,
        embedding_from_record=embedding.from_record if embedding is not None else None,
        describe_kernels=describe,
        prepare=prepare,
    )
    register_runtime(kind, runtime)
    return runtime
