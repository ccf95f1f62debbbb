"""Checks every weight-quantizing pass makes before it changes anything."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from compress.errors import FormatError
from compress.formats.int import IntFormat

__all__ = ["check_group_sizes"]


def check_group_sizes(modules: Mapping[str, nn.Module], fmt: IntFormat) -> None:
    """Fail, naming the layer, if the format's group size does not divide a module's input
    (a Linear's ``in_features``, an Embedding's ``embedding_dim``: the weight's columns)."""
    for name, module in modules.items():
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        try:
            fmt.groups(weight.shape[1])
        except FormatError as error:
            raise FormatError(f"layer {name}: {error.message}", hint=error.hint) from None
