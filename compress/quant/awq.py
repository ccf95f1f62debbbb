"""AWQ: activation-aware scaling that makes the following quantization pass more accurate.

Input channels that meet large activations matter most to a Linear's output, so before rounding
their weight columns are multiplied by ``s = mean|x|**α`` and the op that produces ``x`` divides
its output by ``s``: the model computes the same function, the exported model has no extra op, and
the rounding error on the important columns shrinks by ``s``. ``α`` is searched per group on
calibration text against the group's output error after round-to-nearest in the configured format
(Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
2023). This pass quantizes nothing: follow it with ``rtn`` or ``gptq`` in the same format. The
groups come from :mod:`compress.layouts` (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3 and Llama-like
models), per decoder layer, layer by layer through :mod:`compress.sequential`; the maths lives in
:mod:`compress.quant.awq_math`.

Example recipe entry::

    calibration: {dataset: builtin:wiki, samples: 128, seq_len: 512}
    passes:
      - {pass: awq, bits: 4, group_size: 64}
      - {pass: gptq, bits: 4, group_size: 64}

or, for another format, its keys as ``rtn`` / ``gptq`` take them (the search rounds onto that
format's grid)::

      - {pass: awq, format: nf4, scale_block: 64}
      - {pass: gptq, format: nf4, scale_block: 64, act_order: true}

The report's ``per_module`` is keyed by the first Linear of each group (``…self_attn.q_proj`` for
q/k/v, ``…self_attn.o_proj``, ``…mlp.gate_proj`` for gate/up, ``…mlp.down_proj``) with the chosen
``alpha`` and the group's relative output error on the search rows without (``error_before``) and
with (``error_after``) the scales; ``skipped`` uses the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import nn

from compress.errors import PassError
from compress.formats import Format
from compress.ir import get_quantized
from compress.layouts import layout_of
from compress.quant.awq_math import search_scales
from compress.quant.checks import check_group_sizes
from compress.quant.rtn import WeightFormatConfig
from compress.registry import PassContext, PassReport, register_pass
from compress.sequential import run_sequential
from compress.utils.hadamard import transforms_input_online
from compress.utils.hooks import capture_inputs
from compress.utils.modules import match_any

__all__ = ["AWQConfig", "awq"]

_LAYOUT_HINT = (
    "awq folds its scales into the op that produces each Linear's input, as compress.layouts "
    "describes the families it knows; quantize other architectures with rtn or gptq alone"
)


class AWQConfig(WeightFormatConfig):
    """Settings of the ``awq`` pass: the target format of the pass that follows (the keys of
    ``rtn`` / ``gptq``: ``format`` and that format's keys), and the search."""

    grid: int = Field(
        default=20, ge=2, le=1000, description="exponents α tried in linspace(0, 1, grid)"
    )
    search_tokens: int = Field(
        default=4096,
        gt=0,
        description="calibration tokens (evenly spaced) on which each group's output error is "
        "measured; mean |x| always uses all of them",
    )
    batch_size: int = Field(default=8, gt=0, description="calibration samples per forward")
    ignore: list[str] = Field(
        default_factory=list,
        description="glob patterns of modules awq must not change: a group that would change one "
        "is skipped",
    )


@dataclass(frozen=True)
class _Group:
    """Linears reading one input, and the op that produces it (where ``1/s`` is folded)."""

    previous: str  # qualified module names
    linears: tuple[str, ...]
    rows: tuple[int, int] | None = None  # output rows of a fused producer that form the input
    one_plus: bool = False  # a norm computing x * (1 + weight) (Gemma)

    @property
    def name(self) -> str:
        """The report key: the first Linear's name."""
        return self.linears[0]


@register_pass("awq", AWQConfig, calibrated=True)
def awq(model: nn.Module, config: AWQConfig, context: PassContext) -> PassReport:
    """Activation-aware scaling (AWQ) of Linear inputs, folded into the preceding ops."""
    calibration = context.require_calibration("awq")
    fmt = config.weight_format()
    modules = dict(model.named_modules())
    report = PassReport(name="awq")
    plan = _plan(model, modules, config.ignore, fmt, report.skipped, "awq")
    stride = max(1, math.ceil(calibration.numel() / config.search_tokens))

    def choose(group: _Group, stats: _InputStats) -> tuple[torch.Tensor | None, dict[str, float]]:
        # every search reads the unscaled layer: scaling one group changes neither the inputs nor
        # (up to a per-row factor that the row-wise formats absorb) the rounding of another
        mean_abs, rows = stats.result(group.name)
        weights = [_linear(modules, name).weight for name in group.linears]
        search = search_scales(weights, rows, mean_abs, fmt, grid=config.grid)
        metrics = {
            "alpha": search.alpha,
            "error_before": search.error_before,
            "error_after": search.error_after,
        }
        return (search.scales if search.alpha > 0.0 else None), metrics

    fold_errors = fold_layer_by_layer(
        model,
        modules,
        plan,
        calibration,
        context,
        report,
        choose=choose,
        stats=lambda: _InputStats(stride, config.search_tokens),
        batch_size=config.batch_size,
        pass_name="awq",
    )
    _summarise(report, fold_errors, calibration.numel(), stride)
    return report


def fold_layer_by_layer(
    model: nn.Module,
    modules: dict[str, nn.Module],
    plan: dict[str, list[_Group]],
    calibration: torch.Tensor,
    context: PassContext,
    report: PassReport,
    *,
    choose: Callable[[_Group, _InputStats], tuple[torch.Tensor | None, dict[str, float]]],
    stats: Callable[[], _InputStats],
    batch_size: int,
    pass_name: str,
) -> list[float]:
    """Per decoder layer (on the outputs of the already scaled ones): the input statistics of
    each planned group, ``choose``'s scales for it (``None``: leave it), folded into the group and
    its producer, and the layer's output checked unchanged on its first calibration batch (a
    layer whose fold changed it is restored and the pass fails). ``choose``'s metrics go to
    ``report.per_module``; the relative output change of every layer is returned."""
    fold_errors: list[float] = []

    def step(index: int, layer_name: str, layer: nn.Module, run: Callable[[], None]) -> None:
        groups = plan.get(layer_name, [])
        if not groups:
            return
        seen = {group.name: stats() for group in groups}
        readers = {group.name: modules[group.name] for group in groups}
        with (
            capture_inputs(readers, lambda name, x: seen[name].add(x)),
            _first_call(layer) as probe,
        ):
            run()
        chosen = {group: choose(group, seen[group.name]) for group in groups}
        saved: dict[str, torch.Tensor] = {}
        for group, (scales, _) in chosen.items():
            if scales is not None:
                _fold_(group, scales, modules, saved)
        fold_error = probe.check(layer)
        if fold_error > _fold_tolerance(layer):
            _restore_(modules, saved)
            raise PassError(
                f"{pass_name}: folding the scales changed the output of {layer_name} "
                f"({type(layer).__name__}) by {fold_error:.2%}; this layer is restored "
                "(earlier ones keep their exact folds)",
                hint="its norms or projections do not compute as in Llama (e.g. a norm that "
                "multiplies by 1 + weight); " + _LAYOUT_HINT,
            )
        fold_errors.append(fold_error)
        for group, (scales, metrics) in chosen.items():
            report.per_module[group.name] = metrics
            if scales is not None:
                report.touched.extend([group.previous, *group.linears])
        report.touched[:] = list(dict.fromkeys(report.touched))  # v_proj, up_proj: two groups

    run_sequential(
        model,
        calibration,
        step,
        batch_size=batch_size,
        description=f"{pass_name} layers",
        progress=context.progress,
        layers=context.layers,
        report=report,
    )
    return fold_errors


def _plan(
    model: nn.Module,
    modules: dict[str, nn.Module],
    ignore: list[str],
    fmt: Format | None,
    skipped: dict[str, str],
    pass_name: str,
) -> dict[str, list[_Group]]:
    """The groups of every decoder layer (from :mod:`compress.layouts`); fails before any change
    if the model's layout is unknown. ``fmt``: the format of the quantization that follows, whose
    groups must fit the Linears (``None``: no such check)."""
    try:
        layout = layout_of(model)
    except PassError as error:
        raise PassError(
            f"{pass_name} does not support it: {error.message}", hint=_LAYOUT_HINT
        ) from None
    plan: dict[str, list[_Group]] = {}
    for index in range(layout.num_layers):
        layer_name = layout.layer_name(index)
        plan[layer_name] = []
        for scale_group in layout.scale_groups:
            group = _Group(
                layout.qualified(index, scale_group.source),
                tuple(layout.qualified(index, name) for name in scale_group.linears),
                rows=scale_group.source_rows,
                one_plus=scale_group.source_kind == "norm" and layout.norm_kind == "rms_one_plus",
            )
            reason = _check_group(group, modules, ignore, fmt, pass_name)
            if reason is None:
                plan[layer_name].append(group)
            else:
                skipped[group.name] = reason
    return plan


def _check_group(
    group: _Group,
    modules: dict[str, nn.Module],
    ignore: list[str],
    fmt: Format | None,
    pass_name: str,
) -> str | None:
    """Why the group cannot be scaled (``None``: it can); raises on what the user must fix."""
    readers = [modules[name] for name in group.linears]
    for name, module in zip(group.linears, readers, strict=True):
        if not isinstance(module, nn.Linear):
            raise PassError(
                f"{pass_name}: {name} is a {type(module).__name__}, expected nn.Linear",
                hint=_LAYOUT_HINT,
            )
    linears = {
        n: m for n, m in zip(group.linears, readers, strict=True) if isinstance(m, nn.Linear)
    }
    if fmt is not None:
        check_group_sizes(linears, fmt)
    for name in (group.previous, *group.linears):
        if get_quantized(modules[name]) is not None:
            raise PassError(
                f"{pass_name}: {name} is already quantized; scaling it now would break its codes",
                hint=f"put {pass_name} before the quantization pass (rtn, gptq) in the recipe",
            )
    in_features = readers[0].in_features
    if any(module.in_features != in_features for module in readers):
        raise PassError(f"{pass_name}: {', '.join(group.linears)} read inputs of different widths")
    if any(transforms_input_online(module) for module in readers):
        return (
            f"{group.name} transforms its input online (rotate's online_down): a scale of the "
            "channels before the transform cannot be folded into the weights after it"
        )
    previous = modules[group.previous]
    if isinstance(previous, nn.Linear):
        start, end = group.rows or (0, previous.out_features)
        if end - start != in_features:
            return (
                f"{group.previous} has {end - start} outputs but {group.name} reads "
                f"{in_features}: grouped-query attention repeats the value heads, so scales "
                "of its inputs cannot be folded into the preceding Linear"
            )
    else:
        weight = getattr(previous, "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (in_features,):
            raise PassError(
                f"{pass_name}: {group.previous} ({type(previous).__name__}) has no weight of "
                f"shape ({in_features},) to fold the scales into",
                hint=_LAYOUT_HINT,
            )
    changed = [name for name in (group.previous, *group.linears) if match_any(name, ignore)]
    if changed:
        return f"matched an ignore pattern: {', '.join(changed)}"
    return None


class _InputStats:
    """Mean ``|x|`` per channel over every token, and every ``stride``-th token kept as a row."""

    def __init__(self, stride: int, limit: int) -> None:
        self.stride = stride
        self.limit = limit
        self.sum_abs: torch.Tensor | None = None
        self.max_abs: torch.Tensor | None = None  # per channel, for smoothquant
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        magnitude = x.abs()
        total = magnitude.sum(dim=0, dtype=torch.float32)
        peak = magnitude.amax(dim=0).to(torch.float32)
        self.sum_abs = total if self.sum_abs is None else self.sum_abs + total
        self.max_abs = peak if self.max_abs is None else torch.maximum(self.max_abs, peak)
        first = (-self.count) % self.stride  # global token index divisible by stride
        picked = x[first :: self.stride][: self.limit - self.kept]
        if picked.shape[0]:
            # a copy: a view would keep the whole batch's activations alive
            self.rows.append(picked.to(torch.float32, copy=True))
            self.kept += picked.shape[0]
        self.count += x.shape[0]

    def result(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(in,) mean |x| and (rows, in) float32 search rows."""
        if self.sum_abs is None or self.count == 0:
            raise PassError(f"awq: {name} saw no calibration input")
        return self.sum_abs / self.count, torch.cat(self.rows)


@dataclass
class _Probe:
    """The first call of a decoder layer, replayed after folding to prove nothing changed."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: torch.Tensor | None = None

    def check(self, layer: nn.Module) -> float:
        """Relative change of the layer's output on the recorded call."""
        if self.output is None:
            return 0.0
        with torch.no_grad():
            now = _hidden(layer(*self.args, **self.kwargs)).to(torch.float32)
        before = self.output.to(torch.float32)
        return float((now - before).norm() / before.norm().clamp_min(1e-30))


@contextmanager
def _first_call(layer: nn.Module) -> Iterator[_Probe]:
    """Record the inputs and output of ``layer``'s first forward; the hook goes on exit."""
    probe = _Probe()

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if probe.output is None:
            probe.args, probe.kwargs, probe.output = args, dict(kwargs), _hidden(output).detach()

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield probe
    finally:
        handle.remove()


def _hidden(output: Any) -> torch.Tensor:
    hidden = output[0] if isinstance(output, tuple) else output
    if not isinstance(hidden, torch.Tensor):
        raise PassError(f"awq: a decoder layer returned {type(hidden).__name__}, not a tensor")
    return hidden


def _fold_tolerance(layer: nn.Module) -> float:
    """Relative output change allowed for a fold that is exact up to rounding in this dtype."""
    dtype = next(layer.parameters()).dtype
    return 1e-3 if torch.finfo(dtype).bits >= 32 else 5e-2


def _fold_(
    group: _Group,
    scales: torch.Tensor,
    modules: dict[str, nn.Module],
    saved: dict[str, torch.Tensor],
) -> None:
    """Scale the group's input columns by ``s`` and the preceding op's output by ``1/s``.

    Computed in float32, stored in each parameter's dtype; originals go to ``saved`` first. A
    norm that multiplies by ``1 + w`` gets ``w' = (1 + w) / s - 1``; a fused producer only
    the output rows that form the group's input.
    """
    previous = modules[group.previous]
    with torch.no_grad():
        for name in group.linears:
            weight = _linear(modules, name).weight  # (out, in): input columns times s
            _save(saved, f"{name}.weight", weight)
            weight.copy_(weight.to(torch.float32) * scales.to(weight.device))
        # a Linear's output rows (out, in) and bias (out,), or a norm's weight and bias (in,)
        for attribute in ("weight", "bias"):
            parameter = getattr(previous, attribute, None)
            if not isinstance(parameter, torch.Tensor):
                continue
            _save(saved, f"{group.previous}.{attribute}", parameter)
            target = parameter if group.rows is None else parameter[group.rows[0] : group.rows[1]]
            divisor = scales.to(parameter.device)
            if target.dim() == 2:
                divisor = divisor.unsqueeze(1)
            value = target.to(torch.float32)
            if group.one_plus and attribute == "weight":
                target.copy_((1.0 + value) / divisor - 1.0)
            else:
                target.copy_(value / divisor)


def _linear(modules: dict[str, nn.Module], name: str) -> nn.Linear:
    module = modules[name]
    if not isinstance(module, nn.Linear):  # _check_group refused this before any change
        raise PassError(f"awq: {name} is a {type(module).__name__}, expected nn.Linear")
    return module


def _save(saved: dict[str, torch.Tensor], name: str, parameter: torch.Tensor) -> None:
    if name not in saved:
        saved[name] = parameter.detach().clone()


def _restore_(modules: dict[str, nn.Module], saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in saved.items():
            owner, attribute = name.rsplit(".", 1)
            getattr(modules[owner], attribute).copy_(value)


def _summarise(report: PassReport, fold_errors: list[float], tokens: int, stride: int) -> None:
    entries = list(report.per_module.values())
    report.metrics["groups"] = float(len(entries))
    report.metrics["scaled_groups"] = float(sum(1 for e in entries if e["alpha"] > 0.0))
    if entries:
        reductions = [
            1.0 - e["error_after"] / e["error_before"] if e["error_before"] > 0.0 else 0.0
            for e in entries
        ]
        report.metrics["mean_error_reduction"] = sum(reductions) / len(reductions)
        report.metrics["mean_alpha"] = sum(e["alpha"] for e in entries) / len(entries)
        report.metrics["mean_error_before"] = sum(e["error_before"] for e in entries) / len(entries)
        report.metrics["mean_error_after"] = sum(e["error_after"] for e in entries) / len(entries)
    report.metrics["max_fold_error"] = max(fold_errors, default=0.0)
    report.metrics["calibration_tokens"] = float(tokens)
    report.metrics["search_stride"] = float(stride)
