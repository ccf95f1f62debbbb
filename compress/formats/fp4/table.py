"""What the table formats (4-bit NF4, FP4, MXFP4, NVFP4; MXFP6) share at run time: the packed
weight their kernels receive, and their packed Linear and Embedding.

A table format stores a ``code_bits``-bit code per weight, an index into the format's value
table, packed along each row (:func:`compress.formats.packing.pack_codes`), and a scale per block
of ``block`` columns (NVFP4 also a tensor scale). Kernels take this and the activations, never
the module that holds the buffers, so they can be tested and benchmarked without a module
around them. Each format's package subclasses :class:`TableLinear` and :class:`TableEmbedding`
with its kernels and format class.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from compress.errors import FormatError
from compress.formats.fp4.spec import TableFormat, expand_blocks
from compress.formats.modules import PackedEmbedding, PackedLinear
from compress.formats.packing import pack_codes
from compress.ir import QuantizedWeight

__all__ = ["PackedTable", "TableEmbedding", "TableLinear"]


class PackedTable(NamedTuple):
    """``W[n, k] = table[code[n, k]] * scale[n, k // B] (* tensor_scale)``."""

    qweight: torch.Tensor  # (N, ceil(code_bits * K / 8)) uint8
    scales: torch.Tensor  # (N, ceil(K/B)) float32 or uint8, as the variant stores them
    tensor_scale: torch.Tensor | None  # (1,) float32, nvfp4 only
    bias: torch.Tensor | None
    fmt: TableFormat
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight: the reference kernel's and the tests' oracle."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` of the dense weight, ``(stop - start, K)``: the same fp32
        products as the format's ``dequantize``, then ``dtype``."""
        fmt, columns = self.fmt, self.in_features
        values = _decode_values(self.qweight[start:stop], fmt)  # (rows, >= K) float32
        rows = values.shape[0]
        effective = fmt.effective_scales(self.scales[start:stop], self.tensor_scale)
        if values.shape[1] == columns and columns % fmt.block == 0:  # no expanded scales
            blocks = values.view(rows, -1, fmt.block) * effective.unsqueeze(-1)
            return blocks.view(rows, columns).to(dtype)
        return (values[:, :columns] * expand_blocks(effective, fmt.block, columns)).to(dtype)


def _decode_values(packed: torch.Tensor, fmt: TableFormat) -> torch.Tensor:
    """(rows, bytes) packed codes -> (rows, >= K) float32 table values, two codes per gather of
    a pair table (2.5x faster on one core than unpacking the codes and gathering them one by one:
    ``scripts/bench_fp4.py --speed``). 4-bit codes: a byte is a pair. 6-bit codes: three bytes
    hold four, each 12-bit half of the 24-bit word a pair."""
    rows, width = packed.shape
    if fmt.code_bits == 4:
        index = packed.reshape(-1).to(torch.int32)
    elif fmt.code_bits == 6:
        pad = -width % 3
        if pad:
            packed = F.pad(packed, (0, pad))
        triples = packed.view(rows, -1, 3).to(torch.int32)
        word = triples[..., 0] | (triples[..., 1] << 8) | (triples[..., 2] << 16)
        index = torch.stack((word & 0xFFF, word >> 12), dim=-1).reshape(-1)
    else:
        raise FormatError(f"{fmt.label()}: no packed decoding of {fmt.code_bits}-bit codes")
    return _pair_table(fmt, packed.device).index_select(0, index).view(rows, -1)


_PAIRS: dict[tuple[str, str, str], torch.Tensor] = {}


def _pair_table(fmt: TableFormat, device: torch.device) -> torch.Tensor:
    """(2**(2 * code_bits), 2) float32: two packed codes -> (low code's value, high code's)."""
    key = (type(fmt).__name__, fmt.variant, str(device))
    if key not in _PAIRS:
        bits, table = fmt.code_bits, fmt.table
        index = torch.arange(1 << (2 * bits), device="cpu")  # a meta-device load may be active
        pairs = torch.stack((table[index & ((1 << bits) - 1)], table[index >> bits]), dim=-1)
        _PAIRS[key] = pairs.to(device)
    return _PAIRS[key]


def _fill(module: TableLinear | TableEmbedding, record: QuantizedWeight) -> None:
    module.qweight.copy_(pack_codes(record.codes, module.fmt.code_bits))
    module.scales.copy_(record.scales)
    if module.tensor_scale is not None and record.zeros is not None:
        module.tensor_scale.copy_(record.zeros.reshape(1))  # nvfp4 keeps it in the zeros slot


class TableLinear(PackedLinear):
    """Linear layer over packed table codes and block scales; never holds a dense weight."""

    optional_buffers = ("tensor_scale",)  # only nvfp4 stores one

    qweight: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None

    def fill(self, record: QuantizedWeight) -> None:
        _fill(self, record)

    def packed(self) -> PackedTable:
        """The stored tensors and the format: what the kernels read."""
        return PackedTable(
            self.qweight, self.scales, self.tensor_scale, self.bias, self.fmt, self.in_features
        )


class TableEmbedding(PackedEmbedding):
    """Embedding over packed table codes; a lookup decodes only the rows it gathers."""

    optional_buffers = ("tensor_scale",)

    qweight: torch.Tensor
    scales: torch.Tensor
    tensor_scale: torch.Tensor | None

    def fill(self, record: QuantizedWeight) -> None:
        _fill(self, record)

    def packed(self) -> PackedTable:
        return PackedTable(
            self.qweight, self.scales, self.tensor_scale, None, self.fmt, self.embedding_dim
        )

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return PackedTable(
            self.qweight.index_select(0, ids),
            self.scales.index_select(0, ids),
            self.tensor_scale,
            None,
            self.fmt,
            self.embedding_dim,
        ).dequantize(self.dtype)
