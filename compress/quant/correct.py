"""Adapters that win back quantization error: ``lora_correct`` (low rank) and ``qwha``.

Both run after a quantizer (``rtn``, ``gptq``, ``awq``) and leave an
:class:`~compress.ir.Adapter` beside every quantized decoder Linear, initialised from its
quantization error ``E = W - Q(W)`` weighted by the second moment of the inputs the *quantized*
model feeds it on calibration text (layer by layer, with the corrections of earlier layers in
place). The maths is in :mod:`compress.adapters.corrections`:

* ``lora_correct`` (EoRA's training-free initialisation; INT2.1 when ``distill`` then trains
  it): ``ΔW = B A`` of rank ``rank``, the best rank-``rank`` fit of the weighted error. Stored
  as an ordinary PEFT LoRA adapter.
* ``qwha`` (QWHA, arXiv 2509.17428): ``ΔW = F H``, ``H`` the Walsh–Hadamard transform and ``F``
  sparse, with the paper's two ideas: coefficients allocated where the weighted error is largest
  (so rows with more error get more) and their values refined by least squares so the adapter
  starts by cancelling the error. ``rank: 8`` gives it as many coefficients as a rank-8 LoRA has
  parameters, which makes the two comparable.

A later ``distill`` pass trains the adapters (``train: ["*.adapter_*"]`` trains them alone).
After ``rotate``, the original weights are rotated the same way before the error is taken.

Example::

    passes:
      - {pass: gptq, bits: 3, group_size: 64}
      - {pass: qwha, rank: 8}              # or {pass: lora_correct, rank: 8}
      - {pass: distill, steps: 200, train: ["*.adapter_*"]}
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress.adapters.corrections import (
    eigenbasis,
    low_rank_correction,
    spectrum_correction,
    weighted_error,
)
from compress.adapters.runtime import AdapterHooks
from compress.errors import PassError
from compress.ir import Adapter, Permutation, Rotation, attach, get_quantized, records
from compress.quant.gptq import SharedHessians
from compress.quant.rearrange import apply_permutation_records
from compress.quant.rotate import RotateConfig, rotate
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.sequential import run_sequential
from compress.utils.hadamard import ONLINE_HADAMARD_KEY
from compress.utils.hooks import capture_inputs
from compress.utils.modules import select_decoder_linears

__all__ = ["LoraCorrectConfig", "QWHAPassConfig", "lora_correct", "qwha"]


class _CorrectionConfig(PassConfig):
    targets: list[str] | None = Field(
        default=None, description="glob patterns of module names; default: every quantized Linear"
    )
    ignore: list[str] = Field(default_factory=list, description="glob patterns to leave as is")
    rank: int = Field(
        default=8,
        gt=0,
        description="LoRA rank; qwha keeps rank·(in+out) coefficients per Linear, as many "
        "trainable parameters as a LoRA of this rank",
    )
    damp: float = Field(
        default=0.01, ge=0, le=1, description="dampening of XᵀX, as a fraction of its mean diagonal"
    )
    batch_size: int = Field(default=8, gt=0, description="calibration samples per forward")


class LoraCorrectConfig(_CorrectionConfig):
    """Settings of the ``lora_correct`` pass."""

    alpha: float | None = Field(
        default=None, gt=0, description="LoRA alpha (scaling alpha/rank); default: rank"
    )
    init: Literal["eora", "zeros"] = Field(
        default="eora",
        description="eora: the activation-weighted SVD of the error; zeros: PEFT's default "
        "(A random, B zero) for a LoRA that only training fills",
    )


class QWHAPassConfig(_CorrectionConfig):
    """Settings of the ``qwha`` pass."""

    init: Literal["refined", "zeros"] = Field(
        default="refined",
        description="refined: values that cancel the weighted error; zeros: the same chosen "
        "coefficients starting at zero",
    )


def _run(
    name: str,
    model: nn.Module,
    config: _CorrectionConfig,
    context: PassContext,
    fit: Callable[[str, torch.Tensor, torch.Tensor], Adapter],
) -> PassReport:
    calibration = context.require_calibration(name)
    if any(p.is_meta for p in model.parameters()):
        raise PassError(
            f"{name} keeps every layer's adapter computing in place while later layers "
            "calibrate, and needs the whole model in memory",
            hint="run without --offload (model.offload: false)",
        )
    modules, skipped = select_decoder_linears(
        model, config.targets, config.ignore, pass_name=name, why=f"{name} works layer by layer"
    )
    for module_name in [n for n, m in modules.items() if get_quantized(m) is None]:
        del modules[module_name]
        skipped[module_name] = "not quantized: nothing to correct"
    if not modules:
        raise PassError(
            f"{name}: no quantized Linear to correct",
            hint=f"run rtn, gptq or awq before {name}",
        )
    teacher = dict(_original_in_the_models_basis(name, model, context).named_modules())
    report = PassReport(name=name, skipped=skipped)
    hooks = AdapterHooks()

    def step(index: int, layer_name: str, layer: nn.Module, run: Callable[[], None]) -> None:
        mine = {n: m for n, m in modules.items() if n.startswith(layer_name + ".")}
        if not mine:
            return
        hessians = SharedHessians()  # one XᵀX for the Linears that read one input (q/k/v ...)
        with capture_inputs(mine, hessians.collect):
            run()
        hessians.stop_collecting()
        covariances: dict[int, torch.Tensor] = {}  # by Hessian: readers of one input share it
        for module_name, module in mine.items():
            hessian, count = hessians.get(module_name)
            if hessian is None or count == 0:
                raise PassError(f"{name}: layer {module_name} saw no calibration input")
            original = teacher.get(module_name)
            weight = getattr(original, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.shape != module.weight.shape:
                raise PassError(
                    f"{name}: {module_name} has no original weight of shape "
                    f"{tuple(module.weight.shape)} to correct towards",
                    hint="structural passes before the quantizer change the shapes; put "
                    f"{name} right after the quantizer of an unpruned model",
                )
            # the Hessian is 2·XᵀX/n (GPTQ's convention): halve it back to XᵀX/n
            if id(hessian) not in covariances:
                covariances[id(hessian)] = hessian.to(torch.float64) / 2
            covariance = covariances[id(hessian)]
            error = weight.detach().to(torch.float64) - module.weight.detach().to(torch.float64)
            if error.norm() > weight.detach().to(torch.float64).norm():
                raise PassError(
                    f"{name}: {module_name}'s quantized weight is further from the original "
                    "than the original is from zero: they are not the same weight",
                    hint="a pass between the original and this one changed the weights in a "
                    f"way {name} cannot reproduce; put {name} right after the quantizer",
                )
            adapter = fit(module_name, error, covariance)
            attach(module, adapter)
            hooks.attach(module_name, module)
            before = weighted_error(error, covariance)
            after = weighted_error(error - _delta_weight(adapter, error.shape), covariance)
            report.per_module[module_name] = {
                "weighted_error_before": before,
                "weighted_error_after": after,
                "error_ratio": after / before if before > 0 else 0.0,
                "trainable_params": float(
                    sum(adapter.tensors[k].numel() for k in _trained(adapter))
                ),
            }
            report.touched.append(module_name)

    try:
        run_sequential(
            model,
            calibration,
            step,
            batch_size=config.batch_size,
            description=f"{name} layers",
            progress=context.progress,
            layers=context.layers,
            report=report,
        )
    finally:
        hooks.close()
    ratios = [m["error_ratio"] for m in report.per_module.values()]
    report.metrics["mean_error_ratio"] = sum(ratios) / len(ratios)
    report.metrics["trainable_params"] = sum(
        m["trainable_params"] for m in report.per_module.values()
    )
    return report


def _original_in_the_models_basis(name: str, model: nn.Module, context: PassContext) -> nn.Module:
    """The original model, rotated or reordered as ``model`` was when a ``rotate`` or
    ``rearrange`` pass ran before: the weights the quantizer rounded (a rotation is recorded by
    its method and seed, so it is reproduced exactly, the per-head value rotation with it; a
    rearrangement by its channel orders)."""
    original = context.teacher()
    if next(records(model, Permutation), None) is not None:  # rearrange: the same channel order
        reordered = copy.deepcopy(original)
        apply_permutation_records(model, reordered)
        return reordered
    applied = {(r.method, r.seed) for _, r in records(model, Rotation)}
    if not applied:
        return original
    if len(applied) > 1 or None in {seed for _, seed in applied}:
        raise PassError(
            f"{name}: the model holds rotations it cannot reproduce: {sorted(map(str, applied))}",
            hint="one rotate pass with a seed, before the quantizer",
        )
    ((method, seed),) = applied
    rotated = copy.deepcopy(original)
    online_down = bool(getattr(model.config, ONLINE_HADAMARD_KEY, None))
    config = RotateConfig.model_validate(
        {"method": method, "seed": seed, "online_down": online_down}
    )
    rotate(rotated, config, PassContext(progress=context.progress))
    return rotated


def _trained(adapter: Adapter) -> tuple[str, ...]:
    return ("lora_A", "lora_B") if adapter.method == "lora" else ("values",)


def _delta_weight(adapter: Adapter, shape: torch.Size) -> torch.Tensor:
    from compress.adapters.corrections import spectrum_delta_weight, spectrum_rows

    t = adapter.tensors
    if adapter.method == "lora":
        scaling = (
            float(adapter.config.get("alpha", adapter.config["rank"])) / adapter.config["rank"]
        )
        return (t["lora_B"].double() @ t["lora_A"].double()) * scaling
    rows = spectrum_rows(t["row_counts"])
    return spectrum_delta_weight(rows, t["cols"], t["values"].double(), (shape[0], shape[1]))


@register_pass("lora_correct", LoraCorrectConfig, calibrated=True)
def lora_correct(model: nn.Module, config: LoraCorrectConfig, context: PassContext) -> PassReport:
    """Low-rank adapters initialised from the activation-weighted quantization error."""
    alpha = config.alpha if config.alpha is not None else float(config.rank)
    scaling = alpha / config.rank
    generator = torch.Generator().manual_seed(0)
    bases: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = []

    def basis_of(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q/k/v (and gate/up) read one input and get the same covariance object
        for seen, basis in bases:
            if seen is covariance:
                return basis
        basis = eigenbasis(covariance, config.damp)
        bases[:] = [*bases[-3:], (covariance, basis)]
        return basis

    def fit(name: str, error: torch.Tensor, covariance: torch.Tensor) -> Adapter:
        out_features, in_features = error.shape
        rank = min(config.rank, out_features, in_features)
        if config.init == "zeros":
            bound = 1 / in_features**0.5  # PEFT's kaiming-uniform(a=√5) bound for A
            a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
            b = torch.zeros(out_features, rank)
        else:
            basis = basis_of(covariance)
            factors = low_rank_correction(error, covariance, rank, damp=config.damp, basis=basis)
            a, b = factors.a, factors.b / scaling
        return Adapter(
            "lora", {"lora_A": a, "lora_B": b}, {"rank": rank, "alpha": alpha * rank / config.rank}
        )

    return _run("lora_correct", model, config, context, fit)


@register_pass("qwha", QWHAPassConfig, calibrated=True)
def qwha(model: nn.Module, config: QWHAPassConfig, context: PassContext) -> PassReport:
    """Walsh–Hadamard adapters (QWHA) initialised to cancel the quantization error."""

    def fit(name: str, error: torch.Tensor, covariance: torch.Tensor) -> Adapter:
        out_features, in_features = error.shape
        count = config.rank * (out_features + in_features)
        spectrum = spectrum_correction(error, covariance, count, damp=config.damp)
        values = spectrum.values
        if config.init == "zeros":
            values = torch.zeros_like(values)
        return Adapter(
            "qwha",
            {"cols": spectrum.cols, "row_counts": spectrum.row_counts, "values": values},
            {"count": int(values.numel())},
        )

    return _run("qwha", model, config, context, fit)
