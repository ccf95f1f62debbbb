"""Dynamic activation quantization at run time: each token's input to a Linear is rounded to
INT8 or FP8 (E4M3) with its own scale just before the layer multiplies it (W8A8 numerics).

Per token (the last dimension of each row), symmetric: ``scale = amax / qmax`` (``qmax`` 127
for INT8, 448 for E4M3), ``x' = round(x / scale) * scale`` (INT8: to nearest, clamped to
``±127``; E4M3: torch's round-to-nearest-even cast, which saturates), computed in fp32 and cast
back to the activation dtype. The layer then multiplies ``x'`` with its (packed or dense)
weight: the result is what an int8 × int8 (or fp8 × fp8) GEMM with per-token activation scales
computes, up to the accumulation's rounding. No int8-activation kernel is used on CPU yet.

The ``act_quant`` pass installs it on the in-memory model and writes :data:`ACTIVATION_QUANT_KEY`
into ``config.json``; the export loader installs it again from there (like the online Hadamard
transform of :mod:`compress.utils.hadamard`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "ACTIVATION_FORMATS",
    "ACTIVATION_QUANT_KEY",
    "ActivationFormat",
    "install_activation_quant",
    "install_activation_quants",
    "quantize_activations",
    "quantizes_input",
]

ActivationFormat = Literal["int8", "fp8_e4m3"]
ACTIVATION_FORMATS: tuple[str, ...] = ("int8", "fp8_e4m3")
ACTIVATION_QUANT_KEY = "compress_activation_quant"
"""The ``config.json`` key: ``{"format": "int8" | "fp8_e4m3", "modules": [names]}``."""

_QMAX = {"int8": 127.0, "fp8_e4m3": 448.0}


def quantize_activations(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` rounded per token (last dimension) to ``fmt`` and back, in ``x``'s dtype."""
    if fmt not in _QMAX:
        raise ValueError(f"activation format must be one of {ACTIVATION_FORMATS}, got {fmt!r}")
    values = x.to(torch.float32)
    qmax = _QMAX[fmt]
    scale = values.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
    scaled = values / scale
    if fmt == "int8":
        rounded = torch.round(scaled).clamp_(-qmax, qmax)
    else:
        rounded = scaled.clamp_(-qmax, qmax).to(torch.float8_e4m3fn).to(torch.float32)
    return (rounded * scale).to(x.dtype)


def _int8_input(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (quantize_activations(args[0], "int8"), *args[1:])


def _fp8_input(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (quantize_activations(args[0], "fp8_e4m3"), *args[1:])


_HOOKS = {"int8": _int8_input, "fp8_e4m3": _fp8_input}


def quantizes_input(module: nn.Module) -> str | None:
    """The activation format installed on ``module``, or ``None``."""
    for hook in module._forward_pre_hooks.values():
        for fmt, function in _HOOKS.items():
            if hook is function:
                return fmt
    return None


def install_activation_quant(module: nn.Module, fmt: str) -> None:
    """Quantize ``module``'s input per token to ``fmt`` before every forward. Idempotent; refuses
    a second, different format. The hook is a module-level function, so copies of the module (a
    teacher, a checkpoint) carry it, and input-capture hooks registered later (GPTQ's
    calibration) see the quantized input, which is what the weight will multiply."""
    if fmt not in _HOOKS:
        raise ValueError(f"activation format must be one of {ACTIVATION_FORMATS}, got {fmt!r}")
    present = quantizes_input(module)
    if present == fmt:
        return
    if present is not None:
        raise ValueError(f"the module's input is quantized to {present} already, not {fmt}")
    module.register_forward_pre_hook(_HOOKS[fmt])


def install_activation_quants(model: nn.Module) -> list[str]:
    """Install the quantization the model's config lists (:data:`ACTIVATION_QUANT_KEY`) on each
    module it names; the names installed."""
    spec = getattr(getattr(model, "config", None), ACTIVATION_QUANT_KEY, None)
    if not spec:
        return []
    names = [str(name) for name in spec.get("modules", [])]
    for name in names:
        install_activation_quant(model.get_submodule(name), str(spec["format"]))
    return names
