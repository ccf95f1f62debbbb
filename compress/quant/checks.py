"""Checks every weight-quantizing pass makes before it changes anything."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from compress.errors import FormatError
from compress.formats import IntFormat

__all__ = ["check_group_sizes"]


def check_group_sizes(modules: Mapping[str, nn.Linear], fmt: IntFormat) -> None:
    """Fail, naming the layer, if the format's group size does not divide a module's input."""
    for name, module in modules.items():
        try:
            fmt.groups(module.in_features)
        except FormatError as error:
            raise FormatError(f"layer {name}: {error.message}", hint=error.hint) from None
