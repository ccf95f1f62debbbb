"""SmoothQuant: move activation outliers into the weights before W8A8 quantization.

INT8 activations with one scale per token lose the small channels of a token that has a few huge
ones. SmoothQuant (Xiao et al., 2023) divides each input channel ``j`` of a group of Linears by
``s_j = max|X_j|**α / max|W_:j|**(1-α)`` (over the calibration tokens, and over the group's
weights) and multiplies the weight columns by ``s_j``: the model computes the same function, the
activations become flatter, the weights take a little of their range. ``α`` (default 0.5) trades
one for the other. The division is folded into the op that produces the input (the norm before
q/k/v and gate/up, up_proj's rows before down_proj) exactly as ``awq`` folds its scales: the same
groups from :mod:`compress.layouts`, layer by layer on the outputs of the already smoothed layers,
each layer's output checked unchanged. o_proj is left alone under grouped-query attention (its
input repeats the value heads, whose rows cannot take a per-channel scale of every copy).

This pass quantizes nothing: follow it with ``act_quant`` and a weight pass::

    passes:
      - {pass: smoothquant, alpha: 0.5}
      - {pass: act_quant, format: int8}
      - {pass: gptq, bits: 8, group_size: null}
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from compress.errors import PassError
from compress.quant.awq import _Group, _InputStats, _linear, _plan, fold_layer_by_layer
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.utils.activations import ACTIVATION_QUANT_KEY

__all__ = ["SmoothQuantConfig", "smooth_scales", "smoothquant"]


class SmoothQuantConfig(PassConfig):
    """Settings of the ``smoothquant`` pass."""

    alpha: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="migration strength: 0 leaves the activations, 1 moves all of their range "
        "into the weights",
    )
    batch_size: int = Field(default=8, gt=0, description="calibration samples per forward")
    ignore: list[str] = Field(
        default_factory=list,
        description="glob patterns of modules smoothquant must not change: a group that would "
        "change one is skipped",
    )


def smooth_scales(
    activation_max: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """``s_j = max|X_j|**α / max_i|W_ij|**(1-α)`` over the group's weights (float32); channels
    that saw no activation or have no weight keep ``s = 1``."""
    weight_max = torch.stack([w.detach().abs().amax(dim=0).to(torch.float32) for w in weights])
    weight_max = weight_max.amax(dim=0)
    scales = activation_max.to(torch.float32).pow(alpha) / weight_max.pow(1.0 - alpha)
    usable = (activation_max > 0) & (weight_max > 0) & torch.isfinite(scales)
    return torch.where(usable, scales, torch.ones_like(scales)).clamp_(1e-5, 1e5)


@register_pass("smoothquant", SmoothQuantConfig, calibrated=True)
def smoothquant(model: nn.Module, config: SmoothQuantConfig, context: PassContext) -> PassReport:
    """Per-channel smoothing scales of Linear inputs, folded into the preceding ops."""
    if getattr(getattr(model, "config", None), ACTIVATION_QUANT_KEY, None):
        raise PassError(
            "smoothquant after act_quant: the activations would be rounded before they are "
            "smoothed",
            hint="put smoothquant before act_quant",
        )
    calibration = context.require_calibration("smoothquant")
    modules = dict(model.named_modules())
    report = PassReport(name="smoothquant")
    plan = _plan(model, modules, config.ignore, None, report.skipped, "smoothquant")

    def choose(group: _Group, stats: _InputStats) -> tuple[torch.Tensor | None, dict[str, float]]:
        if stats.max_abs is None:
            raise PassError(f"smoothquant: {group.name} saw no calibration input")
        weights = [_linear(modules, name).weight for name in group.linears]
        scales = smooth_scales(stats.max_abs, weights, config.alpha)
        flatness_before = float(stats.max_abs.max() / stats.max_abs.mean().clamp_min(1e-30))
        smoothed = stats.max_abs / scales
        flatness_after = float(smoothed.max() / smoothed.mean().clamp_min(1e-30))
        metrics = {
            "activation_peak_to_mean_before": flatness_before,
            "activation_peak_to_mean_after": flatness_after,
        }
        return scales, metrics

    fold_errors = fold_layer_by_layer(
        model,
        modules,
        plan,
        calibration,
        context,
        report,
        choose=choose,
        stats=lambda: _InputStats(stride=1 << 30, limit=0),
        batch_size=config.batch_size,
        pass_name="smoothquant",
    )
    entries = list(report.per_module.values())
    if entries:
        for key in ("activation_peak_to_mean_before", "activation_peak_to_mean_after"):
            report.metrics[f"mean_{key}"] = sum(e[key] for e in entries) / len(entries)
    report.metrics["groups"] = float(len(entries))
    report.metrics["max_fold_error"] = max(fold_errors, default=0.0)
    report.metrics["calibration_tokens"] = float(calibration.numel())
    return report
