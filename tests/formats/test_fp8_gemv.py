"""The FP8 format's native GEMV against the reference, on the AVX2 build and this CPU's own (the
portable loop takes the tails), for both variants, every scaling and awkward widths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.formats.fp8 import FP8Format, cpu, kernels
from compress.formats.fp8.linear import FP8Linear
from compress.formats.fp8.packed import PackedFP8
from compress.ir import QuantizedWeight
from tests.conftest import NATIVE_TEST_LEVELS, force_native_build

FORMATS = [
    FP8Format("e4m3", "channel"),
    FP8Format("e5m2", "tensor"),
    FP8Format("e4m3", "block", 48),
    FP8Format("e5m2", "block", 64),
    FP8Format("e4m3", "mx"),
    FP8Format("e5m2", "mx"),
]
# (out, in): widths with and without a tail after the 16- / 8-wide steps, partial edge blocks
SHAPES = [(37, 192), (16, 576), (5, 100), (9, 40)]


@pytest.fixture(params=NATIVE_TEST_LEVELS)
def isa(request, monkeypatch):
    return force_native_build(request.param, monkeypatch, cpu.native, "the FP8 GEMV")


def packed(fmt: FP8Format, out_features: int, in_features: int, seed: int = 0) -> PackedFP8:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight[0, :4] = torch.tensor([3e-6, -1e-4, 0.0, 50.0])  # subnormal codes, a zero, an outlier
    codes, scales, _ = fmt.quantize(weight)
    return PackedFP8(codes, scales, torch.randn(out_features, generator=generator), fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rows", [1, 9])
def test_native_gemv_matches_the_reference(isa, fmt, shape, rows):
    out_features, in_features = shape
    if fmt.scaling == "mx" and in_features % 32:
        pytest.skip("MX blocks of 32 must divide the width")
    w = packed(fmt, out_features, in_features, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x.double(), w.dequantize(torch.float64), w.bias.double())
    got = cpu.gemv(x, w)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations_agree_with_the_reference(isa, dtype):
    """Within the reference's own rounding (it rounds each weight to the activation dtype)."""
    w = packed(FP8Format("e4m3", "block", 64), 24, 576)
    x = torch.randn(2, 576).to(dtype)
    got = cpu.gemv(x, w)
    assert got.dtype == dtype
    expected = F.linear(x.double(), w.dequantize(torch.float64), w.bias.double())
    assert torch.allclose(got.double(), expected, rtol=2e-2, atol=0.15)


def test_linear_takes_the_gemv_for_decode_and_the_reference_for_prefill(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    fmt = FP8Format("e4m3", "channel")
    linear = nn.Linear(64, 16)
    codes, scales, _ = fmt.quantize(linear.weight.detach())
    module = FP8Linear.from_record(linear, QuantizedWeight(codes, scales, None, fmt))
    assert module.kernel == "cpu_gemv"
    assert kernels.select(fmt, 64, rows=32, dtype=torch.float32) == "reference"
    x = torch.randn(3, 64)
    expected = F.linear(x, module.dequantize(), linear.bias.detach())
    with torch.no_grad():
        assert torch.allclose(module(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(module(x.repeat(12, 1)), expected.repeat(12, 1), atol=1e-5)
