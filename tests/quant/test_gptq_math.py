from dataclasses import dataclass

import pytest
import torch

from compress.errors import FormatError, PassError
from compress.formats.int import IntFormat, dequantize_int, quantize_int
from compress.quant import gptq_math
from compress.quant.gptq_math import (
    GPTQResult,
    accumulate_hessian,
    gptq_quantize,
    refit_group_scales,
)
from compress.quant.observers import choose_clip

OUT, IN, SAMPLES = 96, 128, 512


@dataclass
class Layer:
    weight: torch.Tensor  # (out, in)
    inputs: torch.Tensor  # (samples, in)
    hessian: torch.Tensor  # (in, in) = 2/n XᵀX

    def output_error(self, quantized: torch.Tensor) -> float:
        """||X Wᵀ - X Qᵀ||²: what GPTQ minimises."""
        return float((self.inputs @ (self.weight - quantized).T).square().sum())


def make_layer(seed: int = 0, out_features: int = OUT, in_features: int = IN) -> Layer:
    """Random weight; correlated inputs: rank-8 signal + noise, six channels at 8x scale."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    signal = torch.randn(SAMPLES, 8, generator=generator) @ torch.randn(
        8, in_features, generator=generator
    )
    inputs = signal + torch.randn(SAMPLES, in_features, generator=generator)
    inputs[:, torch.randperm(in_features, generator=generator)[:6]] *= 8
    hessian, _ = accumulate_hessian(None, inputs, 0)
    return Layer(weight, inputs, hessian)


@pytest.fixture(scope="module")
def layer() -> Layer:
    return make_layer()


def dequantized(result: GPTQResult, fmt: IntFormat) -> torch.Tensor:
    return dequantize_int(result.codes, result.scales, result.zeros, fmt)


def rtn_weight(weight: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    return dequantize_int(*quantize_int(weight, fmt), fmt)


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("group_size", [32, None], ids=["g32", "per_channel"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_output_error_beats_rtn(layer, bits, symmetric, group_size, act_order):
    fmt = IntFormat(bits, group_size, symmetric)
    result = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order)
    gptq = layer.output_error(dequantized(result, fmt))
    rtn = layer.output_error(rtn_weight(layer.weight, fmt))
    assert gptq <= rtn
    if bits in (3, 4):
        assert gptq < 0.8 * rtn


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_block_floating_point_beats_rtn(layer, bits, observer, act_order):
    """Power-of-two scales (E8M0) through GPTQ: every scale stays a power of two and the output
    error is GPTQ's usual fraction of round-to-nearest's."""
    fmt = IntFormat(bits, 32, True, "e8m0")
    result = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order, observer=observer)
    assert result.scales.dtype == torch.uint8 and result.zeros is None
    values = fmt.scale_values(result.scales)
    assert torch.equal(values, torch.exp2(torch.log2(values).round()))
    gptq = layer.output_error(dequantized(result, fmt))
    rtn = layer.output_error(rtn_weight(layer.weight, fmt))
    assert gptq < (0.8 if bits < 8 else 1.0) * rtn


@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_does_not_hurt_at_3_bits(symmetric, group_size):
    # several layers: act_order is a heuristic, judge it on the total
    plain = ordered = 0.0
    for seed in range(3):
        layer = make_layer(seed)
        fmt = IntFormat(3, group_size, symmetric)
        for flag in (False, True):
            result = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=flag)
            error = layer.output_error(dequantized(result, fmt))
            if flag:
                ordered += error
            else:
                plain += error
    assert ordered <= 1.1 * plain


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, None])
def test_mse_observer_runs_and_beats_rtn(layer, observer, act_order, group_size):
    fmt = IntFormat(3, group_size)
    result = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order, observer=observer)
    rtn = layer.output_error(rtn_weight(layer.weight, fmt))
    assert layer.output_error(dequantized(result, fmt)) < 0.8 * rtn


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(3, 32, True), (4, None, False)])
def test_layout(layer, bits, group_size, symmetric, scale_dtype, act_order):
    fmt = IntFormat(bits, group_size, symmetric, scale_dtype)
    result = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order)
    groups = fmt.groups(IN)
    assert result.codes.shape == (OUT, IN) and result.codes.dtype == torch.uint8
    assert int(result.codes.max()) <= fmt.levels - 1
    assert result.scales.shape == (OUT, groups)
    assert result.scales.dtype == fmt.torch_scale_dtype
    assert bool((result.scales > 0).all())
    if symmetric:
        assert result.zeros is None
    else:
        assert result.zeros is not None
        assert result.zeros.shape == (OUT, groups) and result.zeros.dtype == torch.uint8
        assert int(result.zeros.max()) <= fmt.levels - 1
    assert torch.isfinite(dequantized(result, fmt)).all()
    assert result.error > 0


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "fmt", [IntFormat(3, 32), IntFormat(4, None, False), IntFormat(3, 32, True, "e8m0")], ids=str
)
def test_error_is_the_quadratic_loss_of_the_result(layer, fmt, act_order):
    """The summed OBS losses equal ½ tr(ΔW H_damped ΔWᵀ) of the final weight: OBS is exact."""
    damp = 0.01
    result = gptq_quantize(layer.weight, layer.hessian, fmt, damp=damp, act_order=act_order)
    delta = layer.weight - dequantized(result, fmt)
    diagonal = torch.diagonal(layer.hessian)
    damped = layer.hessian + torch.diag(torch.full_like(diagonal, damp * float(diagonal.mean())))
    loss = float(torch.einsum("oi,ij,oj->", delta, damped, delta)) / 2
    assert result.error == pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(
    "fmt",
    [
        IntFormat(3, 32),
        IntFormat(4, None, False),
        IntFormat(2, 64, False, "bfloat16"),
        IntFormat(4, 32, True, "e8m0"),
    ],
    ids=str,
)
def test_diagonal_hessian_is_exactly_rtn(layer, fmt, act_order, observer):
    """Uncorrelated inputs leave nothing to compensate: codes, scales and zeros are RTN's."""
    diagonal = torch.linspace(3.0, 0.5, IN)[torch.randperm(IN, generator=torch.Generator())]
    result = gptq_quantize(
        layer.weight, torch.diag(diagonal), fmt, act_order=act_order, observer=observer
    )
    clip = choose_clip(layer.weight, fmt, observer)
    codes, scales, zeros = quantize_int(layer.weight, fmt, clip_ratio=clip)
    assert torch.equal(result.codes, codes)
    assert torch.equal(result.scales, scales)
    assert (result.zeros is None and zeros is None) or torch.equal(result.zeros, zeros)


@pytest.mark.parametrize("block_size", [1, 7, 32, 50, 1000])
@pytest.mark.parametrize("act_order", [False, True])
def test_result_does_not_depend_on_block_size(layer, block_size, act_order):
    """Lazy batching is only a speed-up; a group straddling blocks still sees current weights."""
    fmt = IntFormat(3, 32, False)
    reference = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order)
    result = gptq_quantize(
        layer.weight, layer.hessian, fmt, act_order=act_order, block_size=block_size
    )
    assert float((result.codes == reference.codes).float().mean()) > 0.999
    assert result.error == pytest.approx(reference.error, rel=1e-3)


def test_deterministic_and_inputs_untouched(layer):
    weight, hessian = layer.weight.clone(), layer.hessian.clone()
    fmt = IntFormat(4, 32, False)
    first = gptq_quantize(weight, hessian, fmt, act_order=True, observer="mse")
    second = gptq_quantize(weight, hessian, fmt, act_order=True, observer="mse")
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(first.scales, second.scales)
    assert first.zeros is not None and second.zeros is not None
    assert torch.equal(first.zeros, second.zeros)
    assert first.error == second.error
    assert torch.equal(weight, layer.weight) and torch.equal(hessian, layer.hessian)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dead_input_channel(layer, symmetric, act_order):
    inputs = layer.inputs.clone()
    inputs[:, [5, 70]] = 0
    hessian, _ = accumulate_hessian(None, inputs, 0)
    fmt = IntFormat(4, 32, symmetric)
    result = gptq_quantize(layer.weight, hessian, fmt, act_order=act_order)
    weight = dequantized(result, fmt)
    assert torch.isfinite(weight).all() and torch.isfinite(result.scales.float()).all()
    assert bool((weight[:, [5, 70]] == 0).all()), "a dead input's weight is set to zero"
    dead_layer = Layer(layer.weight, inputs, hessian)
    assert dead_layer.output_error(weight) < dead_layer.output_error(rtn_weight(layer.weight, fmt))


def test_all_inputs_dead(layer):
    result = gptq_quantize(layer.weight, torch.zeros(IN, IN), IntFormat(4, 32))
    assert bool((dequantized(result, IntFormat(4, 32)) == 0).all())
    assert result.error == 0


def test_bfloat16_weight(layer):
    fmt = IntFormat(4, 32)
    result = gptq_quantize(layer.weight.to(torch.bfloat16), layer.hessian, fmt)
    rtn = layer.output_error(rtn_weight(layer.weight, fmt))
    assert layer.output_error(dequantized(result, fmt)) < 0.8 * rtn


def test_rank_deficient_hessian_is_fixed_by_dampening():
    """Fewer samples than inputs: H is singular, dampening makes it factorisable."""
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(16, IN, generator=generator)
    weight = torch.randn(OUT, IN, generator=generator)
    hessian, _ = accumulate_hessian(None, inputs, 0)
    result = gptq_quantize(weight, hessian, IntFormat(4, 32), damp=0.01)
    assert torch.isfinite(dequantized(result, IntFormat(4, 32))).all()


def test_indefinite_hessian_is_a_pass_error(layer):
    hessian = -torch.eye(IN)
    with pytest.raises(PassError, match="not positive definite even with dampening"):
        gptq_quantize(layer.weight, hessian, IntFormat(4, 32))


def test_non_finite_hessian_is_a_pass_error(layer):
    hessian = layer.hessian.clone()
    hessian[3, 4] = float("nan")
    with pytest.raises(PassError, match="non-finite"):
        gptq_quantize(layer.weight, hessian, IntFormat(4, 32))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"hessian": torch.eye(IN + 1)}, ValueError, r"Hessian shape \(129, 129\) does not match"),
        ({"fmt": IntFormat(4, 48)}, FormatError, "group_size 48 does not divide"),
        ({"block_size": 0}, ValueError, "block_size must be positive"),
        ({"damp": -0.1}, ValueError, "damp must be non-negative"),
    ],
)
def test_bad_arguments(layer, kwargs, error, message):
    arguments = {"hessian": layer.hessian, "fmt": IntFormat(4, 32), **kwargs}
    with pytest.raises(error, match=message):
        gptq_quantize(
            layer.weight,
            arguments.pop("hessian"),
            arguments.pop("fmt"),
            **arguments,
        )


def test_accumulate_hessian_over_batches_equals_direct():
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 7, 24, generator=generator) for _ in range(4)]  # (batch, seq, in)
    batches.append(torch.randn(0, 24))  # an empty batch changes nothing
    batches.append(torch.randn(5, 24, generator=generator))
    hessian, count = None, 0
    for batch in batches:
        hessian, count = accumulate_hessian(hessian, batch, count)
    rows = torch.cat([batch.reshape(-1, 24) for batch in batches])
    assert count == rows.shape[0] == 4 * 14 + 5
    assert hessian is not None and hessian.dtype == torch.float32
    expected = 2 / count * rows.double().T @ rows.double()
    torch.testing.assert_close(hessian.double(), expected, rtol=1e-5, atol=1e-5)


def test_accumulate_hessian_keeps_a_float64_accumulator():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(30, 8, generator=generator)
    hessian, count = accumulate_hessian(torch.zeros(8, 8, dtype=torch.float64), rows[:10], 0)
    hessian, count = accumulate_hessian(hessian, rows[10:].to(torch.bfloat16).float(), count)
    assert hessian.dtype == torch.float64 and count == 30


def test_accumulate_hessian_bad_arguments():
    with pytest.raises(ValueError, match=r"Hessian shape \(4, 4\) does not match 8 input"):
        accumulate_hessian(torch.zeros(4, 4), torch.randn(3, 8), 3)
    with pytest.raises(ValueError, match="count must be 0 when starting"):
        accumulate_hessian(None, torch.randn(3, 8), 3)
    with pytest.raises(ValueError, match="count must be non-negative"):
        accumulate_hessian(torch.zeros(8, 8), torch.randn(3, 8), -1)


@pytest.mark.parametrize("act_order", [False, True])
def test_consumed_hessian_gives_the_same_codes(layer, act_order):
    fmt = IntFormat(4, 32, False)
    kept = gptq_quantize(layer.weight, layer.hessian, fmt, act_order=act_order)
    work = layer.hessian.clone()
    consumed = gptq_quantize(layer.weight, work, fmt, act_order=act_order, consume_hessian=True)
    assert torch.equal(kept.codes, consumed.codes)
    assert torch.equal(kept.scales, consumed.scales)
    assert not torch.equal(work, layer.hessian)  # it was the work matrix


def test_inverse_factor_retries_from_the_restored_matrix():
    """damp 0.01 cannot fix one eigenvalue of -5% of the mean; 0.1 can: the factor must be
    that of the original matrix at 0.1, so the failed attempt left nothing behind."""
    from compress.quant.gptq_math import _inverse_hessian_factor

    n = 48
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(3)))
    eigenvalues = torch.ones(n)
    eigenvalues[0] = -0.05
    hessian = ((basis * eigenvalues) @ basis.T).float()
    hessian = (hessian + hessian.T) / 2
    factor = _inverse_hessian_factor(hessian.clone(), 0.01).double()
    dampened = hessian.double() + 0.1 * hessian.diagonal().double().mean() * torch.eye(n).double()
    assert torch.allclose(factor.T @ factor, torch.linalg.inv(dampened), atol=1e-4)
    assert torch.equal(factor, torch.triu(factor))


def test_permute_in_place_matches_indexing():
    from compress.quant.gptq_math import _permute_in_place

    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 40):
        matrix = torch.rand(n, n, generator=generator)
        perm = torch.randperm(n, generator=generator)
        expected = matrix[perm][:, perm]
        _permute_in_place(matrix.numpy(), perm.numpy())
        assert torch.equal(matrix, expected)


@pytest.mark.parametrize("act_order", [False, True], ids=["plain", "act_order"])
@pytest.mark.parametrize(
    "fmt", [IntFormat(4, 32), IntFormat(3, 32, False), IntFormat(2, None, False)], ids=str
)
def test_scale_refits_lower_the_output_error_and_keep_the_codes_layout(layer, fmt, act_order):
    """Each refit is a least-squares solve for the scales GPTQ's objective wants: the output error
    falls with the first refit (by a margin a sign or index slip would not give) and does not rise
    with the next; codes and zeros keep their layout and stay on the grid."""
    errors = []
    for refits in (0, 1, 2):
        result = gptq_quantize(
            layer.weight, layer.hessian, fmt, act_order=act_order, scale_refits=refits
        )
        assert result.scales.dtype == fmt.torch_scale_dtype
        assert int(result.codes.max()) < fmt.levels
        errors.append(layer.output_error(dequantized(result, fmt)))
        delta = layer.weight - dequantized(result, fmt)
        if refits:  # the reported loss is then the undamped objective of the result
            loss = float(torch.einsum("oi,ij,oj->", delta, layer.hessian, delta)) / 2
            assert result.error == pytest.approx(loss, rel=1e-3)
    assert errors[1] < 0.97 * errors[0]
    assert errors[2] <= errors[1] * 1.001


def test_refit_keeps_a_row_whose_system_is_singular(layer):
    """A row whose codes all sit on the zero point gives a singular system: its scales stay."""
    fmt = IntFormat(4, 32)
    codes, scales, zeros = quantize_int(layer.weight, fmt)
    codes[0] = fmt.midpoint
    refitted = refit_group_scales(layer.weight, layer.hessian, codes, scales, zeros, fmt)
    assert torch.equal(refitted[0], scales[0])
    assert not torch.equal(refitted[1:], scales[1:])


def test_scale_refits_need_float_scales(layer):
    with pytest.raises(ValueError, match="float scales"):
        gptq_quantize(layer.weight, layer.hessian, IntFormat(4, 32, True, "e8m0"), scale_refits=1)


def test_refit_in_row_chunks_equals_one_solve(layer, monkeypatch):
    fmt = IntFormat(3, 32, False)
    codes, scales, zeros = quantize_int(layer.weight, fmt)
    whole = gptq_math.refit_group_scales(layer.weight, layer.hessian, codes, scales, zeros, fmt)
    monkeypatch.setattr(gptq_math, "_REFIT_ELEMENTS", 7 * IN)  # chunks of 7 rows, one partial
    chunked = gptq_math.refit_group_scales(layer.weight, layer.hessian, codes, scales, zeros, fmt)
    assert torch.allclose(chunked.float(), whole.float(), rtol=1e-3)
