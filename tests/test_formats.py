import pytest
import torch

from compress.errors import FormatError
from compress.formats.int import IntFormat, dequantize_int, quantize_int


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_in_range_and_error_shrinks_with_bits(bits, symmetric):
    torch.manual_seed(bits)
    weight = torch.randn(24, 96)
    fmt = IntFormat(bits, 32, symmetric)
    codes, scales, zeros = quantize_int(weight, fmt)
    assert codes.dtype == torch.uint8 and codes.shape == weight.shape
    assert int(codes.max()) <= 2**bits - 1
    assert scales.shape == (24, 3) and scales.dtype == torch.float16
    assert (zeros is None) == symmetric
    error = (dequantize_int(codes, scales, zeros, fmt) - weight).norm() / weight.norm()
    # uniform rounding noise: relative error roughly halves per extra bit
    assert error < 1.6 * 2.0 ** (-bits + 1)


def test_symmetric_reconstructs_grid_values_exactly():
    fmt = IntFormat(4, None, True)
    grid = torch.arange(-7, 8, dtype=torch.float32) * 0.25
    codes, scales, zeros = quantize_int(grid.unsqueeze(0), fmt)
    assert torch.equal(dequantize_int(codes, scales, zeros, fmt)[0], grid)


def test_symmetric_scale_uses_the_lowest_code_for_a_negative_extreme():
    """Codes span -8..7 at 4 bits: a row whose extreme is negative gets the step |min| / 8 and
    code 0 (finer than / 7, nothing clipped); a positive extreme still takes max / 7."""
    fmt = IntFormat(4, None, True)
    negative = torch.tensor([[-1.6, -0.3, 0.2, 1.0, 0.7]])
    codes, scales, _ = quantize_int(negative, fmt)
    assert float(scales) == pytest.approx(0.2, rel=1e-3) and int(codes[0, 0]) == 0
    restored = dequantize_int(codes, scales, None, fmt)
    assert float((restored - negative).abs().max()) <= 0.5 * float(scales) + 1e-6
    positive = -negative
    codes, scales, _ = quantize_int(positive, fmt)
    assert float(scales) == pytest.approx(1.6 / 7, rel=1e-3) and int(codes[0, 0]) == 15
    # never coarser than the old absmax / 7 step, on random groups
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    _, scales, _ = quantize_int(weight, IntFormat(4, 64, True))
    old = weight.reshape(64, 4, 64).abs().amax(dim=-1) / 7
    assert torch.all(scales.float() <= old * (1 + 1e-3))
    assert torch.any(scales.float() < old * 0.9)


def test_asymmetric_keeps_zero_exact():
    weight = torch.tensor([[0.0, 0.3, 1.7, 2.9, 0.0, 5.1, 0.2, 0.0]])
    fmt = IntFormat(3, 8, False)
    codes, scales, zeros = quantize_int(weight, fmt)
    restored = dequantize_int(codes, scales, zeros, fmt)
    assert torch.all(restored[weight == 0] == 0)


def test_dequantized_scales_are_the_stored_ones():
    """Codes are chosen with the fp16-rounded scale, so a loader reproduces them exactly."""
    torch.manual_seed(0)
    weight = torch.randn(8, 64) * 1e-3
    fmt = IntFormat(4, 64, True)
    codes, scales, _ = quantize_int(weight, fmt)
    again, _, _ = quantize_int(dequantize_int(codes, scales, None, fmt), fmt)
    assert torch.equal(codes, again)


@pytest.mark.parametrize(
    ("fmt", "in_features", "expected"),
    [
        (IntFormat(4, 64, True), 576, 4.25),
        (IntFormat(3, 64, True), 576, 3.25),
        (IntFormat(2, 64, True), 576, 2.25),
        (IntFormat(4, 64, False), 576, 4 + 20 / 64),
        (IntFormat(8, None, True), 576, 8 + 16 / 576),
    ],
)
def test_nominal_bits_per_weight(fmt, in_features, expected):
    assert fmt.bits_per_weight(in_features) == pytest.approx(expected)


def test_group_size_must_divide_input_dim():
    with pytest.raises(FormatError, match=r"group_size 128 does not divide .* 576") as info:
        IntFormat(4, 128, True).groups(576)
    assert "64" in (info.value.hint or "")


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_out_of_range(bits):
    with pytest.raises(FormatError):
        IntFormat(bits)


def test_describe_round_trip():
    fmt = IntFormat(5, 32, False, "bfloat16")
    assert IntFormat.from_dict(fmt.describe()) == fmt
