"""GPTQ onto the MXFP6 grids (E2M3, E3M2): the 4-bit table formats' path with a 64-value grid."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.errors import RecipeError
from compress.formats.fp6 import VARIANTS, FP6Format, dequantize_fp6, quantize_fp6
from compress.quant.awq import AWQConfig
from compress.quant.gptq import GPTQConfig, gptq
from compress.quant.gptq_math import GPTQResult, gptq_quantize
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import parse_recipe
from compress.registry import PassContext
from tests.quant.test_gptq import calibration, module_inputs, summed_output_error
from tests.quant.test_gptq_math import IN, Layer, make_layer

FORMATS = [FP6Format(v) for v in VARIANTS]


@pytest.fixture(scope="module")
def layer() -> Layer:
    return make_layer()


def dequantized(result: GPTQResult, fmt: FP6Format) -> torch.Tensor:
    return dequantize_fp6(result.codes, result.scales, result.zeros, fmt)


def rtn_weight(weight: torch.Tensor, fmt: FP6Format) -> torch.Tensor:
    return dequantize_fp6(*quantize_fp6(weight, fmt), fmt)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_output_error_beats_rtn(layer, fmt, act_order, observer):
    """Correlated inputs (rank-8 signal, six loud channels): the error feedback pays."""
    result = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order, observer=observer)
    assert result.codes.dtype == torch.uint8 and int(result.codes.max()) < 64
    assert result.scales.dtype == torch.uint8 and result.zeros is None
    gptq_error = layer.output_error(dequantized(result, fmt))
    rtn_error = layer.output_error(rtn_weight(layer.weight, fmt))
    assert gptq_error < 0.6 * rtn_error


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_every_weight_lands_on_the_grid(layer, fmt, act_order):
    """GPTQ's weights are table values times their block's E8M0 scale: requantizing them with
    the same scales gives the same weights back."""
    result = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order)
    weight = dequantized(result, fmt)
    scale = fmt.effective_scales(result.scales, None).repeat_interleave(32, dim=1)[:, :IN]
    assert torch.equal(fmt.decode(fmt.encode(weight, scale)) * scale, weight)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_diagonal_hessian_is_exactly_rtn_on_the_grid(layer, fmt, act_order, observer):
    """Nothing to compensate: codes and scales are the reference's, so GPTQ rounds with the
    format's own (non-uniform) grid and scales."""
    diagonal = torch.linspace(3.0, 0.5, IN)[torch.randperm(IN, generator=torch.Generator())]
    result = gptq_quantize(
        layer.weight, torch.diag(diagonal), fmt, act_order=act_order, observer=observer
    )
    clip = fmt.search_clip(layer.weight) if observer == "mse" else 1.0
    codes, scales, _ = quantize_fp6(layer.weight, fmt, clip_ratio=clip)
    assert torch.equal(result.codes, codes) and torch.equal(result.scales, scales)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_error_is_the_quadratic_loss_of_the_result(layer, fmt):
    damp = 0.01
    result = gptq_quantize(layer.weight, layer.hessian, fmt, damp=damp)
    diagonal = torch.diagonal(layer.hessian)
    damped = layer.hessian + torch.diag(torch.full_like(diagonal, damp * float(diagonal.mean())))
    delta = (layer.weight - dequantized(result, fmt)).double()
    loss = float(torch.einsum("oi,ij,oj->", delta, damped.double(), delta)) / 2
    assert result.error == pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_pruned_weights_stay_exactly_zero_and_widths_may_be_awkward(fmt):
    odd = make_layer(seed=1, out_features=5, in_features=70)
    keep = torch.rand(odd.weight.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    result = gptq_quantize(odd.weight, odd.hessian, fmt, keep=keep, act_order=True)
    assert result.scales.shape == (5, 3)
    assert bool((dequantized(result, fmt)[~keep] == 0).all())
    plain = gptq_quantize(odd.weight, odd.hessian, fmt)
    assert odd.output_error(dequantized(plain, fmt)) < odd.output_error(rtn_weight(odd.weight, fmt))


# ------------------------------------------------------------------------------ the pass


@pytest.mark.parametrize("variant", VARIANTS)
def test_gptq_pass_beats_rtn_on_the_tiny_model(tiny_llama, variant):
    """Summed over the decoder Linears, each layer's output error on the original inputs."""
    ids = calibration()
    inputs = module_inputs(tiny_llama, ids)
    by_rtn, by_gptq = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    name = f"mxfp6_{variant}"
    rtn(by_rtn, RTNConfig(format=name), PassContext())
    report = gptq(by_gptq, GPTQConfig(format=name, act_order=True), PassContext(calibration=ids))
    assert len(report.touched) == 14

    def accept(record):
        return record.fmt == FP6Format(variant) and record.zeros is None

    errors = {
        which: summed_output_error(tiny_llama, model, inputs, accept)
        for which, model in (("rtn", by_rtn), ("gptq", by_gptq))
    }
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_and_awq_recipes_take_mxfp6_formats():
    base = {"model": "smollm2-135m", "calibration": {"dataset": "builtin:wiki"}}
    passes = [
        {"pass": "awq", "format": "mxfp6_e3m2"},
        {"pass": "gptq", "format": "mxfp6_e3m2", "observer": "mse"},
    ]
    recipe = parse_recipe({**base, "passes": passes})
    assert isinstance(recipe.passes[0], AWQConfig)
    assert recipe.passes[0].weight_format() == FP6Format("e3m2")
    assert recipe.passes[1].formats() == [FP6Format("e3m2")]
    bad = {"pass": "gptq", "format": "mxfp6_e2m3", "group_size": 32}
    with pytest.raises(RecipeError, match=r"passes\[0\]\.group_size"):
        parse_recipe({**base, "passes": [bad]})
