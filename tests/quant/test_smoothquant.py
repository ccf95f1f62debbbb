"""The ``smoothquant`` pass: the scales' formula, an exact fold, flatter activations, and W8A8
INT8 error that it lowers on a model with outlier channels."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.errors import PassError
from compress.quant.act_quant import ActQuantConfig, act_quant
from compress.quant.rtn import RTNConfig, rtn
from compress.quant.smoothquant import SmoothQuantConfig, smooth_scales, smoothquant
from compress.registry import PassContext


def calibration(samples=8, length=32, seed=0):
    return torch.randint(0, 256, (samples, length), generator=torch.Generator().manual_seed(seed))


def with_outlier_channels(model):
    """A few residual channels much larger than the rest, as trained LLMs have."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40]] *= 40.0
    return model


def test_scales_follow_the_formula():
    x_max = torch.tensor([4.0, 1.0, 0.0, 9.0])
    w1 = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.25, 1.0, 1.0, -1.0]])
    w2 = torch.tensor([[-4.0, 0.5, 0.0, 0.25]])
    s = smooth_scales(x_max, [w1, w2], alpha=0.5)
    w_max = torch.tensor([4.0, 2.0, 3.0, 1.0])
    expected = x_max.sqrt() / w_max.sqrt()
    expected[2] = 1.0  # no activation seen: left alone
    assert torch.allclose(s, expected)


def test_fold_keeps_the_function_and_flattens_the_activations(tiny_llama):
    model = with_outlier_channels(tiny_llama)
    reference = copy.deepcopy(model)
    report = smoothquant(model, SmoothQuantConfig(), PassContext(calibration=calibration()))
    ids = calibration(2, 20, seed=5)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    assert report.metrics["max_fold_error"] < 1e-4
    before = report.metrics["mean_activation_peak_to_mean_before"]
    assert report.metrics["mean_activation_peak_to_mean_after"] < 0.5 * before
    assert "model.layers.0.input_layernorm" in report.touched
    assert "model.layers.0.mlp.up_proj" in report.touched  # down_proj's producer
    # o_proj reads repeated value heads (GQA): skipped, with the reason
    assert any("grouped-query" in why for why in report.skipped.values())


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p = torch.log_softmax(reference.double(), -1)
    q = torch.log_softmax(other.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def w8a8(model, smooth: bool):
    model = copy.deepcopy(model)
    if smooth:
        smoothquant(model, SmoothQuantConfig(), PassContext(calibration=calibration()))
    act_quant(model, ActQuantConfig(format="int8"), PassContext())
    rtn(model, RTNConfig(bits=8, group_size=None), PassContext())
    return model


def test_smoothing_lowers_w8a8_int8_error_on_outlier_channels(tiny_llama):
    model = with_outlier_channels(tiny_llama)
    ids = calibration(4, 32, seed=9)
    with torch.no_grad():
        reference = model(ids).logits
        plain = kl(reference, w8a8(model, smooth=False)(ids).logits)
        smoothed = kl(reference, w8a8(model, smooth=True)(ids).logits)
    assert smoothed < 0.5 * plain


def test_after_act_quant_is_refused(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    act_quant(model, ActQuantConfig(format="int8"), PassContext())
    with pytest.raises(PassError, match="put smoothquant before act_quant"):
        smoothquant(model, SmoothQuantConfig(), PassContext(calibration=calibration()))


def test_shipped_w8a8_int8_recipe_on_a_tiny_model(tmp_path):
    """recipes/smollm2-w8a8-int8.yaml's passes on a tiny model, through an export's reload."""
    from pathlib import Path

    from compress.recipe import load_recipe
    from compress.utils.activations import quantizes_input
    from tests.conftest import run_passes_on_tiny_model

    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "smollm2-w8a8-int8.yaml")
    assert [p.__class__.__name__ for p in recipe.passes] == [
        "SmoothQuantConfig",
        "ActQuantConfig",
        "GPTQConfig",
    ]
    result, loaded = run_passes_on_tiny_model(recipe.passes, tmp_path, seed=4)
    assert quantizes_input(loaded.model.layers[1].self_attn.k_proj) == "int8"
    ids = calibration(2, 16, seed=2)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, rtol=1e-3, atol=1e-3)
