"""Adapters of :class:`~compress.ir.Adapter` records, computed beside their modules in a run.

Between passes an adapter is data on its module (the IR record). Whatever runs the model in a
pipeline (the correction pass propagating corrected activations to the next layer, ``distill``
training the adapters) attaches them with :class:`AdapterHooks`: each becomes parameters on its
module (``adapter_lora_A`` ...) and a forward hook adds its output; leaving the context writes the
(possibly trained) values back into the records and removes parameters and hooks, errors
included. The export writes the records as a PEFT adapter folder (:mod:`compress.adapters.files`).

Record layouts (``Adapter.method``):

* ``lora``: ``lora_A`` ``(r, in)``, ``lora_B`` ``(out, r)``; config ``rank``, ``alpha``
  (output ``x Aᵀ Bᵀ · alpha / rank``, PEFT's LoRA);
* ``qwha``: ``cols`` ``(nnz,)``, ``row_counts`` ``(out,)``, ``values`` ``(nnz,)``; output
  ``hadamard_transform(x) @ Fᵀ`` (:func:`~compress.adapters.corrections.spectrum_delta`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.adapters.corrections import lora_delta, spectrum_delta, spectrum_rows
from compress.errors import PassError
from compress.ir import Adapter, get

__all__ = [
    "ADAPTER_PREFIX",
    "METHODS",
    "AdapterHooks",
    "adapter_hooks",
    "adapter_output",
    "device_of",
]

METHODS = ("lora", "qwha")
ADAPTER_PREFIX = "adapter_"
_TRAINED = {"lora": ("lora_A", "lora_B"), "qwha": ("values",)}


def adapter_output(module: nn.Module, method: str, x: torch.Tensor, size: float) -> torch.Tensor:
    """What the adapter attached to ``module`` adds to its output for input ``x``; ``size`` is
    LoRA's scaling (``alpha / rank``) or QWHA's output width."""
    if method == "lora":
        a = getattr(module, ADAPTER_PREFIX + "lora_A")
        b = getattr(module, ADAPTER_PREFIX + "lora_B")
        return lora_delta(x.to(a.dtype), a, b, size)
    values = getattr(module, ADAPTER_PREFIX + "values")
    rows = getattr(module, ADAPTER_PREFIX + "rows")
    cols = getattr(module, ADAPTER_PREFIX + "cols")
    return spectrum_delta(x, rows, cols, values, int(size))


@dataclass
class _Attached:
    module: nn.Module
    record: Adapter
    hook: Any
    names: tuple[str, ...]


class AdapterHooks:
    """Attaches adapter records as parameters plus forward hooks; :meth:`close` undoes it."""

    def __init__(self) -> None:
        self._attached: dict[str, _Attached] = {}

    def attach(
        self, name: str, module: nn.Module, *, parameters: bool = False
    ) -> list[nn.Parameter]:
        """Compute ``module``'s adapter in its forward. ``parameters``: its trainable tensors
        become parameters (frozen until the caller enables them; returned) for training, else
        non-persistent buffers, which no state dict or layer checkpoint picks up."""
        record = get(module, Adapter)
        if record is None or name in self._attached:
            return []
        if record.method not in METHODS:
            raise PassError(
                f"{name}: adapter method {record.method!r} is not one compress runs",
                hint=f"known methods: {', '.join(METHODS)}",
            )
        device = device_of(module)
        made = []
        for key in _TRAINED[record.method]:
            value = record.tensors[key].to(device=device, dtype=torch.float32).clone()
            if parameters and record.trainable:
                parameter = nn.Parameter(value, requires_grad=False)
                module.register_parameter(ADAPTER_PREFIX + key, parameter)
                made.append(parameter)
            else:
                module.register_buffer(ADAPTER_PREFIX + key, value, persistent=False)
        names = [ADAPTER_PREFIX + key for key in _TRAINED[record.method]]
        if record.method == "qwha":
            counts = record.tensors["row_counts"].to(torch.int64)
            module.register_buffer(ADAPTER_PREFIX + "rows", spectrum_rows(counts).to(device), False)
            module.register_buffer(
                ADAPTER_PREFIX + "cols", record.tensors["cols"].to(device, torch.int64), False
            )
            size = float(counts.numel())
            names += [ADAPTER_PREFIX + "rows", ADAPTER_PREFIX + "cols"]
        else:
            rank = int(record.config["rank"])
            size = float(record.config.get("alpha", rank)) / rank
        method = record.method

        def add_adapter(mod: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
            return output + adapter_output(mod, method, args[0], size).to(output.dtype)

        hook = module.register_forward_hook(add_adapter)
        self._attached[name] = _Attached(module, record, hook, tuple(names))
        return made

    def attach_all(self, model: nn.Module, *, parameters: bool = False) -> list[nn.Parameter]:
        """Attach every adapter record of ``model`` (see :meth:`attach`)."""
        made = []
        for name, module in model.named_modules():
            if get(module, Adapter) is not None:
                made += self.attach(name, module, parameters=parameters)
        return made

    def __len__(self) -> int:
        return len(self._attached)

    def close(self) -> None:
        """Write the adapters' current values into their records; remove parameters, hooks."""
        for attached in self._attached.values():
            module, record = attached.module, attached.record
            attached.hook.remove()
            for key in _TRAINED[record.method]:
                value: torch.Tensor | None = module._parameters.pop(ADAPTER_PREFIX + key, None)
                if value is None:
                    value = module._buffers.pop(ADAPTER_PREFIX + key)
                assert value is not None
                record.tensors[key] = value.detach().to("cpu", torch.float32).clone()
            for name in attached.names:
                module._buffers.pop(name, None)
        self._attached.clear()


@contextmanager
def adapter_hooks() -> Iterator[AdapterHooks]:
    """An :class:`AdapterHooks` closed on exit (errors included)."""
    hooks = AdapterHooks()
    try:
        yield hooks
    finally:
        hooks.close()


def device_of(module: nn.Module) -> torch.device:
    """Where ``module`` keeps its tensors (a packed Linear has buffers only); CPU if none."""
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")
