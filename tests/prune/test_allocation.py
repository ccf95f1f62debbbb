"""OWL per-layer sparsity allocation: the arithmetic, the pass with ``allocation: owl`` on a
tiny model (the layer with outliers is pruned least, the mean is kept), offload, and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from compress.ir import SparsityMask, records
from compress.pipeline import Pipeline
from compress.prune.allocation import allocate_sparsity, outlier_ratio
from compress.prune.prune import PruneConfig, prune
from compress.recipe import CalibrationSpec, ModelSpec
from compress.registry import PassContext


def calibration(samples=16, length=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (samples, length), generator=generator)


def layer_sparsity(model) -> dict[int, float]:
    kept: dict[int, list[float]] = {}
    for name, record in records(model, SparsityMask):
        layer = int(name.split(".")[2])
        counts = kept.setdefault(layer, [0.0, 0.0])
        counts[0] += float(record.mask.sum())
        counts[1] += record.mask.numel()
    return {layer: 1 - k / n for layer, (k, n) in sorted(kept.items())}


def test_allocation_keeps_the_weighted_mean_and_orders_by_ratio():
    ratios, weights = [0.01, 0.05, 0.02, 0.03], [100, 100, 300, 100]
    sparsities = allocate_sparsity(ratios, weights, target=0.5, spread=0.1)
    mean = sum(s * w for s, w in zip(sparsities, weights, strict=True)) / sum(weights)
    assert mean == pytest.approx(0.5, abs=1e-12)
    # more outliers, lower sparsity; the extremes 2 * spread apart
    order = sorted(range(4), key=lambda i: ratios[i])
    assert [sparsities[i] for i in order] == sorted(sparsities, reverse=True)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.2)


def test_equal_ratios_or_no_spread_give_the_uniform_rule():
    assert allocate_sparsity([0.02] * 3, [1, 2, 3], 0.5, 0.1) == [0.5] * 3
    assert allocate_sparsity([0.01, 0.2], [1, 1], 0.5, 0.0) == [0.5, 0.5]


def test_allocation_is_clamped():
    sparsities = allocate_sparsity([0.0, 1.0], [1, 1], target=0.97, spread=0.2)
    assert max(sparsities) <= 0.99 and min(sparsities) >= 0.0


def test_outlier_ratio_counts_entries_above_threshold_times_the_mean():
    scores = [torch.ones(10, 10), torch.tensor([[100.0, 1.0]])]
    # mean = (100 + 100 + 1 + 100) / 102 ~ 2.95: one entry above 5x that
    assert outlier_ratio(scores, 5.0) == pytest.approx(1 / 102)


def test_owl_prunes_the_layer_with_outliers_least_and_keeps_the_mean(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    # one in 25 of layer 1's gate_proj weights 8x larger: outlier ratio 0.86% against 0.54% for
    # layer 0 (far larger factors raise the layer's mean score so much that fewer entries count)
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight.view(-1)[::25] *= 8
    uniform = copy.deepcopy(model)
    context = PassContext(calibration=calibration())
    report = prune(model, PruneConfig(method="wanda", allocation="owl", owl_spread=0.1), context)
    prune(uniform, PruneConfig(method="wanda"), PassContext(calibration=calibration()))
    found = layer_sparsity(model)
    assert found[1] == min(found.values())
    assert max(found.values()) - min(found.values()) == pytest.approx(0.2, abs=0.01)
    # the same number of weights gone as the uniform rule (up to rounding per row)
    assert report.metrics["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert set(layer_sparsity(uniform).values()) == {0.5}
    assert any(note.startswith("owl layer sparsities") for note in report.notes)
    assert report.metrics["owl_min_layer_sparsity"] == pytest.approx(found[1], abs=0.005)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_offloaded_run_writes_the_same_bytes(model_dir, text_file, tmp_path, method):
    passes = [PruneConfig(method=method, allocation="owl", block_size=32)]
    outputs = {}
    for offload in (False, True):
        out = tmp_path / f"offload-{offload}"
        Pipeline(
            ModelSpec(name=str(model_dir)),
            passes,
            calibration=CalibrationSpec(dataset=str(text_file), samples=8, seq_len=32),
            export=out,
            offload=offload,
        ).run()
        outputs[offload] = {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}
    assert outputs[True] == outputs[False]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"allocation": "owl", "pattern": "2:4"}, "applies to unstructured pruning"),
        ({"allocation": "owl", "method": "magnitude"}, "use method wanda or sparsegpt"),
        ({"allocation": "owl", "structure": "layers", "remove": 1}, "unstructured pruning"),
        ({"owl_spread": 0.1}, "applies to allocation: owl only"),
        ({"allocation": "owl", "owl_spread": 0.6}, "owl_spread"),
        ({"allocation": "owl", "owl_threshold": 1.0}, "owl_threshold"),
    ],
)
def test_bad_allocation_settings_name_the_key(settings, message):
    with pytest.raises(ValidationError, match=message):
        PruneConfig(**settings)
