import copy

import pytest
import torch
from pydantic import ValidationError

from compress.errors import FormatError, PassError
from compress.ir import get_quantized, quantized_modules
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext


def test_default_targets_are_decoder_linears(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    embed_before = model.model.embed_tokens.weight.clone()
    report = rtn(model, RTNConfig(bits=4, group_size=32), PassContext())
    names = set(quantized_modules(model))
    assert len(names) == 7 * model.config.num_hidden_layers
    assert all(name.startswith("model.layers.") for name in names)
    assert "lm_head" not in names
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    assert report.touched == list(quantized_modules(model))
    assert 0 < report.metrics["mean_relative_error"] < 0.2


def test_weight_becomes_its_dequantized_value(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    rtn(model, RTNConfig(bits=3, group_size=16, symmetric=False), PassContext())
    module = model.model.layers[1].mlp.down_proj
    record = get_quantized(module)
    assert record is not None and record.zeros is not None
    assert torch.equal(module.weight, record.dequantize(module.weight.dtype))
    assert len(torch.unique(module.weight[0, :16])) <= 8


def test_error_decreases_with_bits(tiny_llama):
    errors = []
    for bits in (2, 3, 4, 8):
        report = rtn(copy.deepcopy(tiny_llama), RTNConfig(bits=bits, group_size=32), PassContext())
        errors.append(report.metrics["mean_relative_error"])
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01


def test_ignore_patterns_are_reported(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    report = rtn(model, RTNConfig(bits=4, group_size=32, ignore=["*.mlp.*"]), PassContext())
    assert len(report.skipped) == 3 * model.config.num_hidden_layers
    assert all("ignore" in reason for reason in report.skipped.values())
    assert not any(".mlp." in name for name in quantized_modules(model))
    with pytest.raises(PassError, match="skipped 6 module"):
        report.check_strict(True)


def test_explicit_targets(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    rtn(model, RTNConfig(bits=8, group_size=None, targets=["*.q_proj"]), PassContext())
    assert sorted(quantized_modules(model)) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def test_group_size_not_dividing_names_the_layer_and_changes_nothing(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FormatError, match=r"layer model\.layers\.0\.\S+: group_size 48 does not"):
        rtn(model, RTNConfig(bits=4, group_size=48), PassContext())
    assert not quantized_modules(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_match_is_an_error(tiny_llama):
    with pytest.raises(PassError, match="no Linear or Embedding module matched"):
        rtn(copy.deepcopy(tiny_llama), RTNConfig(targets=["nothing.*"]), PassContext())


@pytest.mark.parametrize(("bits", "symmetric"), [(3, True), (4, True), (3, False)])
def test_mse_observer_lowers_the_error(tiny_llama, bits, symmetric):
    errors = {}
    for observer in ("minmax", "mse"):
        config = RTNConfig(bits=bits, group_size=32, symmetric=symmetric, observer=observer)
        report = rtn(copy.deepcopy(tiny_llama), config, PassContext())
        errors[observer] = report.metrics["mean_relative_error"]
    assert errors["mse"] < 0.97 * errors["minmax"]


def test_mse_observer_weight_is_its_dequantized_value(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    rtn(model, RTNConfig(bits=3, group_size=32, observer="mse"), PassContext())
    module = model.model.layers[0].self_attn.o_proj
    record = get_quantized(module)
    assert record is not None and record.zeros is None
    assert torch.equal(module.weight, record.dequantize(module.weight.dtype))
    # clipping shrinks the scales
    minmax = copy.deepcopy(tiny_llama)
    rtn(minmax, RTNConfig(bits=3, group_size=32), PassContext())
    minmax_record = get_quantized(minmax.model.layers[0].self_attn.o_proj)
    assert minmax_record is not None
    assert float(record.scales.float().mean()) < float(minmax_record.scales.float().mean())


def test_observer_default_and_validation():
    assert RTNConfig().observer == "minmax"
    with pytest.raises(ValidationError, match="observer"):
        RTNConfig(observer="percentile")  # type: ignore[arg-type]
