import pytest
import torch

from compress.errors import FormatError
from compress.formats.int import IntFormat, dequantize_int, quantize_int
from compress.quant.observers import choose_clip, mse_clip_ratios


def student_t(out_features: int = 128, in_features: int = 512, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed weights (Student-t, 3 degrees of freedom), like real LLM layers."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((out_features, in_features))


def with_outliers(out_features: int = 64, in_features: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with three ±30 outliers each."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    where = torch.randint(0, in_features, (out_features, 3), generator=generator)
    signs = torch.randn(out_features, 3, generator=generator).sign()
    return weight.scatter_(1, where, 30.0 * signs)


def reconstruction_mse(weight: torch.Tensor, fmt: IntFormat, clip: torch.Tensor | float) -> float:
    codes, scales, zeros = quantize_int(weight, fmt, clip_ratio=clip)
    return float((weight - dequantize_int(codes, scales, zeros, fmt)).square().mean())


def group_objective(
    weight: torch.Tensor,
    fmt: IntFormat,
    clip: torch.Tensor | float,
    norm: float = 2.4,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """(out, groups) sum of importance * |W - Q(W)|**norm: what the observer minimises."""
    codes, scales, zeros = quantize_int(weight, fmt, clip_ratio=clip)
    diff = (weight - dequantize_int(codes, scales, zeros, fmt)).abs().pow(norm)
    if importance is not None:
        diff = diff * importance
    return diff.reshape(weight.shape[0], scales.shape[1], -1).sum(-1)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("bits", "group_size", "limit"), [(4, 64, 0.95), (3, 64, 0.9), (3, None, 0.8)]
)
def test_mse_reduces_reconstruction_error_on_heavy_tails(bits, group_size, limit, symmetric):
    weight = student_t()
    fmt = IntFormat(bits, group_size, symmetric)
    minmax = reconstruction_mse(weight, fmt, choose_clip(weight, fmt, "minmax"))
    mse = reconstruction_mse(weight, fmt, choose_clip(weight, fmt, "mse"))
    assert mse < limit * minmax


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (3, 64), (2, 32), (4, None)])
def test_outlier_rows_are_never_worse(bits, group_size, symmetric):
    weight = with_outliers()
    fmt = IntFormat(bits, group_size, symmetric)
    assert reconstruction_mse(weight, fmt, choose_clip(weight, fmt, "mse")) <= reconstruction_mse(
        weight, fmt, 1.0
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_changes_little(symmetric):
    weight = student_t()
    fmt = IntFormat(8, 64, symmetric)
    ratios = mse_clip_ratios(weight, fmt)
    assert float(ratios.mean()) > 0.99
    minmax = reconstruction_mse(weight, fmt, 1.0)
    assert 0.95 * minmax <= reconstruction_mse(weight, fmt, ratios) <= minmax


@pytest.mark.parametrize(
    "fmt",
    [IntFormat(4, 64), IntFormat(3, 32, False), IntFormat(2, None), IntFormat(8, 128, False)],
    ids=str,
)
@pytest.mark.parametrize("min_ratio", [0.5, 0.8])
def test_shape_dtype_and_range(fmt, min_ratio):
    weight = student_t(48, 256)
    ratios = mse_clip_ratios(weight, fmt, grid=20, min_ratio=min_ratio)
    assert ratios.shape == (48, fmt.groups(256))
    assert ratios.dtype == torch.float32
    assert float(ratios.min()) >= min_ratio - 1e-6
    assert float(ratios.max()) <= 1.0
    grid = torch.linspace(1.0, min_ratio, 20)
    assert torch.isclose(ratios.unsqueeze(-1), grid).any(-1).all(), "ratios come from the grid"


@pytest.mark.parametrize("fmt", [IntFormat(4, 64), IntFormat(3, 32, False)], ids=str)
@pytest.mark.parametrize("norm", [2.0, 2.4])
def test_never_worse_than_minmax_on_its_own_objective(fmt, norm):
    weight = with_outliers()
    ratios = mse_clip_ratios(weight, fmt, norm=norm)
    chosen = group_objective(weight, fmt, ratios, norm)
    minmax = group_objective(weight, fmt, 1.0, norm)
    assert bool((chosen <= minmax).all())
    assert float(chosen.sum()) < float(minmax.sum())


def test_importance_weights_the_objective():
    weight = student_t(64, 256)
    fmt = IntFormat(3, 64)
    importance = torch.rand(256, generator=torch.Generator().manual_seed(1)) ** 4 * 100
    weighted = mse_clip_ratios(weight, fmt, importance=importance)
    plain = mse_clip_ratios(weight, fmt)
    assert not torch.equal(weighted, plain)
    on_weighted = group_objective(weight, fmt, weighted, importance=importance)
    on_plain = group_objective(weight, fmt, plain, importance=importance)
    assert bool((on_weighted <= on_plain).all())
    assert float(on_weighted.sum()) < float(on_plain.sum())


def test_degenerate_grids_give_minmax():
    weight = student_t(16, 128)
    fmt = IntFormat(4, 32)
    assert torch.equal(mse_clip_ratios(weight, fmt, grid=1), torch.ones(16, 4))
    assert torch.equal(mse_clip_ratios(weight, fmt, min_ratio=1.0), torch.ones(16, 4))


def test_zero_groups_keep_ratio_one():
    weight = student_t(8, 128)
    weight[:, :32] = 0
    ratios = mse_clip_ratios(weight, IntFormat(4, 32))
    assert torch.equal(ratios[:, 0], torch.ones(8))


def test_choose_clip():
    weight = student_t(16, 128)
    fmt = IntFormat(4, 32)
    assert choose_clip(weight, fmt, "minmax") == 1.0
    assert torch.equal(
        choose_clip(weight, fmt, "mse", grid=10), mse_clip_ratios(weight, fmt, grid=10)
    )
    with pytest.raises(ValueError, match="unknown observer 'max'"):
        choose_clip(weight, fmt, "max")  # type: ignore[arg-type]


def test_deterministic_and_input_untouched():
    weight = student_t(32, 128)
    before = weight.clone()
    first = mse_clip_ratios(weight, IntFormat(3, 64))
    assert torch.equal(first, mse_clip_ratios(weight, IntFormat(3, 64)))
    assert torch.equal(weight, before)


def test_half_precision_input():
    weight = student_t(16, 128)
    fmt = IntFormat(4, 64)
    ratios = mse_clip_ratios(weight.to(torch.bfloat16), fmt)
    assert ratios.dtype == torch.float32 and ratios.shape == (16, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": 0}, "grid must be at least 1"),
        ({"min_ratio": 0.0}, r"min_ratio must be in \(0, 1\]"),
        ({"min_ratio": 1.5}, r"min_ratio must be in \(0, 1\]"),
        ({"norm": 0.0}, "norm must be positive"),
        ({"importance": torch.ones(3)}, r"importance must have shape \(128,\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mse_clip_ratios(torch.randn(4, 128), IntFormat(4, 32), **kwargs)


def test_group_size_must_divide():
    with pytest.raises(FormatError, match="group_size 48 does not divide"):
        mse_clip_ratios(torch.randn(4, 128), IntFormat(4, 48))
    with pytest.raises(ValueError, match="2-D"):
        mse_clip_ratios(torch.randn(128), IntFormat(4, 32))
