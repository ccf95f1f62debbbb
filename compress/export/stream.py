"""The stream of tensors an export writes, as the writer's stages pass it along."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.ir import QuantizedWeight

__all__ = ["StoredItem"]


@dataclass
class StoredItem:
    """One tensor on its way to a shard.

    ``record``: for a packed tensor of a quantized module (``qweight``, ``scales``, ...), the
    module's live IR record, so a stage can read the codes themselves (the entropy coder) instead
    of unpacking the bytes again. Dropped with the item: the stream stays one module deep.
    """

    name: str
    tensor: torch.Tensor
    record: QuantizedWeight | None = None

    @property
    def owner(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]
