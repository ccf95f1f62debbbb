"""Forward hooks that are always removed, errors included."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["capture_inputs"]


@contextmanager
def capture_inputs(
    modules: Mapping[str, nn.Module], on_input: Callable[[str, torch.Tensor], Any]
) -> Iterator[None]:
    """Call ``on_input(name, x)`` with the first positional input of each module's forward."""
    handles = []
    try:
        for name, module in modules.items():

            def hook(_: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                on_input(name, args[0].detach())

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
