"""GPTQ onto the 4-bit table grids (NF4, bitsandbytes FP4, MXFP4, NVFP4)."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.errors import RecipeError
from compress.formats.fp4 import VARIANTS, FP4Format, dequantize_fp4, quantize_fp4
from compress.quant.gptq import GPTQConfig, gptq
from compress.quant.gptq_math import GPTQResult, gptq_quantize
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import parse_recipe
from compress.registry import PassContext
from tests.quant.test_gptq import calibration, module_inputs, summed_output_error
from tests.quant.test_gptq_math import IN, Layer, make_layer

FORMATS = [FP4Format(v) for v in VARIANTS] + [FP4Format("nf4", 32)]


@pytest.fixture(scope="module")
def layer() -> Layer:
    return make_layer()


def dequantized(result: GPTQResult, fmt: FP4Format) -> torch.Tensor:
    return dequantize_fp4(result.codes, result.scales, result.zeros, fmt)


def rtn_weight(weight: torch.Tensor, fmt: FP4Format) -> torch.Tensor:
    return dequantize_fp4(*quantize_fp4(weight, fmt), fmt)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_output_error_beats_rtn(layer, fmt, act_order, observer):
    result = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order, observer=observer)
    gptq_error = layer.output_error(dequantized(result, fmt))
    rtn_error = layer.output_error(rtn_weight(layer.weight, fmt))
    assert gptq_error < 0.6 * rtn_error


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_diagonal_hessian_is_exactly_rtn_on_the_grid(layer, fmt, act_order, observer):
    """Nothing to compensate: codes and scales are the reference's, so GPTQ rounds with the
    format's own grid and scales (an integer grid, or a scale chosen otherwise, would not)."""
    diagonal = torch.linspace(3.0, 0.5, IN)[torch.randperm(IN, generator=torch.Generator())]
    result = gptq_quantize(
        layer.weight, torch.diag(diagonal), fmt, act_order=act_order, observer=observer
    )
    clip = fmt.search_clip(layer.weight) if observer == "mse" else 1.0
    codes, scales, tensor_scale = quantize_fp4(layer.weight, fmt, clip_ratio=clip)
    assert torch.equal(result.codes, codes)
    assert torch.equal(result.scales, scales) and result.scales.dtype == fmt.scale_dtype
    assert (result.zeros is None and tensor_scale is None) or torch.equal(
        result.zeros, tensor_scale
    )


@pytest.mark.parametrize("fmt", FORMATS[:4], ids=str)
def test_error_is_the_quadratic_loss_of_the_result(layer, fmt):
    damp = 0.01
    result = gptq_quantize(layer.weight, layer.hessian, fmt, damp=damp)
    diagonal = torch.diagonal(layer.hessian)
    damped = layer.hessian + torch.diag(torch.full_like(diagonal, damp * float(diagonal.mean())))
    delta = (layer.weight - dequantized(result, fmt)).double()
    loss = float(torch.einsum("oi,ij,oj->", delta, damped.double(), delta)) / 2
    assert result.error == pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize("block_size", [1, 7, 50])
@pytest.mark.parametrize("fmt", [FP4Format("nf4"), FP4Format("nvfp4")], ids=str)
def test_result_does_not_depend_on_block_size(layer, fmt, block_size):
    """A scale block straddling lazy-update blocks still sees the current weights."""
    reference = gptq_quantize(layer.weight, layer.hessian, fmt)
    result = gptq_quantize(layer.weight, layer.hessian, fmt, block_size=block_size)
    assert float((result.codes == reference.codes).float().mean()) > 0.999
    assert result.error == pytest.approx(reference.error, rel=1e-3)


@pytest.mark.parametrize("fmt", FORMATS[:4], ids=str)
def test_pruned_weights_stay_exactly_zero(layer, fmt):
    keep = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    result = gptq_quantize(layer.weight, layer.hessian, fmt, keep=keep, act_order=True)
    weight = dequantized(result, fmt)
    assert bool((weight[~keep] == 0).all())


def test_awkward_width_gives_partial_blocks():
    odd = make_layer(seed=1, out_features=5, in_features=70)
    for fmt in FORMATS:
        result = gptq_quantize(odd.weight, odd.hessian, fmt)
        assert result.codes.shape == (5, 70)
        assert result.scales.shape == fmt.scale_shape(5, 70)
        assert odd.output_error(dequantized(result, fmt)) < odd.output_error(
            rtn_weight(odd.weight, fmt)
        )


# ------------------------------------------------------------------------------ the pass


@pytest.mark.parametrize("variant", VARIANTS)
def test_gptq_pass_beats_rtn_on_the_tiny_model(tiny_llama, variant):
    """Summed over the decoder Linears, each layer's output error on the original inputs."""
    ids = calibration()
    inputs = module_inputs(tiny_llama, ids)
    by_rtn, by_gptq = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    rtn(by_rtn, RTNConfig(format=variant), PassContext())
    report = gptq(by_gptq, GPTQConfig(format=variant, act_order=True), PassContext(calibration=ids))
    assert len(report.touched) == 14

    def accept(record):  # the format asked for; a tensor scale (in zeros) only for nvfp4
        return record.fmt == FP4Format(variant) and (record.zeros is not None) == (
            variant == "nvfp4"
        )

    errors = {
        which: summed_output_error(tiny_llama, model, inputs, accept)
        for which, model in (("rtn", by_rtn), ("gptq", by_gptq))
    }
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_recipes_take_fp4_formats():
    base = {"model": "smollm2-135m", "calibration": {"dataset": "builtin:wiki"}}
    recipe = parse_recipe(
        {**base, "passes": [{"pass": "gptq", "format": "nf4", "scale_block": 32}]}
    )
    assert recipe.passes[0].formats() == [FP4Format("nf4", 32)]
    with pytest.raises(RecipeError, match=r"passes\[0\]\.bits"):
        parse_recipe({**base, "passes": [{"pass": "gptq", "format": "mxfp4", "bits": 4}]})
