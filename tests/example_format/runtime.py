"""Runtime of ``int8_rowscale``: a module whose buffers are the stored tensors, and its
reference kernel (the only one an example needs)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.formats import FormatRuntime, register_runtime
from tests.example_format.spec import RowScaleInt8


class RowScaleLinear(nn.Module):
    def __init__(
        self,
        fmt: RowScaleInt8,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        persistent: bool = True,
    ) -> None:
        super().__init__()
        self.fmt, self.in_features, self.out_features = fmt, in_features, out_features
        codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=device)
        self.register_buffer("codes", codes, persistent=persistent)
        scale = torch.empty(out_features, 1, dtype=torch.float32, device=device)
        self.register_buffer("scale", scale, persistent=persistent)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_record(cls, linear: nn.Linear, record: Any) -> RowScaleLinear:
        module = cls(record.fmt, linear.in_features, linear.out_features, bias=False)
        module.codes.copy_(record.codes)
        module.scale.copy_(record.scales)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fmt.dequantize(self.codes, self.scale, None, x.dtype)
        return F.linear(x, weight, self.bias)


register_runtime(
    RowScaleInt8.kind,
    FormatRuntime(linear=RowScaleLinear, linear_from_record=RowScaleLinear.from_record),
)
