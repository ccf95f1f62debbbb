import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from compress.errors import FormatError, PassError
from compress.export.writer import export_model
from compress.ir import get_quantized, quantized_modules
from compress.quant.gptq import GPTQConfig, gptq
from compress.quant.gptq_math import accumulate_hessian
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext
from compress.utils.hooks import capture_inputs


def calibration(samples=16, length=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (samples, length), generator=generator)


def module_inputs(model, ids):
    """Inputs every decoder Linear of the original model sees on ``ids``."""
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n
    }
    seen: dict[str, list[torch.Tensor]] = {}
    with (
        capture_inputs(
            linears, lambda n, x: seen.setdefault(n, []).append(x.reshape(-1, x.shape[-1]))
        ),
        torch.no_grad(),
    ):
        model(ids)
    return {n: torch.cat(xs) for n, xs in seen.items()}


def summed_output_error(original, model, inputs, accept) -> float:
    """``Σ ||X (W - Q)ᵀ||²`` over the decoder Linears of quantized ``model``, on the inputs the
    ``original`` saw; ``accept(record)`` must hold for every layer's record."""
    total = 0.0
    for name, x in inputs.items():
        weight = original.get_submodule(name).weight.detach()
        record = get_quantized(model.get_submodule(name))
        assert record is not None and accept(record), name
        total += float((x @ (weight - record.dequantize()).T).square().sum())
    return total


@pytest.mark.parametrize(
    ("bits", "group", "symmetric"), [(4, 32, True), (3, 16, False), (2, 32, False)]
)
@pytest.mark.parametrize("act_order", [False, True])
def test_output_error_not_above_rtn_on_every_layer(tiny_llama, bits, group, symmetric, act_order):
    ids = calibration()
    inputs = module_inputs(tiny_llama, ids)
    by_rtn = copy.deepcopy(tiny_llama)
    rtn(by_rtn, RTNConfig(bits=bits, group_size=group, symmetric=symmetric), PassContext())
    by_gptq = copy.deepcopy(tiny_llama)
    config = GPTQConfig(bits=bits, group_size=group, symmetric=symmetric, act_order=act_order)
    report = gptq(by_gptq, config, PassContext(calibration=ids))
    assert len(report.touched) == 14
    original = dict(tiny_llama.named_modules())
    rtn_modules = dict(by_rtn.named_modules())
    ratios = []
    for name, record in quantized_modules(by_gptq).items():
        x = inputs[name].detach()
        reference = x @ original[name].weight.detach().T
        gptq_error = (x @ record.dequantize().T - reference).norm()
        rtn_error = (x @ rtn_modules[name].weight.detach().T - reference).norm()
        assert gptq_error <= rtn_error * 1.0001, name
        ratios.append(float(gptq_error / rtn_error))
    assert sum(ratios) / len(ratios) < 0.9  # and clearly better on average


def test_act_order_export_reloads_with_equal_logits(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    gptq(
        model,
        GPTQConfig(bits=4, group_size=32, act_order=True),
        PassContext(calibration=calibration()),
    )
    export_model(model, None, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ids = calibration(samples=2, length=20, seed=3)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_weights_are_their_dequantized_records(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    gptq(
        model,
        GPTQConfig(bits=3, group_size=16, symmetric=False),
        PassContext(calibration=calibration()),
    )
    for name, module in model.named_modules():
        record = get_quantized(module)
        if record is not None:
            assert torch.equal(module.weight, record.dequantize(module.weight.dtype)), name


def test_needs_calibration(tiny_llama):
    with pytest.raises(PassError, match="gptq needs calibration data") as info:
        gptq(copy.deepcopy(tiny_llama), GPTQConfig(group_size=32), PassContext())
    assert "calibration:" in (info.value.hint or "")


def test_targets_outside_decoder_layers_are_skipped_and_reported(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    config = GPTQConfig(bits=4, group_size=32, targets=["*_proj", "lm_head"])
    report = gptq(model, config, PassContext(calibration=calibration()))
    assert "lm_head" in report.skipped and "decoder layers" in report.skipped["lm_head"]
    assert "lm_head" not in quantized_modules(model)


def test_group_size_error_names_the_layer_before_any_work(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(FormatError, match=r"layer model\.layers\.0\.\S+: group_size 48"):
        gptq(model, GPTQConfig(group_size=48), PassContext(calibration=calibration()))
    assert not quantized_modules(model)


def test_modules_reading_one_input_share_a_hessian(tiny_llama):
    from compress.quant.gptq import SharedHessians

    layer = tiny_llama.model.layers[0]
    named = {
        "q": layer.self_attn.q_proj,
        "k": layer.self_attn.k_proj,
        "o": layer.self_attn.o_proj,
        "up": layer.mlp.up_proj,
        "down": layer.mlp.down_proj,
    }
    shared = SharedHessians()
    with capture_inputs(named, shared.collect), torch.no_grad():
        for seed in range(3):
            tiny_llama(calibration(samples=2, length=8, seed=seed))
    assert shared._owner == {"q": "q", "k": "q", "o": "o", "up": "up", "down": "down"}
    q_hessian, q_count = shared.get("q")
    k_hessian, k_count = shared.get("k")
    assert k_hessian is q_hessian and k_count == q_count == 3 * 2 * 8
    # equal to a Hessian accumulated from k's own inputs
    own, count = None, 0
    for seed in range(3):
        x = module_inputs(tiny_llama, calibration(samples=2, length=8, seed=seed))
        own, count = accumulate_hessian(own, x["model.layers.0.self_attn.k_proj"], count)
    assert own is not None and torch.allclose(k_hessian, own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "settings", [{"format": "nf4"}, {"bits": 4, "group_size": 32, "scale_dtype": "e8m0"}]
)
def test_scale_refits_are_refused_where_there_are_no_float_scales(settings):
    with pytest.raises(ValueError, match="scale_refits 1 refits the float group scales"):
        GPTQConfig(scale_refits=1, **settings)
