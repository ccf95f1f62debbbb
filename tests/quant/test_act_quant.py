"""The ``act_quant`` pass and its run-time rounding (W8A8): per-token INT8 / FP8 against a
direct computation, hooks in memory and after an export's reload, calibration seeing the
rounded inputs, and the refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (the loader of our exports)
from compress.errors import ExportError, PassError
from compress.export.writer import export_model
from compress.quant.act_quant import ActQuantConfig, act_quant
from compress.quant.gptq import GPTQConfig
from compress.quant.rotate import RotateConfig, rotate
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import load_recipe
from compress.registry import PassContext
from compress.utils.activations import (
    ACTIVATION_QUANT_KEY,
    quantize_activations,
    quantizes_input,
)
from tests.conftest import run_passes_on_tiny_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_int8_rounds_each_token_with_its_own_scale():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.001], [100.0, 3.0, -50.0, 0.0]])
    got = quantize_activations(x, "int8")
    for row, out in zip(x, got, strict=True):
        scale = row.abs().max() / 127
        assert torch.equal(out, torch.round(row / scale) * scale)
    assert got[0, 3] == 0  # below half a step of its token's scale
    assert torch.equal(quantize_activations(got, "int8"), got)  # a rounded token stays


def test_fp8_rounds_each_token_to_e4m3():
    x = torch.randn(3, 64) * torch.tensor([[0.01], [1.0], [300.0]])
    got = quantize_activations(x, "fp8_e4m3")
    scale = x.abs().amax(dim=-1, keepdim=True) / 448
    expected = (x / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    assert torch.equal(got, expected)
    relative = ((got - x).norm(dim=-1) / x.norm(dim=-1)).max()
    assert 0 < relative < 0.05  # a 3-bit mantissa: a few percent, the same at every magnitude


def test_bf16_activations_come_back_in_bf16():
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    assert quantize_activations(x, "int8").dtype == torch.bfloat16


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="int8"):
        quantize_activations(torch.ones(2), "int4")


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p = torch.log_softmax(reference.double(), -1)
    q = torch.log_softmax(other.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize(("fmt", "bound"), [("int8", 1e-3), ("fp8_e4m3", 1e-2)])
def test_pass_quantizes_every_decoder_linear_input(tiny_llama, fmt, bound):
    model = copy.deepcopy(tiny_llama)
    report = act_quant(model, ActQuantConfig(format=fmt), PassContext())
    assert len(report.touched) == 14
    assert all(quantizes_input(model.get_submodule(n)) == fmt for n in report.touched)
    assert quantizes_input(model.lm_head) is None
    assert getattr(model.config, ACTIVATION_QUANT_KEY)["format"] == fmt
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        divergence = kl(tiny_llama(ids).logits, model(ids).logits)
    assert 0 < divergence < bound


def test_calibration_hooks_registered_later_see_the_rounded_input(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    act_quant(model, ActQuantConfig(format="int8"), PassContext())
    seen: list[torch.Tensor] = []
    module = model.model.layers[0].mlp.down_proj
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    raw: list[torch.Tensor] = []
    original = copy.deepcopy(tiny_llama).model.layers[0].mlp.down_proj
    original.register_forward_pre_hook(lambda _, args: raw.append(args[0]))
    x = torch.randn(3, module.in_features)
    with torch.no_grad():
        module(x)
        original(x)
    assert torch.equal(seen[0], quantize_activations(x, "int8"))
    assert torch.equal(raw[0], x)


def test_w8a8_export_reloads_with_the_rounding_installed(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    act_quant(model, ActQuantConfig(format="int8"), PassContext())
    rtn(model, RTNConfig(bits=8, group_size=None), PassContext())
    export_model(model, None, tmp_path / "w8a8")
    config = json.loads((tmp_path / "w8a8" / "config.json").read_text())
    assert config[ACTIVATION_QUANT_KEY]["format"] == "int8"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w8a8").eval()
    names = config[ACTIVATION_QUANT_KEY]["modules"]
    assert len(names) == 14 and all(quantizes_input(loaded.get_submodule(n)) for n in names)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_activation_rounding_alone_still_goes_through_our_loader(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    act_quant(model, ActQuantConfig(format="fp8_e4m3"), PassContext())
    export_model(model, None, tmp_path / "a8")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a8").eval()
    assert quantizes_input(loaded.model.layers[1].self_attn.q_proj) == "fp8_e4m3"


def test_rotate_after_act_quant_and_foreign_layouts_are_refused(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    act_quant(model, ActQuantConfig(format="int8"), PassContext())
    with pytest.raises(PassError, match="put act_quant after rotate"):
        rotate(model, RotateConfig(), PassContext())
    rtn(model, RTNConfig(bits=8, group_size=None), PassContext())
    with pytest.raises(ExportError, match="act_quant"):
        export_model(model, None, tmp_path / "ct", format="compressed-tensors")
    with pytest.raises(PassError, match="quantized to int8 already"):
        act_quant(model, ActQuantConfig(format="fp8_e4m3"), PassContext())


def test_shipped_w8a8_recipe_on_a_tiny_model(tmp_path):
    """recipes/smollm2-w8a8-fp8.yaml's passes on a tiny model: GPTQ onto FP8 after the
    activation rounding, an export whose reload rounds the activations the same way."""
    recipe = load_recipe(RECIPES / "smollm2-w8a8-fp8.yaml")
    assert [p.__class__ for p in recipe.passes] == [ActQuantConfig, GPTQConfig]
    result, loaded = run_passes_on_tiny_model(recipe.passes, tmp_path, seed=3)
    assert quantizes_input(loaded.model.layers[0].mlp.gate_proj) == "fp8_e4m3"
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, rtol=1e-3, atol=1e-3)
