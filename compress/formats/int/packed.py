"""The stored tensors of one packed integer weight, as the kernels receive them.

Kernels take this and the activations, never the module that holds the buffers, so a format's
kernels can be tested, benchmarked and reused (a tied ``lm_head`` reading an embedding's codes)
without a module around them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from compress.formats.int.spec import IntFormat, dequantize_int
from compress.formats.packing import unpack_codes

__all__ = ["PackedInt", "unpack_zeros"]


def unpack_zeros(
    qzeros: torch.Tensor | None, fmt: IntFormat, out_features: int, in_features: int
) -> torch.Tensor | None:
    """(N, G) uint8 zero points from their packed bit stream, or None for symmetric formats."""
    if qzeros is None:
        return None
    groups = fmt.groups(in_features)
    flat = unpack_codes(qzeros.unsqueeze(0), fmt.bits, out_features * groups)
    return flat.view(out_features, groups)


class PackedInt(NamedTuple):
    """``W[n, k] = (code[n, k] - zero[n, k // g]) * scale[n, k // g]`` (see
    :mod:`compress.formats.int.linear` for the layout of each tensor)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    bias: torch.Tensor | None
    fmt: IntFormat
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    def codes(self) -> torch.Tensor:
        """(N, K) uint8 codes, unpacked."""
        return unpack_codes(self.qweight, self.fmt.bits, self.in_features)

    def zeros(self) -> torch.Tensor | None:
        return unpack_zeros(self.qzeros, self.fmt, self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (N, K) weight: the reference kernel's and the tests' oracle."""
        return dequantize_int(self.codes(), self.scales, self.zeros(), self.fmt, dtype)
