"""The ``act_quant`` pass: dynamic per-token quantization of Linear inputs (W8A8).

Every selected Linear's input is rounded per token to INT8 or FP8 E4M3 at run time
(:mod:`compress.utils.activations`): from this pass on, in memory (so later calibrated passes,
evaluation and distillation see the quantized activations) and in the export, whose loader
installs it from ``config.json``. With a weight pass this is W8A8:

    passes:
      - {pass: act_quant, format: fp8_e4m3}           # before gptq: it calibrates on them
      - {pass: gptq, format: fp8_e4m3, scaling: channel}

Put it before the weight passes so that their calibration sees what the layers will be fed, and
after ``rotate``/``smoothquant``-style passes that change the activations. The numerics are
W8A8's; on CPU the product still runs in the weight format's kernel on the rounded activations
(no int8 × int8 kernel yet).
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from compress.errors import PassError
from compress.ir import ConfigPatch, attach, get
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.utils.activations import (
    ACTIVATION_QUANT_KEY,
    ActivationFormat,
    install_activation_quant,
    quantizes_input,
)
from compress.utils.modules import select_weights

__all__ = ["ActQuantConfig", "act_quant"]


class ActQuantConfig(PassConfig):
    """Settings of the ``act_quant`` pass."""

    format: ActivationFormat = Field(
        default="int8",
        description="int8 (symmetric, per token) or fp8_e4m3 (per-token scale, saturating)",
    )
    targets: list[str] | None = Field(
        default=None,
        description="glob patterns of Linear names; default: every Linear in decoder blocks",
    )
    ignore: list[str] = Field(default_factory=list, description="glob patterns to leave as is")


@register_pass("act_quant", ActQuantConfig)
def act_quant(model: nn.Module, config: ActQuantConfig, context: PassContext) -> PassReport:
    """Install per-token activation quantization on the selected Linears and record it."""
    modules, skipped = select_weights(model, config.targets, config.ignore, embeddings=False)
    if not modules:
        raise PassError(
            "act_quant: no Linear module matched targets="
            f"{config.targets if config.targets is not None else '<decoder blocks>'}",
            hint="check the targets/ignore patterns against model.named_modules()",
        )
    report = PassReport(name="act_quant", skipped=skipped)
    spec = getattr(getattr(model, "config", None), ACTIVATION_QUANT_KEY, None) or {}
    if spec and spec.get("format") != config.format:
        raise PassError(
            f"act_quant: the activations are quantized to {spec.get('format')} already "
            f"(an earlier act_quant pass), not {config.format}",
            hint="use one act_quant pass, or the same format in both",
        )
    names = list(spec.get("modules", []))
    for name, module in modules.items():
        present = quantizes_input(module)
        if present is not None and present != config.format:
            raise PassError(f"act_quant: {name}'s input is quantized to {present} already")
        install_activation_quant(module, config.format)
        if name not in names:
            names.append(name)
        report.touched.append(name)
    spec = {"format": config.format, "modules": names}
    held = get(model, ConfigPatch)
    attach(model, ConfigPatch({**(held.updates if held else {}), ACTIVATION_QUANT_KEY: spec}))
    if getattr(model, "config", None) is not None:
        setattr(model.config, ACTIVATION_QUANT_KEY, spec)  # the in-memory config says it too
    report.notes.append(
        f"inputs of {len(report.touched)} Linears quantized per token to {config.format} at run "
        "time; the export's loader installs it"
    )
    return report
