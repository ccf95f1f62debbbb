"""The bitmask sparse format: a pruned weight stored as its nonzero values plus one bit per
weight saying where they are.

It is what a ``prune`` pass (unstructured or N:M) that no quantization follows stores: the
export writer turns each pruned Linear into this format (``export: {sparse: true}``, the
default) when that is smaller than the dense weight, so a 50%-sparse bf16 model takes 9 bits per
weight instead of 16, and its CPU kernel reads only the kept values. Nothing is rounded: the
values are the weight's own, in its dtype, and the reloaded model computes the same function.

Weight ``W`` ``(N, K)`` in ``dtype``; ``kept`` is the most nonzero weights any row has (the
format's one shape parameter: a pruning pass makes it the same for every row of a layer).

============  ======================  =======  ================================================
name          shape                   dtype    meaning
============  ======================  =======  ================================================
``bitmask``   (N, ceil(K/8))          uint8    bit ``j`` of byte ``i`` (least significant
                                               first) set where ``W[n, 8i + j] != 0``
``values``    (N, kept)               dtype    each row's nonzero weights in column order; a row
                                               with fewer than ``kept`` is padded with zeros
                                               that no bit points at
============  ======================  =======  ================================================

``W[n, k] = values[n, r]`` where bit ``k`` of row ``n`` is set and ``r`` counts the set bits
before it, 0 elsewhere. The bit order is numpy's ``packbits(..., bitorder="little")``, the
layout compressed-tensors' ``sparse-bitmask`` used; its values were one flat stream with
per-row offsets, ours a rectangle, so a decode step needs no offsets table. A weight that is
``-0.0`` is stored as a zero (unset bit) and reads back as ``+0.0``.

In the IR record (:class:`compress.ir.QuantizedWeight`) the "codes" of this lossless format are
the dense weight itself in ``dtype``; it has no scales (an empty ``(N, 0)`` tensor) and no zero
points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from compress.errors import FormatError, nearest
from compress.formats.base import StoredTensor, register_format

__all__ = ["VALUE_DTYPES", "BitmaskFormat", "row_nonzeros"]

VALUE_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
ValueDtype = Literal["bfloat16", "float16", "float32"]
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def row_nonzeros(weight: torch.Tensor) -> torch.Tensor:
    """(N,) int64: the nonzero weights of each row (what ``kept`` must hold)."""
    return (weight != 0).sum(dim=1)


@register_format(runtime="compress.formats.bitmask.runtime")
@dataclass(frozen=True)
class BitmaskFormat:
    """Nonzero values of each row in column order plus a bitmask of their columns."""

    kept: int
    dtype: ValueDtype = "bfloat16"

    kind: ClassVar[str] = "bitmask"

    def __post_init__(self) -> None:
        if self.dtype not in VALUE_DTYPES:
            guess = nearest(str(self.dtype), VALUE_DTYPES)
            raise FormatError(
                f"bitmask values must be one of {', '.join(VALUE_DTYPES)}, got {self.dtype!r}",
                hint=f"did you mean {guess!r}?" if guess else "the model's own float dtype",
            )
        if not isinstance(self.kept, int) or isinstance(self.kept, bool) or self.kept < 0:
            raise FormatError(
                f"bitmask kept (values stored per row) must be a non-negative integer, "
                f"got {self.kept!r}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return VALUE_DTYPES[self.dtype]

    @property
    def value_bits(self) -> int:
        return torch.finfo(self.torch_dtype).bits

    @property
    def code_bits(self) -> int:
        """The values' width: what is stored per kept weight."""
        return self.value_bits

    @classmethod
    def for_weight(cls, weight: torch.Tensor) -> BitmaskFormat:
        """The format that holds ``weight`` (its dtype, its fullest row's nonzero count)."""
        name = next((k for k, v in VALUE_DTYPES.items() if v == weight.dtype), None)
        if name is None:
            raise FormatError(
                f"bitmask values must be one of {', '.join(VALUE_DTYPES)}, got {weight.dtype}"
            )
        kept = int(row_nonzeros(weight).max()) if weight.numel() else 0
        return cls(kept, name)  # type: ignore[arg-type]

    def check_width(self, in_features: int) -> None:
        if in_features < self.kept:
            raise FormatError(
                f"a bitmask format keeping {self.kept} values a row cannot hold rows of "
                f"{in_features} weights"
            )

    def bits_per_weight(self, in_features: int) -> float:
        mask_bits = -(-in_features // 8) * 8
        return (self.kept * self.value_bits + mask_bits) / in_features

    def pays(self, in_features: int) -> bool:
        """Whether storing a row this way is smaller than storing it dense."""
        return self.bits_per_weight(in_features) < self.value_bits

    def stored_tensors(self, out_features: int, in_features: int) -> list[StoredTensor]:
        self.check_width(in_features)
        return [
            StoredTensor(
                "bitmask",
                torch.uint8,
                (out_features, -(-in_features // 8)),
                "bit k%8 of byte k//8 set where column k is nonzero (least significant first)",
            ),
            StoredTensor(
                "values",
                self.torch_dtype,
                (out_features, self.kept),
                f"each row's nonzero weights in column order, zero-padded to {self.kept}",
            ),
        ]

    def label(self) -> str:
        return f"{_SHORT[self.dtype]} bitmask ≤{self.kept}/row"

    def quantize(
        self, weight: torch.Tensor, *, clip_ratio: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Lossless: the "codes" are the weight in ``dtype`` (``clip_ratio`` has no meaning).

        Raises :class:`FormatError` naming the first row with more than ``kept`` nonzeros."""
        codes = weight.detach().to(self.torch_dtype)
        counts = row_nonzeros(codes)
        if counts.numel() and int(counts.max()) > self.kept:
            row = int((counts > self.kept).nonzero()[0])
            raise FormatError(
                f"row {row} has {int(counts[row])} nonzero weights, but this bitmask format "
                f"keeps {self.kept} a row",
                hint="take the format from the weight (BitmaskFormat.for_weight)",
            )
        scales = torch.empty(codes.shape[0], 0, dtype=torch.float32, device=codes.device)
        return codes, scales, None

    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return codes.to(dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "kept": self.kept, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitmaskFormat:
        if data.get("kind") != cls.kind:
            raise FormatError(f"not a bitmask sparse format: {data!r}")
        return cls(**{k: v for k, v in data.items() if k != "kind"})
