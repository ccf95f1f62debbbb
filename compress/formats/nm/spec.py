"""The N:M sparse integer format: of every M consecutive weights of a row at most N are nonzero,
and only those N are stored, as integer codes, beside their positions.

It is what an N:M ``prune`` followed by ``rtn`` / ``gptq`` / ``awq`` stores: the export writer
turns each such layer's integer record into this format (``export: {sparse: true}``, the
default), so a 2:4 model is smaller on disk and its kernels read only the kept half.

Weight ``W`` ``(N, K)``, ``K`` a multiple of ``m``, integer codes of ``bits`` bits with the
integer format's scales (groups of ``group_size`` input columns, a multiple of ``m``, so every
run of ``m`` columns shares one scale). Each row keeps ``K * n / m`` values, ``n`` per run of
``m``, in column order. A run with fewer than ``n`` nonzero weights stores zeros at its first
free positions (the weight is the same either way), so every row stores the same count.

============  ============================  ===========  ======================================
name          shape                         dtype        meaning
============  ============================  ===========  ======================================
``qweight``   (N, ceil(K*n/m * bits / 8))   uint8        kept codes, each row a little-endian
                                                         bit stream (the integer layout)
``qindex``    (N, ceil(K*n/m * ib / 8))     uint8        each kept code's position in its run
                                                         of ``m``, ``ib = max(2, ceil(log2 m))``
                                                         bits, the same bit-stream layout
``scales``    (N, K / group_size)           scale dtype  per-group scale (integer format)
``qzeros``    (ceil(N*G*bits/8),)           uint8        zero points (integer format); absent
                                                         when symmetric
============  ============================  ===========  ======================================

``W[n, k] = (code - zero[n, k // g]) * scale[n, k // g]`` at the kept positions, 0 elsewhere.
For 2:4 the positions cost 1 bit per weight (2 bits per kept value), as on sparse tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from compress.errors import FormatError
from compress.formats.base import StoredTensor, register_format
from compress.formats.int.spec import SCALE_DTYPES, IntFormat, ScaleDtype

__all__ = ["NMIntFormat", "index_bits", "kept_positions", "nonzero_codes"]


def index_bits(m: int) -> int:
    """Bits of one stored position in a run of ``m`` (at least 2: the packing's narrowest)."""
    return max(2, (m - 1).bit_length())


@register_format(runtime="compress.formats.nm.runtime")
@dataclass(frozen=True)
class NMIntFormat:
    """N:M sparse integer format (``n`` kept of every ``m`` input columns)."""

    n: int
    m: int
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: ScaleDtype = "float16"

    kind: ClassVar[str] = "nm_int"

    def __post_init__(self) -> None:
        if not 0 < self.n < self.m:
            raise FormatError(f"N:M sparsity needs 0 < n < m, got {self.n}:{self.m}")
        if self.m > 256:
            raise FormatError(f"m must be at most 256, got {self.m}")
        if self.group_size is not None and self.group_size % self.m:
            raise FormatError(
                f"group_size {self.group_size} is not a multiple of m={self.m}: a run of "
                f"{self.m} columns would straddle two scales",
                hint=f"use a group size that {self.m} divides",
            )
        IntFormat(self.bits, self.group_size, self.symmetric, self.scale_dtype)  # its checks

    @property
    def values(self) -> IntFormat:
        """The integer format of the kept codes (and of the scales and zero points)."""
        return IntFormat(self.bits, self.group_size, self.symmetric, self.scale_dtype)

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def index_bits(self) -> int:
        return index_bits(self.m)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def kept(self, in_features: int) -> int:
        """Codes stored per row."""
        return in_features // self.m * self.n

    def check_width(self, in_features: int) -> None:
        if in_features % self.m:
            raise FormatError(
                f"the input dimension {in_features} is not a multiple of m={self.m}",
                hint="N:M sparsity tiles each row in runs of m columns",
            )
        self.values.check_width(in_features)

    def bits_per_weight(self, in_features: int) -> float:
        dense = self.values.bits_per_weight(in_features) - self.bits  # scales and zeros
        return (self.bits + self.index_bits) * self.n / self.m + dense

    def stored_tensors(self, out_features: int, in_features: int) -> list[StoredTensor]:
        self.check_width(in_features)
        kept = self.kept(in_features)
        tensors = [
            StoredTensor(
                "qweight",
                torch.uint8,
                (out_features, (kept * self.bits + 7) // 8),
                f"{kept} kept {self.bits}-bit codes a row, each row a little-endian bit stream",
            ),
            StoredTensor(
                "qindex",
                torch.uint8,
                (out_features, (kept * self.index_bits + 7) // 8),
                f"position of each kept code in its run of {self.m}, {self.index_bits} bits",
            ),
        ]
        dense = self.values.stored_tensors(out_features, in_features)
        return tensors + [t for t in dense if t.name != "qweight"]

    def label(self) -> str:
        return f"{self.values.label()} {self.n}:{self.m}"

    def quantize(
        self, weight: torch.Tensor, *, clip_ratio: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Round-to-nearest of the ``n`` largest magnitudes of every run of ``m`` (magnitude
        pruning, the floor; a ``prune`` pass chooses better): dense ``(N, K)`` codes whose
        pruned positions hold the code of zero."""
        rows, columns = weight.shape
        self.check_width(columns)
        runs = weight.detach().reshape(rows, columns // self.m, self.m)
        top = runs.abs().topk(self.n, dim=2).indices
        keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(2, top, True)
        return self.values.quantize((runs * keep).reshape(rows, columns), clip_ratio=clip_ratio)

    def dequantize(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return self.values.dequantize(codes, scales, zeros, dtype)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n": self.n,
            "m": self.m,
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_dtype": self.scale_dtype,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NMIntFormat:
        if data.get("kind") != cls.kind:
            raise FormatError(f"not an N:M sparse integer format: {data!r}")
        return cls(**{k: v for k, v in data.items() if k != "kind"})

    @classmethod
    def of(cls, values: IntFormat, n: int, m: int) -> NMIntFormat:
        """The N:M format whose kept codes are in ``values``."""
        return cls(n, m, values.bits, values.group_size, values.symmetric, values.scale_dtype)


def nonzero_codes(
    codes: torch.Tensor, zeros: torch.Tensor | None, fmt: NMIntFormat
) -> torch.Tensor:
    """(N, K) bool: where the codes stand for a nonzero weight (code != the zero point)."""
    values = fmt.values
    if zeros is None:
        return codes != values.midpoint
    groups = values.groups(codes.shape[1])
    zero = zeros.to(codes.dtype).repeat_interleave(codes.shape[1] // groups, dim=1)
    return codes != zero


def kept_positions(nonzero: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(N, K/m*n) int64 column of each stored code: the nonzero positions of every run of
    ``m``, topped up with its first zero positions, in column order.

    Raises :class:`ValueError` naming the first row and run with more than ``n`` nonzeros."""
    rows, columns = nonzero.shape
    runs = nonzero.reshape(rows, columns // m, m)
    count = runs.sum(dim=2)
    if bool((count > n).any()):
        row, run = (int(i) for i in (count > n).nonzero()[0])
        raise ValueError(
            f"row {row}, columns {run * m}..{run * m + m - 1}: {int(count[row, run])} nonzero "
            f"weights where {n}:{m} keeps {n}"
        )
    # rank positions: nonzeros first, then zeros, each by column (a stable sort on ~nonzero)
    order = torch.argsort((~runs).to(torch.int8), dim=2, stable=True)[:, :, :n]
    order, _ = order.sort(dim=2)
    base = torch.arange(0, columns, m, device=nonzero.device).view(1, -1, 1)
    return (order + base).reshape(rows, -1)
