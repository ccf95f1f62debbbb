"""The ``prune`` pass: unstructured or N:M weight sparsity by magnitude, Wanda or SparseGPT.

* ``magnitude``: drop the smallest ``|W|`` of each output row; calibration-free, the floor.
* ``wanda``: drop the smallest ``|W_ij| · ‖x_j‖₂`` of each row, input norms from calibration
  (:mod:`compress.prune.wanda_math`); no weight update.
* ``sparsegpt``: choose the mask block by block with the OBS saliency and update the remaining
  weights to compensate (:mod:`compress.prune.sparsegpt_math`), from the inputs' second moment.

Calibrated methods go layer by layer through :mod:`compress.sequential`, so each decoder layer
is calibrated on the outputs of the already pruned layers before it. ``pattern: "N:M"`` keeps N
of every M consecutive input columns of each row (2:4 is what sparse tensor cores run);
``sparsity`` is then implied (1 - N/M). Only Linears inside the decoder layers are pruned.
``allocation: owl`` gives unstructured Wanda / SparseGPT a sparsity per decoder layer by its
share of outlier scores, the mean kept (:mod:`compress.prune.allocation`).

Results: pruned weights are zero in place and each pruned Linear carries a
:class:`compress.ir.SparsityMask`. The export writer stores a pruned Linear that no pass quantized
as its nonzero values plus a bitmask (:mod:`compress.formats.bitmask`: 9 bits a weight at 50% in
bf16), an N:M-pruned integer one as kept codes plus positions (:mod:`compress.formats.nm`); the
export reloads with the same logits and is smaller (``export: {sparse: false}`` stores it dense).

With quantization: prune first. A later ``rtn`` keeps zeros exactly (zero is a grid point of
every integer format it writes); a later ``gptq`` reads the mask, gives pruned positions the
code of zero and feeds their weight back as rounding error, so pruning and quantization share
one error compensation and the zeros stay (``tests/prune/test_prune_pass.py``). ``prune`` after
a quantizer is refused: the codes would not match the pruned weights.

``structure: heads | channels | layers`` instead removes whole key/value head groups, MLP
channels or decoder layers, ranked by calibration activations, and leaves a physically smaller
model whose config says so (:mod:`compress.prune.structured`); ``sparsity`` is then the fraction
of that structure removed, or ``remove`` a count.

Example recipe entries (quote N:M patterns: YAML reads ``2:4`` as the number 124)::

    calibration: {dataset: builtin:wiki, samples: 128, seq_len: 512}
    passes:
      - {pass: prune, method: sparsegpt, pattern: "2:4"}
    # or, structured:
      - {pass: prune, structure: channels, sparsity: 0.3333}
      - {pass: prune, structure: layers, remove: 2}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from compress.errors import PassError
from compress.ir import SparsityMask, attach, get_quantized
from compress.prune.allocation import allocate_sparsity, inside_layer, outlier_ratios
from compress.prune.masks import nm_mask, parse_pattern, pruned_per_row, row_mask
from compress.prune.sparsegpt_math import accumulate_gram, sparsegpt_prune
from compress.prune.structured import prune_structured
from compress.prune.wanda_math import accumulate_squares, wanda_mask
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.sequential import for_each_layer, run_sequential
from compress.utils.hooks import capture_inputs
from compress.utils.modules import select_decoder_linears

__all__ = ["PruneConfig", "prune"]


class PruneConfig(PassConfig):
    """Settings of the ``prune`` pass."""

    method: Literal["magnitude", "wanda", "sparsegpt"] | None = Field(
        default=None,
        description="structure weights: importance score (and, for sparsegpt, weight update); "
        "default wanda",
    )
    sparsity: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="fraction of each row's weights set to zero (unstructured; default 0.5); "
        "with an N:M pattern it is 1 - N/M and may be left out",
    )
    pattern: str = Field(
        default="unstructured",
        description="'unstructured' or 'N:M' (N kept in every M input columns), e.g. '2:4'",
    )
    targets: list[str] | None = Field(
        default=None,
        description="glob patterns of module names; default: every Linear in decoder blocks",
    )
    ignore: list[str] = Field(default_factory=list, description="glob patterns to leave as is")
    block_size: int = Field(
        default=128, gt=0, description="sparsegpt: columns per mask-selection / lazy-update block"
    )
    dampening: float = Field(
        default=0.01, gt=0, le=1, description="sparsegpt: fraction of mean(diag H) added to it"
    )
    batch_size: int = Field(default=8, gt=0, description="calibration samples per forward")
    structure: Literal["weights", "heads", "channels", "layers"] = Field(
        default="weights",
        description="'weights': single weights (unstructured or N:M, the model keeps its shape); "
        "'heads' (whole key/value groups with their query heads), 'channels' (MLP channels), "
        "'layers' (decoder layers): remove whole structures, the model gets smaller",
    )
    remove: int | None = Field(
        default=None,
        gt=0,
        description="structured: how many key/value groups (per layer), MLP channels (per layer) "
        "or layers to remove; instead of sparsity",
    )
    score: Literal["l2", "mean_abs"] | None = Field(
        default=None,
        description="structure heads/channels: aggregate of |activation| over calibration tokens "
        "that ranks them (default l2); layers are ranked by block influence",
    )
    allocation: Literal["uniform", "owl"] = Field(
        default="uniform",
        description="unstructured wanda/sparsegpt: the same sparsity in every decoder layer, or "
        "owl: layers with more outlier scores pruned less, the mean kept (OWL)",
    )
    owl_threshold: float = Field(
        default=5.0, gt=1.0, description="owl: a score is an outlier above this times the mean"
    )
    owl_spread: float = Field(
        default=0.08,
        ge=0.0,
        lt=0.5,
        description="owl: layer sparsities span the target plus or minus this",
    )

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_text(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(
                f"pattern {value} is a number: YAML reads an unquoted N:M as base 60 "
                "(2:4 is 124); quote it, e.g. pattern: '2:4'"
            )
        if isinstance(value, str):
            parse_pattern(value)  # ValueError names the value
        return value

    @model_validator(mode="after")
    def _allocation_keys(self) -> PruneConfig:
        if self.allocation == "uniform":
            for key, default in (("owl_threshold", 5.0), ("owl_spread", 0.08)):
                if getattr(self, key) != default:
                    raise ValueError(
                        f"{key} {getattr(self, key)!r} applies to allocation: owl only; set "
                        "allocation: owl or leave it out"
                    )
            return self
        if self.structure != "weights" or self.pattern != "unstructured":
            what = (
                f"structure {self.structure!r}"
                if self.structure != "weights"
                else (f"pattern {self.pattern!r} (every row keeps N of M: nothing to allocate)")
            )
            raise ValueError(f"allocation owl applies to unstructured pruning, not {what}")
        if self.method == "magnitude":
            raise ValueError(
                "allocation owl ranks layers by activation-weighted (Wanda) scores; use method "
                "wanda or sparsegpt, which calibrate"
            )
        return self

    @model_validator(mode="after")
    def _structure_keys(self) -> PruneConfig:
        if self.structure == "weights":
            for key in ("remove", "score"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{key} {getattr(self, key)!r} applies to structured pruning only; "
                        "add structure: heads, channels or layers (or leave it out)"
                    )
            return self
        where = f"structure {self.structure!r}"
        if self.pattern != "unstructured":
            raise ValueError(
                f"pattern {self.pattern!r} with {where}: an N:M pattern zeroes single weights, "
                f"{where} removes whole {self.structure}; leave pattern out (or drop structure "
                "for N:M sparsity)"
            )
        if self.method is not None:
            raise ValueError(
                f"method {self.method!r} with {where}: the method chooses single weights "
                f"(sparsegpt also updates them); {where} ranks whole {self.structure} by "
                "calibration activations; leave method out (score: l2 or mean_abs chooses the "
                "ranking)"
            )
        defaults: dict[str, Any] = {
            "targets": None,
            "ignore": [],
            "block_size": 128,
            "dampening": 0.01,
        }
        for key, default in defaults.items():
            if getattr(self, key) != default:
                raise ValueError(
                    f"{key} {getattr(self, key)!r} does not apply to {where}: every decoder "
                    "layer keeps the same widths; leave it out"
                )
        if self.sparsity is None and self.remove is None:
            raise ValueError(
                f"{where} needs how much to remove: sparsity (the fraction of {self.structure}, "
                "e.g. 0.25) or remove (a count, e.g. remove: 8)"
            )
        if self.sparsity is not None and self.remove is not None:
            raise ValueError(
                f"sparsity {self.sparsity} and remove {self.remove} both given with {where}; "
                "keep one"
            )
        if self.structure == "layers" and self.score is not None:
            raise ValueError(
                f"score {self.score!r} with {where}: layers are ranked by block influence "
                "(1 - cos of a layer's input and output); leave score out"
            )
        return self

    @model_validator(mode="after")
    def _sparsity_matches_pattern(self) -> PruneConfig:
        nm = parse_pattern(self.pattern)
        if nm is not None and self.sparsity is not None:
            implied = 1 - nm[0] / nm[1]
            if abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                    f"(which prunes {implied:g}); leave sparsity out with an N:M pattern"
                )
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def weight_method(self) -> Literal["magnitude", "wanda", "sparsegpt"]:
        """The weight-level method (wanda unless chosen)."""
        return self.method or "wanda"

    @property
    def fraction(self) -> float:
        """The fraction of weights each pruned row loses."""
        nm = self.nm
        if nm is not None:
            return 1 - nm[0] / nm[1]
        return 0.5 if self.sparsity is None else self.sparsity


@register_pass("prune", PruneConfig, calibrated=True)
def prune(model: nn.Module, config: PruneConfig, context: PassContext) -> PassReport:
    """Weight pruning (magnitude, Wanda, SparseGPT), unstructured or N:M; or structured."""
    if config.structure != "weights":
        return prune_structured(
            model,
            config.structure,
            context,
            fraction=config.sparsity,
            count=config.remove,
            score=config.score or "l2",
            batch_size=config.batch_size,
        )
    modules, skipped = select_decoder_linears(
        model,
        config.targets,
        config.ignore,
        pass_name="prune",
        why="prune works on decoder layers only",
    )
    _check_modules(modules, config)
    calibration = None
    if config.weight_method != "magnitude":
        calibration = context.require_calibration(f"prune (method {config.weight_method})")
    report = PassReport(name="prune", skipped=skipped)
    layer_sparsity: dict[str, float] = {}
    if config.allocation == "owl":
        assert calibration is not None  # the config refuses owl with magnitude
        layer_sparsity = _owl_allocation(model, modules, calibration, config, context, report)

    if calibration is None:

        def plain_step(index: int, layer_name: str, layer: nn.Module) -> None:
            for name, module in inside_layer(modules, layer_name).items():
                scores = module.weight.detach().to(torch.float32).abs()
                _apply(name, module, _mask(scores, config), None, config, report)

        for_each_layer(
            model,
            plain_step,
            description="prune layers",
            progress=context.progress,
            layers=context.layers,
            report=report,
        )
    else:

        def step(index: int, layer_name: str, layer: nn.Module, run: Callable[[], None]) -> None:
            mine = inside_layer(modules, layer_name)
            if not mine:
                return
            stats: dict[str, tuple[torch.Tensor | None, int]] = {}

            def collect(name: str, inputs: torch.Tensor) -> None:
                held, count = stats.get(name, (None, 0))
                if config.weight_method == "wanda":
                    stats[name] = (accumulate_squares(held, inputs), 1)
                else:
                    stats[name] = accumulate_gram(held, inputs, count)

            with capture_inputs(mine, collect):
                run()
            fraction = layer_sparsity.get(layer_name, config.fraction)
            for name, module in mine.items():
                held, count = stats.pop(name, (None, 0))
                if held is None or count == 0:
                    raise PassError(f"prune: layer {name} saw no calibration input")
                if config.weight_method == "wanda":
                    mask = wanda_mask(module.weight, held, fraction, config.nm)
                    _apply(name, module, mask, None, config, report)
                else:
                    result = sparsegpt_prune(
                        module.weight,
                        held,
                        sparsity=fraction,
                        nm=config.nm,
                        block_size=config.block_size,
                        dampening=config.dampening,
                    )
                    _apply(name, module, result.mask, result.weight, config, report)
                    report.per_module[name]["obs_loss"] = result.loss
                del held

        run_sequential(
            model,
            calibration,
            step,
            batch_size=config.batch_size,
            description=f"prune layers ({config.weight_method})",
            progress=context.progress,
            layers=context.layers,
            report=report,
        )
        report.metrics["calibration_tokens"] = float(calibration.numel())
    entries = report.per_module.values()
    kept = sum(e["kept"] for e in entries)
    total = sum(e["weights"] for e in entries)
    report.metrics["sparsity"] = 1 - kept / total
    report.metrics["mean_relative_change"] = sum(e["relative_change"] for e in entries) / len(
        entries
    )
    return report


def _owl_allocation(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    calibration: torch.Tensor,
    config: PruneConfig,
    context: PassContext,
    report: PassReport,
) -> dict[str, float]:
    """Each decoder layer's sparsity under OWL, also written to the report."""
    found = outlier_ratios(
        model,
        modules,
        calibration,
        context,
        threshold=config.owl_threshold,
        batch_size=config.batch_size,
    )
    names = list(found)
    ratios = [found[name][0] for name in names]
    sparsities = allocate_sparsity(
        ratios, [found[name][1] for name in names], config.fraction, config.owl_spread
    )
    report.metrics["owl_min_layer_sparsity"] = min(sparsities)
    report.metrics["owl_max_layer_sparsity"] = max(sparsities)
    report.notes.append(
        "owl layer sparsities: "
        + ", ".join(
            f"{name.rsplit('.', 1)[-1]}: {s:.3f} (outliers {100 * r:.2f}%)"
            for name, s, r in zip(names, sparsities, ratios, strict=True)
        )
    )
    return dict(zip(names, sparsities, strict=True))


def _check_modules(modules: dict[str, nn.Linear], config: PruneConfig) -> None:
    """Fail before any work, naming the layer: shapes the pattern cannot tile, quantized
    weights."""
    nm = config.nm
    if nm is not None and config.weight_method == "sparsegpt" and config.block_size % nm[1]:
        raise PassError(
            f"prune: block_size {config.block_size} is not a multiple of M={nm[1]} "
            f"(pattern {config.pattern})",
            hint=f"use a block_size divisible by {nm[1]}, e.g. 128",
        )
    for name, module in modules.items():
        if get_quantized(module) is not None:
            raise PassError(
                f"prune: layer {name} is already quantized; pruning now would leave its codes "
                "unpruned",
                hint="put the prune pass before rtn/gptq in the recipe",
            )
        in_features = module.weight.shape[1]
        if nm is not None and in_features % nm[1]:
            raise PassError(
                f"prune: layer {name}: pattern {config.pattern} needs in_features divisible by "
                f"{nm[1]}, but it has {in_features}",
                hint="use another N:M pattern or add the layer to ignore",
            )


def _mask(scores: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    nm = config.nm
    if nm is not None:
        return nm_mask(scores, *nm)
    return row_mask(scores, pruned_per_row(scores.shape[1], config.fraction))


def _apply(
    name: str,
    module: nn.Linear,
    mask: torch.Tensor,
    weight: torch.Tensor | None,
    config: PruneConfig,
    report: PassReport,
) -> None:
    """Zero the pruned weights in place (or set the reconstructed ``weight``), attach the mask."""
    original = module.weight.detach().to(torch.float32).clone()
    with torch.no_grad():
        if weight is not None:
            module.weight.copy_(weight.to(module.weight.dtype))
        module.weight.mul_(mask.to(module.weight.dtype))
    attach(module, SparsityMask(mask.cpu(), config.pattern))
    change = (module.weight.detach().to(torch.float32) - original).norm()
    report.per_module[name] = {
        "kept": float(mask.sum()),
        "weights": float(mask.numel()),
        "relative_change": float(change / original.norm().clamp_min(1e-30)),
    }
    report.touched.append(name)
