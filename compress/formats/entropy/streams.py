"""What one entropy-coded tensor is: its manifest entry (:class:`StreamSpec`) and its stored
tensors (:class:`CodedTensor`). Shared by the encoders, the decoders and the export hook; holds
no codec logic so that every decoder backend can read it without importing the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from compress.errors import FormatError

__all__ = ["CodedTensor", "Kind", "StreamSpec"]

Kind = Literal["bf16", "codes"]


@dataclass(frozen=True)
class StreamSpec:
    """What the manifest records about one coded tensor (everything but the tensors)."""

    kind: Kind
    shape: tuple[int, ...]
    chunk: int
    table_bits: int
    alphabet: int
    checksum: str  # of the decoded tensor's bytes
    pairs: bool = False  # BF16 exponents coded in pairs (version 2)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def n_chunks(self) -> int:
        return -(-self.numel // self.chunk)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "chunk": self.chunk,
            "table_bits": self.table_bits,
            "alphabet": self.alphabet,
            "checksum": self.checksum,
            "pairs": self.pairs,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> StreamSpec:
        try:
            spec = cls(
                kind=data["kind"],
                shape=tuple(int(d) for d in data["shape"]),
                chunk=int(data["chunk"]),
                table_bits=int(data["table_bits"]),
                alphabet=int(data["alphabet"]),
                checksum=str(data["checksum"]),
                pairs=bool(data.get("pairs", False)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise FormatError(
                f"{where}: malformed entropy stream entry ({type(error).__name__}: {error})",
                hint="the export's manifest is corrupted; re-export it",
            ) from None
        if spec.pairs:
            bad = spec.kind != "bf16" or spec.chunk % 2 or not 1 <= spec.alphabet <= 256
        else:
            bad = spec.alphabet not in (4, 8, 16, 32, 64, 128, 256)
        if bad or spec.kind not in ("bf16", "codes") or spec.chunk <= 0:
            raise FormatError(
                f"{where}: unsupported entropy stream kind={spec.kind!r} chunk={spec.chunk} "
                f"alphabet={spec.alphabet}",
                hint="the export was written by another version of compress; re-export it",
            )
        if not 1 <= spec.table_bits <= 16 or any(d < 0 for d in spec.shape):
            raise FormatError(f"{where}: bad table_bits {spec.table_bits} or shape {spec.shape}")
        return spec


@dataclass
class CodedTensor:
    """One tensor's stored streams plus its spec."""

    spec: StreamSpec
    lengths: torch.Tensor
    offsets: torch.Tensor
    stream: torch.Tensor
    raw: torch.Tensor | None = None
    symbols: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (see the module docstring)."""
        out = {"lengths": self.lengths, "offsets": self.offsets, "stream": self.stream}
        if self.raw is not None:
            out["raw"] = self.raw
        if self.symbols is not None:
            out["symbols"] = self.symbols
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def from_tensors(cls, spec: StreamSpec, tensors: dict[str, torch.Tensor]) -> CodedTensor:
        return cls(
            spec,
            tensors["lengths"],
            tensors["offsets"],
            tensors["stream"],
            tensors.get("raw"),
            tensors.get("symbols"),
        )
