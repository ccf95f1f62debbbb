"""Bits where they matter: a code width for each Linear under a bits-per-weight budget.

Layers differ in how much their rounding costs the model (FlexQ, HAWQ, SqueezeLLM's
sensitivity): giving the sensitive ones 4 bits and the rest 3 buys more than 3.5 bits for
everyone. ``allocate_bits`` measures, for every targeted Linear and every width in ``choices``,

    cost(layer, b) = sum_ij F_ij * (W_ij - Q_b(W)_ij)**2

with ``Q_b`` round-to-nearest at ``b`` bits in the integer format the quantizer will use (the
same group size, symmetry, scale dtype and observer) and ``F`` the diagonal of the empirical
Fisher information of the language-model loss, ``E[g**2]`` over calibration sequences (one
backward pass per sequence): the second-order estimate of how much the loss rises when that
layer alone is rounded. Costs add over layers, so the allocation is a knapsack: every layer
starts at the narrowest width, and the widening that removes the most cost per stored bit is
taken until the next would exceed the budget. ``scripts/bench_allocation.py`` checks the proxy
against the KL of quantizing each layer alone.

The chosen width is left on each module as a :class:`~compress.ir.BitWidth` record, which the
quantizers that follow use in place of their ``bits`` (their group size, symmetry and observer
still apply)::

    passes:
      - {pass: allocate_bits, budget: 3.5, choices: [3, 4], group_size: 64, symmetric: false}
      - {pass: gptq, group_size: 64, symmetric: false, act_order: true, observer: mse}

``budget`` counts what is stored: codes, scales and zero points (``int3 g64 asym`` is 3.297
bits a weight, ``int4`` 4.312). The report lists the widths per layer and projection.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from compress.errors import PassError
from compress.formats import Format
from compress.formats.int import IntFormat
from compress.formats.int.spec import ScaleDtype
from compress.ir import BitWidth, attach, get, get_quantized
from compress.quant.observers import choose_clip
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.utils.modules import decoder_layers, select_decoder_linears
from compress.utils.progress import Progress

__all__ = [
    "AllocateBitsConfig",
    "allocate",
    "allocate_bits",
    "allocated_format",
    "fisher_diagonal",
    "rounding_cost",
]


class AllocateBitsConfig(PassConfig):
    """Settings of the ``allocate_bits`` pass."""

    budget: float = Field(
        gt=0,
        description="mean stored bits per weight over the targeted Linears, scales and zero "
        "points included (int3 g64 asym is 3.297, int4 4.312)",
    )
    choices: list[int] = Field(
        default_factory=lambda: [2, 3, 4], description="code widths a layer may get (2..8)"
    )
    group_size: int | None = Field(
        default=128, gt=0, description="as the quantizer that follows: columns per scale"
    )
    symmetric: bool = Field(default=True, description="as the quantizer that follows")
    scale_dtype: ScaleDtype = Field(default="float16", description="as the quantizer")
    observer: Literal["minmax", "mse"] = Field(
        default="mse", description="group ranges of the rounding the costs are measured with"
    )
    samples: int = Field(
        default=32, gt=0, description="calibration sequences of the Fisher estimate (at most)"
    )
    targets: list[str] | None = Field(
        default=None, description="glob patterns; default: every Linear in decoder blocks"
    )
    ignore: list[str] = Field(default_factory=list, description="glob patterns to leave as is")

    @field_validator("choices")
    @classmethod
    def _widths(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("needs at least one width")
        bad = [b for b in value if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"widths must be 2..8 bits, got {bad}")
        return sorted(set(value))

    def format(self, bits: int) -> IntFormat:
        return IntFormat(bits, self.group_size, self.symmetric, self.scale_dtype)


def fisher_diagonal(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    sequences: torch.Tensor,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """``E[g**2]`` of the mean next-token loss over ``sequences`` (one backward each), for each
    named weight, in fp32. Only those weights take gradients; the model is left as it was.

    On the CPU a half-precision model runs the passes in fp32 (its parameters widened, and
    narrowed back exactly afterwards): CPUs without bf16 arithmetic emulate it, and a bf16
    backward there takes minutes a sequence."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    dtypes = [p.dtype for p in params]
    widen = [p.device.type == "cpu" and p.dtype in (torch.bfloat16, torch.float16) for p in params]
    fisher = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    tensors = list(weights.values())
    try:
        for p, wide in zip(params, widen, strict=True):
            p.requires_grad_(False)
            if wide:
                p.data = p.data.float()
        for w in tensors:
            w.requires_grad_(True)
        rows: Iterable[int] = range(sequences.shape[0])
        if progress is not None:
            rows = progress.track(rows, "allocate_bits: fisher", total=sequences.shape[0])
        with torch.enable_grad():
            for row in rows:
                ids = sequences[row : row + 1]
                loss = model(input_ids=ids, labels=ids).loss
                grads = torch.autograd.grad(loss, tensors)
                for name, grad in zip(weights, grads, strict=True):
                    fisher[name].addcmul_(grad.float(), grad.float())
    finally:
        for p, flag, dtype, wide in zip(params, before, dtypes, widen, strict=True):
            p.requires_grad_(flag)
            if wide:
                p.data = p.data.to(dtype)  # exact: the values came from this dtype
    count = max(sequences.shape[0], 1)
    return {name: f.div_(count) for name, f in fisher.items()}


def rounding_cost(
    weight: torch.Tensor, fisher: torch.Tensor, fmt: IntFormat, observer: str
) -> float:
    """``sum F * (W - Q(W))**2``: the estimated loss increase of rounding ``weight`` to
    ``fmt`` (round to nearest, ``observer``'s group ranges)."""
    w = weight.detach()
    clip = choose_clip(w, fmt, observer)  # type: ignore[arg-type]
    codes, scales, zeros = fmt.quantize(w, clip_ratio=clip)
    error = w.to(torch.float32) - fmt.dequantize(codes, scales, zeros, torch.float32)
    return float((fisher * error.square()).sum())


def allocate(
    costs: dict[str, dict[int, float]],
    stored_bits: dict[str, dict[int, float]],
    budget_bits: float,
) -> dict[str, int]:
    """The width of each layer: all start at the narrowest, then the widening with the largest
    cost removed per stored bit is taken while the total stays within ``budget_bits``.

    ``costs[name][b]``: the layer's cost at ``b`` bits; ``stored_bits[name][b]``: what it stores
    at ``b`` bits (weights times bits per weight). Raises :class:`ValueError` when even the
    narrowest widths exceed the budget."""
    chosen = {name: min(widths) for name, widths in costs.items()}
    spent = sum(stored_bits[name][b] for name, b in chosen.items())
    if spent > budget_bits * (1 + 1e-9):
        raise ValueError(f"the narrowest widths store {spent:.0f} bits, over {budget_bits:.0f}")
    while True:
        best: tuple[float, str, int, float] | None = None
        for name, widths in costs.items():
            now = chosen[name]
            for b in widths:
                if b <= now:
                    continue
                extra = stored_bits[name][b] - stored_bits[name][now]
                if spent + extra > budget_bits * (1 + 1e-9):
                    continue
                gain = (widths[now] - widths[b]) / extra
                if best is None or gain > best[0]:
                    best = (gain, name, b, extra)
        if best is None or best[0] <= 0:
            return chosen
        _, name, b, extra = best
        chosen[name] = b
        spent += extra


def allocated_format(name: str, module: nn.Module, fmt: Format, pass_name: str) -> Format:
    """``fmt`` at the width ``allocate_bits`` chose for ``module``, or ``fmt`` itself when it
    chose none. Raises :class:`PassError` when a width was chosen but ``fmt`` is no integer
    format."""
    chosen = get(module, BitWidth)
    if chosen is None:
        return fmt
    if not isinstance(fmt, IntFormat):
        raise PassError(
            f"{pass_name}: allocate_bits chose {chosen.bits} bits for {name}, but this pass "
            f"quantizes to {fmt.label()}, which has no bit width to set",
            hint="use format: int after allocate_bits",
        )
    return IntFormat(chosen.bits, fmt.group_size, fmt.symmetric, fmt.scale_dtype)


@register_pass("allocate_bits", AllocateBitsConfig, calibrated=True)
def allocate_bits(model: nn.Module, config: AllocateBitsConfig, context: PassContext) -> PassReport:
    """Choose a code width per Linear under the budget (Fisher-weighted rounding error)."""
    calibration = context.require_calibration("allocate_bits")
    modules, skipped = select_decoder_linears(
        model,
        config.targets,
        config.ignore,
        pass_name="allocate_bits",
        why="allocate_bits chooses widths for the decoder layers' Linears",
    )
    for name, module in modules.items():
        if get_quantized(module) is not None:
            raise PassError(
                f"allocate_bits: {name} is quantized already",
                hint="put allocate_bits before the quantization passes",
            )
        if module.weight.is_meta:
            raise PassError(
                "allocate_bits needs the whole model in memory (one backward pass through it)",
                hint="drop model.offload for this recipe",
            )
        for bits in config.choices:
            config.format(bits).check_width(module.in_features)
    report = PassReport(name="allocate_bits", skipped=skipped)
    sequences = calibration[: config.samples]
    weights = {name: module.weight for name, module in modules.items()}
    fisher = fisher_diagonal(model, weights, sequences, context.progress)
    costs: dict[str, dict[int, float]] = {}
    stored: dict[str, dict[int, float]] = {}
    for name in context.progress.track(modules, "allocate_bits: rounding costs"):
        module, weighting = modules[name], fisher.pop(name)  # freed as we go
        costs[name] = {
            b: rounding_cost(module.weight, weighting, config.format(b), config.observer)
            for b in config.choices
        }
        size = module.weight.numel()
        stored[name] = {
            b: size * config.format(b).bits_per_weight(module.in_features) for b in config.choices
        }
    total = sum(module.weight.numel() for module in modules.values())
    try:
        chosen = allocate(costs, stored, config.budget * total)
    except ValueError:
        lowest = sum(s[min(s)] for s in stored.values()) / total
        highest = sum(s[max(s)] for s in stored.values()) / total
        raise PassError(
            f"allocate_bits: budget {config.budget} bits/weight is below what the narrowest "
            f"width stores ({lowest:.3f})",
            hint=f"use a budget between {lowest:.3f} and {highest:.3f}, or add a narrower width "
            "to choices",
        ) from None
    for name, module in modules.items():
        attach(module, BitWidth(chosen[name]))
        report.per_module[name] = {
            "bits": float(chosen[name]),
            **{f"cost_{b}": c for b, c in costs[name].items()},
        }
        report.touched.append(name)
    used = sum(stored[name][chosen[name]] for name in modules) / total
    report.metrics["bits_per_weight"] = used
    report.metrics["budget"] = config.budget
    report.metrics["estimated_loss_increase"] = sum(costs[n][chosen[n]] for n in modules)
    report.notes += allocation_notes(model, modules, chosen)
    return report


def allocation_notes(
    model: nn.Module, modules: dict[str, nn.Linear], chosen: dict[str, int]
) -> list[str]:
    """What the report shows: weights per width, mean width per projection, widths per layer."""
    total = sum(m.weight.numel() for m in modules.values())
    by_width: dict[int, int] = defaultdict(int)
    for name, module in modules.items():
        by_width[chosen[name]] += module.weight.numel()
    shares = (f"int{b} {100 * n / total:.1f}% of weights" for b, n in sorted(by_width.items()))
    lines = ["widths: " + ", ".join(shares)]
    by_kind: dict[str, list[int]] = defaultdict(list)
    for name in modules:
        by_kind[name.rsplit(".", 1)[-1]].append(chosen[name])
    lines.append(
        "mean width per projection: "
        + ", ".join(f"{kind} {sum(v) / len(v):.2f}" for kind, v in sorted(by_kind.items()))
    )
    prefix, _ = decoder_layers(model)
    per_layer: dict[str, list[str]] = defaultdict(list)
    for name in modules:
        layer, _, rest = name.removeprefix(prefix + ".").partition(".")
        per_layer[layer].append(f"{rest.rsplit('.', 1)[-1]} {chosen[name]}")
    lines += [f"layer {layer}: " + ", ".join(parts) for layer, parts in per_layer.items()]
    return lines
