"""Block floating point: the integer format with power-of-two (E8M0) scales.

The reference below is written from the OCP Microscaling v1.0 definition of MXINT8 (and its
obvious b-bit generalisation), independently of ``quantize_int``; the format must match it bit
for bit. Then the same weights through every place a scale is read: GPTQ's layout, the packed
module, the native and Triton kernels (their own test files add ``e8m0`` to their scale dtypes),
an export reloaded by ``from_pretrained``, and the recipe checker.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (registers the quantizer)
from compress.errors import ExportError, FormatError
from compress.export.summary import summarize_export
from compress.export.writer import export_model
from compress.formats.int import IntFormat, dequantize_int, quantize_int
from compress.formats.int.linear import QuantLinear
from compress.ir import QuantizedWeight
from compress.quant.awq import AWQConfig
from compress.quant.gptq import GPTQConfig
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext


def ocp_block_floating_point(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Shared exponent ``floor(log2(amax)) - emax`` with emax = 0 for the 1.(b-2) fixed-point
    element, elements rounded half to even and saturated to [-2**(b-1), 2**(b-1) - 1] steps."""
    out = torch.empty_like(weight, dtype=torch.float64)
    step = 2.0 ** -(bits - 2)  # the element's resolution: 1.6 fixed point for 8 bits
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for row in range(weight.shape[0]):
        for start in range(0, weight.shape[1], block):
            values = weight[row, start : start + block].double()
            amax = float(values.abs().max())
            shared = math.floor(math.log2(amax)) if amax > 0 else -127
            shared = min(max(shared - (bits - 2), -126), 127) + (bits - 2)
            scale = 2.0**shared
            elements = torch.round(values / scale / step).clamp(low, high) * step
            out[row, start : start + block] = elements * scale
    return out


def heavy_tailed(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    weight[:, torch.randperm(columns, generator=generator)[:3]] *= 20  # outlier channels
    return weight


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_matches_the_ocp_definition_bit_for_bit(bits, block):
    weight = heavy_tailed(12, 192, seed=bits)
    fmt = IntFormat(bits, block, True, "e8m0")
    codes, scales, zeros = quantize_int(weight, fmt)
    assert zeros is None and scales.dtype == torch.uint8 and scales.shape == (12, 192 // block)
    got = dequantize_int(codes, scales, zeros, fmt, torch.float64)
    assert torch.equal(got, ocp_block_floating_point(weight, bits, block))


def test_mxint8_saturates_at_the_top_and_reaches_minus_two():
    """An amax of 1.999 * 2**k rounds to 128 steps of 2**(k-6): +127 at the top (saturated),
    -128 (the element -2.0, code 0) at the bottom, as two's complement allows."""
    weight = torch.zeros(2, 32)
    weight[:, :2] = torch.tensor([[1.999, 0.5], [-1.999, 0.5]]) * 2.0**-5
    fmt = IntFormat(8, 32, True, "e8m0")
    codes, scales, _ = quantize_int(weight, fmt)
    assert scales[:, 0].tolist() == [127 - 5 - 6] * 2  # floor(log2 amax) = -5, minus 6
    assert codes[:, :2].tolist() == [[128 + 127, 128 + 32], [0, 128 + 32]]
    values = dequantize_int(codes, scales, None, fmt)
    assert values[0, 0] == 127 * 2.0**-11 and values[1, 0] == -(2.0**-4)


def test_exponent_range_and_zero_blocks():
    fmt = IntFormat(4, 16, True, "e8m0")
    weight = torch.zeros(3, 32)
    weight[1, 16] = 1e-40  # subnormal amax: the exponent stops at E8M0's smallest normal
    weight[2, :16] = 3e38
    codes, scales, _ = quantize_int(weight, fmt)
    assert int(scales.min()) >= 1 and int(scales.max()) <= 254  # never 0 (2**-127) or 255
    assert scales[0].tolist() == [1, 1]
    assert torch.equal(codes[0], torch.full((32,), 8, dtype=torch.uint8))  # exact zeros
    assert torch.isfinite(dequantize_int(codes, scales, None, fmt)).all()
    decoded = fmt.scale_values(torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8))
    assert decoded.tolist() == [2.0**-127, 2.0**-126, 1.0, 2.0**127, math.inf]


def test_stored_scales_round_trip_and_cost():
    fmt = IntFormat(6, 32, True, "e8m0")
    stored = torch.arange(1, 255, dtype=torch.uint8).reshape(2, 127)
    assert torch.equal(fmt.store_scales(fmt.scale_values(stored)), stored)
    assert fmt.bits_per_weight(576) == 6 + 8 / 32
    assert fmt.label() == "int6 g32 e8m0"
    assert IntFormat.from_dict(fmt.to_dict()) == fmt


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"symmetric": False}, "has no zero points, but symmetric is false"),
        ({"group_size": None}, "shares an exponent per block, but group_size is null"),
    ],
)
def test_impossible_combinations_are_refused(kwargs, message):
    settings = {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "e8m0", **kwargs}
    with pytest.raises(FormatError, match=message):
        IntFormat(**settings)


def test_block_floating_point_is_not_worse_than_it_should_be():
    """Power-of-two scales cost at most one octave of range against free fp16 scales: the error
    is within 2x of the float-scaled format's (a wrong exponent is off by far more)."""
    weight = heavy_tailed(64, 576)
    for bits in (4, 6, 8):
        errors = []
        for scale_dtype in ("float16", "e8m0"):
            fmt = IntFormat(bits, 32, True, scale_dtype)
            recon = dequantize_int(*quantize_int(weight, fmt), fmt)
            errors.append(float((recon - weight).norm() / weight.norm()))
        assert errors[0] <= errors[1] < 2 * errors[0], (bits, errors)


def test_packed_module_keeps_the_exponent_bytes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True)
    fmt = IntFormat(5, 32, True, "e8m0")
    record = QuantizedWeight(*quantize_int(linear.weight, fmt), fmt)
    module = QuantLinear.from_record(linear, record)
    assert module.scales.dtype == torch.uint8 and torch.equal(module.scales, record.scales)
    assert torch.equal(module.codes(), record.codes)
    assert torch.equal(module.dequantize(), record.dequantize(torch.float32))
    x = torch.randn(3, 96)
    want = x @ record.dequantize(torch.float32).T + linear.bias.detach()
    assert torch.allclose(module(x), want, atol=1e-5)


def test_export_reloads_with_the_same_logits(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    config = RTNConfig(bits=8, group_size=32, scale_dtype="e8m0")
    rtn(model, config, PassContext())
    export_model(model, None, tmp_path / "export", recipe={"passes": []})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    packed = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert packed and all(m.fmt.power_of_two_scales for m in packed)
    assert all(m.scales.dtype == torch.uint8 for m in packed)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16), generator=torch.Generator())
    with torch.no_grad():
        expected, actual = model(ids).logits, loaded(ids).logits
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    summary = summarize_export(tmp_path / "export", verify=True)
    for name, entry in summary.per_module.items():  # 8 code bits + one exponent byte per 32
        assert entry["nominal_bits_per_weight"] == pytest.approx(8.25), name


def test_compressed_tensors_export_refuses_power_of_two_scales(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    rtn(model, RTNConfig(bits=8, group_size=32, scale_dtype="e8m0"), PassContext())
    with pytest.raises(ExportError, match="E8M0 power-of-two scales"):
        export_model(
            model, None, tmp_path / "ct", recipe={"passes": []}, format="compressed-tensors"
        )
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("config", [RTNConfig, GPTQConfig, AWQConfig])
def test_recipe_settings_that_cannot_exist_are_refused_when_read(config):
    with pytest.raises(ValidationError, match="no zero points, but symmetric is false"):
        config(bits=4, group_size=32, symmetric=False, scale_dtype="e8m0")
    assert config(bits=4, group_size=32, scale_dtype="e8m0").int_format().power_of_two_scales
