"""``int8_rowscale``: symmetric int8 codes, one float32 scale per output row.

Stored tensors of a module with weight ``(N, K)``:

==========  ========  =======  =====================================
name        shape     dtype    meaning
==========  ========  =======  =====================================
``codes``   (N, K)    uint8    code + 128 (two's complement flipped)
``scale``   (N, 1)    float32  row scale: ``W = (code - 128) * scale``
==========  ========  =======  =====================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from compress.formats import StoredTensor, register_format


@register_format(runtime="tests.example_format.runtime")
@dataclass(frozen=True)
class RowScaleInt8:
    kind: ClassVar[str] = "int8_rowscale"

    @property
    def code_bits(self) -> int:
        return 8

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RowScaleInt8:
        return cls()

    def label(self) -> str:
        return "int8 row-scale fp32"

    def check_width(self, in_features: int) -> None:
        return None

    def bits_per_weight(self, in_features: int) -> float:
        return 8 + 32 / in_features

    def stored_tensors(self, out_features: int, in_features: int) -> list[StoredTensor]:
        return [
            StoredTensor("codes", torch.uint8, (out_features, in_features), "code + 128"),
            StoredTensor("scale", torch.float32, (out_features, 1), "row scale"),
        ]

    def quantize(
        self, weight: torch.Tensor, *, clip_ratio: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        w = weight.detach().to(torch.float32)
        scale = (w.abs().amax(dim=1, keepdim=True) * clip_ratio / 127).clamp_min(1e-12)
        codes = (torch.round(w / scale).clamp(-127, 127) + 128).to(torch.uint8)
        return codes, scale, None

    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return ((codes.to(torch.float32) - 128) * scales).to(dtype)
