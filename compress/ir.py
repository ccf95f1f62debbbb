"""What passes leave behind for export.

A quantization pass replaces nothing structurally: it sets the module's dense weight to the
dequantized values (so the in-memory model computes exactly what the exported one will) and
attaches a :class:`QuantizedWeight` describing the codes. Export reads only these records; it
never imports an algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.formats import IntFormat, dequantize_int

__all__ = [
    "QuantizedWeight",
    "clear_quantized",
    "get_quantized",
    "quantized_modules",
    "set_quantized",
]

_ATTR = "compress_quantized"


@dataclass
class QuantizedWeight:
    """Integer codes of one Linear (or Embedding) weight.

    codes:  (out_features, in_features) uint8, values in [0, 2**bits - 1]; an Embedding's
            (num_embeddings, embedding_dim) weight is laid out the same way
    scales: (out_features, groups) in ``fmt.scale_dtype``
    zeros:  (out_features, groups) uint8, or None for symmetric formats
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    fmt: IntFormat

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int(self.codes, self.scales, self.zeros, self.fmt, dtype)

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.codes.shape
        return out_features, in_features


def set_quantized(
    module: nn.Linear | nn.Embedding, record: QuantizedWeight, *, update_weight: bool = True
) -> None:
    """Attach ``record`` and make the module's weight its dequantized value (unless not
    ``update_weight``: the weight is already that value, or a storage-free placeholder)."""
    if tuple(module.weight.shape) != record.shape:
        raise ValueError(f"record shape {record.shape} != weight {tuple(module.weight.shape)}")
    if update_weight:
        with torch.no_grad():
            module.weight.copy_(record.dequantize(module.weight.dtype))
    setattr(module, _ATTR, record)


def clear_quantized(module: nn.Module) -> None:
    """Drop a module's record (its weight is being replaced or released)."""
    if hasattr(module, _ATTR):
        delattr(module, _ATTR)


def get_quantized(module: nn.Module) -> QuantizedWeight | None:
    record = getattr(module, _ATTR, None)
    return record if isinstance(record, QuantizedWeight) else None


def quantized_modules(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every quantized module of ``model`` by qualified name, in module order."""
    found = {}
    for name, module in model.named_modules():
        record = get_quantized(module)
        if record is not None:
            found[name] = record
    return found
