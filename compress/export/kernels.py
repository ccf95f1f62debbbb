"""CPU kernels for :class:`~compress.export.qlinear.QuantLinear`, and how one is chosen.

``reference``: unpack codes, dequantize to the activation dtype, ``F.linear``. The test oracle,
and on CPU also the fastest path for fp32 activations: measured on a 2-core AVX2 machine at
(1, 576) x (1536, 576), a dense fp32 GEMV takes ~0.13 ms while PyTorch's int8 weight-only op
takes ~1.2 ms in fp32 and its int4 op ~4.6 ms.

``torch_int8``: PyTorch's ``_weight_int8pack_mm`` for symmetric per-channel int8 with bf16/fp16
activations and few rows, where it beats a dense half-precision GEMV (~0.22 ms vs ~1.15 ms
above). Its int4 sibling lost in every dtype measured, so it is not used.

``COMPRESS_KERNEL=reference`` forces the reference path. The chosen path is logged once per
(kernel, format) and shown by ``compress inspect``.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from compress.formats import IntFormat

if TYPE_CHECKING:
    from compress.export.qlinear import QuantLinear

__all__ = ["KERNELS", "run", "select"]

log = logging.getLogger(__name__)

_SMALL_BATCH_ROWS = 16
_LOGGED: set[tuple[str, str]] = set()


def _reference(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    weight = module.dequantize(x.dtype)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, weight, bias)


def _torch_int8(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    # Offset-128 unsigned codes become two's-complement int8 by flipping the top bit.
    weight = (module.qweight ^ 0x80).view(torch.int8)
    scales = module.scales[:, 0].to(x.dtype)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.aten._weight_int8pack_mm(flat, weight, scales)
    if module.bias is not None:
        out = out + module.bias.to(x.dtype)
    return out.reshape(*x.shape[:-1], module.out_features)


KERNELS = {"reference": _reference, "torch_int8": _torch_int8}


def select(
    fmt: IntFormat, in_features: int, *, rows: int, dtype: torch.dtype, device: str = "cpu"
) -> str:
    """The fastest correct kernel for a format, input width, activation dtype and row count."""
    if os.environ.get("COMPRESS_KERNEL", "") == "reference":
        return "reference"
    if (
        fmt.bits == 8
        and fmt.symmetric
        and fmt.group_size in (None, in_features)
        and dtype in (torch.bfloat16, torch.float16)
        and rows <= _SMALL_BATCH_ROWS
        and device == "cpu"
    ):
        return "torch_int8"
    return "reference"


def run(kernel: str, module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    key = (kernel, f"int{module.fmt.bits}/g{module.fmt.group_size}")
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("QuantLinear %s uses kernel %r", key[1], kernel)
    return KERNELS[kernel](module, x)
