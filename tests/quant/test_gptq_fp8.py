"""GPTQ onto the FP8 grid: E4M3 / E5M2 codes with per-tensor, per-channel or 2-D block scales."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.formats.fp8 import FP8Format, dequantize_fp8, quantize_fp8
from compress.quant.gptq import GPTQConfig, gptq
from compress.quant.gptq_math import GPTQResult, gptq_quantize
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import parse_recipe
from compress.registry import PassContext
from tests.quant.test_gptq import calibration, module_inputs, summed_output_error
from tests.quant.test_gptq_math import IN, Layer, make_layer

FORMATS = [
    FP8Format("e4m3", "channel"),
    FP8Format("e4m3", "tensor"),
    FP8Format("e4m3", "block", 48),
    FP8Format("e5m2", "channel"),
    FP8Format("e4m3", "mx"),
]


@pytest.fixture(scope="module")
def layer() -> Layer:
    return make_layer()


def dequantized(result: GPTQResult, fmt: FP8Format) -> torch.Tensor:
    assert result.zeros is None
    return dequantize_fp8(result.codes, result.scales, fmt)


def rtn_weight(weight: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    codes, scales, _ = quantize_fp8(weight, fmt)
    return dequantize_fp8(codes, scales, fmt)


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_output_error_beats_rtn(layer, fmt, act_order):
    result = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order)
    gptq = layer.output_error(dequantized(result, fmt))
    assert gptq < 0.8 * layer.output_error(rtn_weight(layer.weight, fmt))


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_diagonal_hessian_is_exactly_rtn(layer, fmt, act_order):
    """Nothing to compensate: the codes and scales are the reference quantizer's, bit for bit."""
    diagonal = torch.linspace(3.0, 0.5, IN)[torch.randperm(IN, generator=torch.Generator())]
    result = gptq_quantize(layer.weight, torch.diag(diagonal), fmt, act_order=act_order)
    codes, scales, _ = quantize_fp8(layer.weight, fmt)
    assert torch.equal(result.codes, codes) and torch.equal(result.scales, scales)


@pytest.mark.parametrize("fmt", FORMATS[:3], ids=str)
def test_error_is_the_quadratic_loss_of_the_result(layer, fmt):
    damp = 0.01
    result = gptq_quantize(layer.weight, layer.hessian, fmt, damp=damp)
    delta = layer.weight - dequantized(result, fmt)
    diagonal = torch.diagonal(layer.hessian)
    damped = layer.hessian + torch.diag(torch.full_like(diagonal, damp * float(diagonal.mean())))
    loss = float(torch.einsum("oi,ij,oj->", delta, damped, delta)) / 2
    assert result.error == pytest.approx(loss, rel=1e-3)


def test_pruned_weights_stay_exactly_zero(layer):
    fmt = FORMATS[0]
    keep = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    result = gptq_quantize(layer.weight, layer.hessian, fmt, keep=keep, act_order=True)
    assert bool((dequantized(result, fmt)[~keep] == 0).all())


def test_partial_blocks_and_saturation():
    """Block 48 over 5 x 70 leaves partial edge blocks; no code is ever NaN or inf, although
    error feedback pushes weights past the block's range."""
    odd = make_layer(seed=1, out_features=5, in_features=70)
    fmt = FP8Format("e4m3", "block", 48)
    result = gptq_quantize(odd.weight, odd.hessian, fmt)
    assert result.scales.shape == fmt.scale_shape(5, 70)
    weight = dequantized(result, fmt)
    assert torch.isfinite(weight).all()
    assert odd.output_error(weight) < odd.output_error(rtn_weight(odd.weight, fmt))


def test_the_pass_beats_rtn_on_the_tiny_model(tiny_llama):
    ids = calibration()
    inputs = module_inputs(tiny_llama, ids)
    by_rtn, by_gptq = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    rtn(by_rtn, RTNConfig(format="fp8_e4m3"), PassContext())
    report = gptq(by_gptq, GPTQConfig(format="fp8_e4m3"), PassContext(calibration=ids))
    assert len(report.touched) == 14
    errors = {
        which: summed_output_error(
            tiny_llama, model, inputs, lambda r: r.fmt == FP8Format("e4m3", "channel")
        )
        for which, model in (("rtn", by_rtn), ("gptq", by_gptq))
    }
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_recipes_take_fp8_formats():
    base = {"model": "smollm2-135m", "calibration": {"dataset": "builtin:wiki"}}
    passes = [{"pass": "gptq", "format": "fp8_e4m3", "scaling": "block", "scale_block": 64}]
    recipe = parse_recipe({**base, "passes": passes})
    assert recipe.passes[0].formats() == [FP8Format("e4m3", "block", 64)]
