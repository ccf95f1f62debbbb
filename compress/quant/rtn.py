"""Round-to-nearest weight quantization (RTN).

Calibration-free: each group of a weight row gets a scale (and zero point when asymmetric) from
its range, and every weight is rounded to the nearest level. The baseline every calibrated
method is measured against.

Example recipe entry::

    passes:
      - {pass: rtn, bits: 4, group_size: 64, symmetric: true, observer: mse}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.errors import PassError
from compress.formats import Format
from compress.formats.int import IntFormat, quantize_int
from compress.ir import QuantizedWeight, set_quantized
from compress.quant.checks import check_group_sizes
from compress.quant.observers import choose_clip
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.sequential import for_each_layer
from compress.utils.modules import decoder_layers, select_weights, untie_

__all__ = ["RTNConfig", "quantization_error", "rtn"]


class RTNConfig(PassConfig):
    """Settings of the ``rtn`` pass."""

    bits: int = Field(default=4, ge=2, le=8, description="code width in bits (2..8)")
    group_size: int | None = Field(
        default=128,
        gt=0,
        description="columns sharing one scale; null = one scale per output channel",
    )
    symmetric: bool = Field(default=True, description="symmetric codes (no stored zero point)")
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    observer: Literal["minmax", "mse"] = Field(
        default="minmax",
        description="range of each group: minmax = full range; mse = clip ratio searched per "
        "group to minimise the weight reconstruction error",
    )
    targets: list[str] | None = Field(
        default=None,
        description="glob patterns of module names; default: every Linear in decoder blocks. "
        "Embeddings and lm_head are quantized only when named, e.g. [model.embed_tokens, "
        "lm_head]; a tied pair named together is quantized once and stored once",
    )
    ignore: list[str] = Field(default_factory=list, description="glob patterns to leave as is")

    def int_format(self) -> IntFormat:
        return IntFormat(self.bits, self.group_size, self.symmetric, self.scale_dtype)

    def formats(self) -> list[Format]:
        """The formats this pass leaves on modules (their runtimes are prepared early)."""
        return [self.int_format()]


def quantization_error(weight: torch.Tensor, record: QuantizedWeight) -> float:
    """Relative Frobenius error ``||W - Q(W)|| / ||W||`` of one weight."""
    reference = weight.detach().to(torch.float32)
    diff = reference - record.dequantize(torch.float32)
    return float(diff.norm() / reference.norm().clamp_min(1e-30))


@register_pass("rtn", RTNConfig)
def rtn(model: nn.Module, config: RTNConfig, context: PassContext) -> PassReport:
    """Round-to-nearest integer quantization of Linear weights."""
    fmt = config.int_format()
    modules, skipped = select_weights(model, config.targets, config.ignore)
    if not modules:
        raise PassError(
            "rtn: no Linear or Embedding module matched targets="
            f"{config.targets if config.targets is not None else '<decoder blocks>'}",
            hint="check the targets/ignore patterns against model.named_modules()",
        )
    check_group_sizes(modules, fmt)
    report = PassReport(name="rtn", skipped=skipped)
    report.notes += untie_(model, modules)
    # A tied weight (lm_head = embedding) is quantized once. Only weights held by several
    # selected modules are remembered, with the weight itself: under offload a decoder layer's
    # freed weight may leave its id to the next layer's.
    holders: dict[int, int] = {}
    for module in modules.values():
        holders[id(module.weight)] = holders.get(id(module.weight), 0) + 1
    shared: dict[int, tuple[torch.Tensor, QuantizedWeight | None]] = {
        id(m.weight): (m.weight, None) for m in modules.values() if holders[id(m.weight)] > 1
    }

    def quantize(name: str, module: nn.Linear | nn.Embedding) -> None:
        weight = module.weight
        if weight.is_meta:
            raise PassError(
                f"rtn: {name} is not in memory (the model is offloaded)",
                hint="with model.offload only modules inside the decoder layers can be quantized",
            )
        tied = shared.get(id(weight))
        if tied is not None and tied[0] is weight and tied[1] is not None:
            # tied to a module quantized already: same codes, same weight
            set_quantized(module, tied[1], update_weight=False)
            report.touched.append(name)
            return
        clip = choose_clip(weight, fmt, config.observer)
        codes, scales, zeros = quantize_int(weight, fmt, clip_ratio=clip)
        record = QuantizedWeight(codes, scales, zeros, fmt)
        report.per_module[name] = {"relative_error": quantization_error(weight, record)}
        if tied is not None:
            shared[id(weight)] = (weight, record)
        set_quantized(module, record)
        report.touched.append(name)

    prefix, _ = decoder_layers(model)

    def step(index: int, layer_name: str, layer: nn.Module) -> None:
        for name, module in modules.items():
            if name.startswith(layer_name + "."):
                quantize(name, module)

    # decoder layers one at a time (offloadable, resumable), then anything targeted outside them
    for_each_layer(
        model,
        step,
        description="rtn layers",
        progress=context.progress,
        layers=context.layers,
        report=report,
    )
    for name, module in modules.items():
        if not name.startswith(prefix + "."):
            quantize(name, module)
    errors = [entry["relative_error"] for entry in report.per_module.values()]
    report.metrics["mean_relative_error"] = sum(errors) / len(errors)
    report.metrics["max_relative_error"] = max(errors)
    return report
