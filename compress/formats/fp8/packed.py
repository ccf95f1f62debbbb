"""The stored tensors of one FP8 weight, as the kernels receive them.

Kernels take this and the activations, never the module that holds the buffers (as the integer
format's ``PackedInt``), so they can be tested and benchmarked without a module around them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compress.formats.fp8.spec import FP8Format, dequantize_fp8

__all__ = ["PackedFP8"]


class PackedFP8(NamedTuple):
    """``W[n, k] = fp8(qweight[n, k]) * scales[n // bn, k // bk]`` (see
    :mod:`compress.formats.fp8.spec` for the layout)."""

    qweight: torch.Tensor  # (N, K) uint8
    scales: torch.Tensor  # (ceil(N/bn), ceil(K/bk)) float32
    bias: torch.Tensor | None
    fmt: FP8Format

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight: the reference kernel's and the tests' oracle."""
        return dequantize_fp8(self.qweight, self.scales, self.fmt, dtype)
