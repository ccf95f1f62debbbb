"""Per-layer sparsity allocation by outlier ratio (OWL: Yin et al., "Outlier Weighed Layerwise
Sparsity", 2023).

A uniform 50% treats every decoder layer alike, but layers differ in how many weights matter
far more than the rest. OWL counts, per decoder layer, the share of Wanda scores
``|W_ij| · ‖x_j‖₂`` (over all the layer's pruned Linears) above ``threshold`` times their mean,
and prunes layers with more such outliers less: sparsities spread over ``target ± spread``,
linearly in the outlier ratio, and shifted so that the parameter-weighted mean is exactly the
target (the model loses the same number of weights as with the uniform rule).

The ratios come from the unpruned model's activations, in one sweep over the calibration
windows before pruning starts (what the paper does); :func:`outlier_ratios` runs it without
checkpointing, so an offloading or resumable run is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from compress.errors import PassError
from compress.prune.wanda_math import accumulate_squares, wanda_scores
from compress.registry import LayerAccess, PassContext, PassReport
from compress.sequential import run_sequential
from compress.utils.hooks import capture_inputs

__all__ = ["allocate_sparsity", "inside_layer", "outlier_ratio", "outlier_ratios"]


def inside_layer(modules: dict[str, nn.Linear], layer_name: str) -> dict[str, nn.Linear]:
    """The entries of ``modules`` that belong to decoder layer ``layer_name``."""
    return {n: m for n, m in modules.items() if n.startswith(layer_name + ".")}


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Share of the entries of ``scores`` (one layer's Wanda scores, any shapes) above
    ``threshold`` times their common mean."""
    flat = torch.cat([s.reshape(-1).to(torch.float32) for s in scores])
    return float((flat > threshold * flat.mean()).to(torch.float32).mean())


def allocate_sparsity(
    ratios: Sequence[float], weights: Sequence[int], target: float, spread: float
) -> list[float]:
    """Per-layer sparsities in ``[target - spread, target + spread]`` (before the shift),
    decreasing linearly with the outlier ``ratios``, shifted so that their mean weighted by each
    layer's prunable ``weights`` is ``target``; clamped to ``[0, 0.99]``."""
    if len(ratios) != len(weights) or not ratios:
        raise ValueError("one outlier ratio and one weight count per layer are needed")
    low, high = min(ratios), max(ratios)
    if high == low:
        return [target] * len(ratios)
    # most outliers -> target - spread, fewest -> target + spread
    raw = [target + spread * (1 - 2 * (r - low) / (high - low)) for r in ratios]
    total = sum(weights)
    mean = sum(s * w for s, w in zip(raw, weights, strict=True)) / total
    return [min(0.99, max(0.0, s - (mean - target))) for s in raw]


class _Passthrough(LayerAccess):
    """Reaches layers through the pass's own access (offloading keeps working) but checkpoints
    and restores nothing: the sweep that measures ratios changes no layer."""

    def __init__(self, inner: LayerAccess) -> None:
        self.inner = inner

    def load(self, index: int, layer: nn.Module, *, codes_only: bool = False) -> None:
        self.inner.load(index, layer, codes_only=codes_only)

    def unload(self, index: int, layer: nn.Module) -> None:
        self.inner.unload(index, layer)

    @contextmanager
    def embedding(self, model: nn.Module) -> Iterator[None]:
        with self.inner.embedding(model):
            yield

    def finish(
        self,
        index: int,
        name: str,
        layer: nn.Module,
        hidden: list[torch.Tensor] | None,
        report: PassReport | None,
    ) -> None:
        self.inner.unload(index, layer)


def outlier_ratios(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    calibration: torch.Tensor,
    context: PassContext,
    *,
    threshold: float,
    batch_size: int,
) -> dict[str, tuple[float, int]]:
    """``{decoder layer name: (outlier ratio, prunable weights)}`` of the unpruned model, for
    the layers holding some of ``modules``."""
    found: dict[str, tuple[float, int]] = {}

    def step(index: int, layer_name: str, layer: nn.Module, run: Callable[[], None]) -> None:
        mine = inside_layer(modules, layer_name)
        if not mine:
            return
        squares: dict[str, torch.Tensor] = {}

        def collect(name: str, inputs: torch.Tensor) -> None:
            squares[name] = accumulate_squares(squares.get(name), inputs)

        with capture_inputs(mine, collect):
            run()
        missing = [name for name in mine if name not in squares]
        if missing:
            raise PassError(f"prune: layer {missing[0]} saw no calibration input")
        scores = [wanda_scores(module.weight, squares[name]) for name, module in mine.items()]
        count = sum(module.weight.numel() for module in mine.values())
        found[layer_name] = (outlier_ratio(scores, threshold), count)

    run_sequential(
        model,
        calibration,
        step,
        batch_size=batch_size,
        description="prune: outlier ratios (owl)",
        progress=context.progress,
        layers=_Passthrough(context.layers),
        changes_layers=False,
    )
    return found
