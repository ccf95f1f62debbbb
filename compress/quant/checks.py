"""Checks every weight-quantizing pass makes before it changes anything."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from compress.errors import FormatError
from compress.formats import Format

__all__ = ["check_group_sizes", "format_when_read"]


def check_group_sizes(modules: Mapping[str, nn.Module], fmt: Format) -> None:
    """Fail, naming the layer, if the format cannot hold a module's rows (an integer group size
    that does not divide a Linear's ``in_features`` or an Embedding's ``embedding_dim``)."""
    for name, module in modules.items():
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        try:
            fmt.check_width(weight.shape[1])
        except FormatError as error:
            raise FormatError(f"layer {name}: {error.message}", hint=error.hint) from None


def format_when_read(build: Callable[[], Format]) -> Format:
    """The format a pass config builds, its :class:`FormatError` (e.g. scale_dtype e8m0 with
    symmetric: false) turned into the ``ValueError`` pydantic reports at the recipe entry: an
    impossible format is refused when the recipe is read, not halfway through a run."""
    try:
        return build()
    except FormatError as error:
        raise ValueError(str(error)) from None
