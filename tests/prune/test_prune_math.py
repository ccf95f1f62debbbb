"""The pruning maths on one layer: exact masks, and Wanda / SparseGPT beating magnitude where the
inputs have outlier features and correlations (what they are designed for)."""

import pytest
import torch

from compress.prune.masks import nm_mask, parse_pattern, pruned_per_row, row_mask
from compress.prune.sparsegpt_math import accumulate_gram, sparsegpt_prune
from compress.prune.wanda_math import accumulate_squares, wanda_mask, wanda_scores


def layer_inputs(tokens=2048, features=128, seed=0):
    """Correlated inputs (rank-24 signal plus noise) with a few outlier features, as in LLMs."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(tokens, 24, generator=generator)
    x = signal @ torch.randn(24, features, generator=generator)
    x += 0.2 * torch.randn(tokens, features, generator=generator)
    x[:, :6] *= 25.0
    return x


def weight(rows=96, features=128, seed=1):
    return torch.randn(rows, features, generator=torch.Generator().manual_seed(seed))


def output_error(x, w, pruned):
    reference = x @ w.T
    return float((x @ pruned.T - reference).norm() / reference.norm())


def magnitude(w, nm):
    scores = w.abs()
    return w * (nm_mask(scores, *nm) if nm else row_mask(scores, pruned_per_row(w.shape[1], 0.5)))


def test_row_mask_removes_exactly_k_per_row():
    scores = torch.rand(7, 30)
    mask = row_mask(scores, 9)
    assert mask.sum(dim=1).tolist() == [21] * 7
    # the removed ones are the smallest of their row
    assert torch.all(scores.masked_fill(mask, float("inf")).max(dim=1).values.isinf())
    kept_min = scores.masked_fill(~mask, float("inf")).min(dim=1).values
    removed_max = scores.masked_fill(mask, float("-inf")).max(dim=1).values
    assert torch.all(removed_max <= kept_min)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_of_every_m(n, m):
    scores = torch.rand(5, 8 * m)
    mask = nm_mask(scores, n, m)
    assert torch.all(mask.reshape(5, 8, m).sum(dim=2) == n)


def test_parse_pattern():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "2:2", "two:four", "0:4"):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)


def test_wanda_scores_are_weight_times_input_norm():
    x = layer_inputs(tokens=64, features=8)
    w = weight(rows=3, features=8)
    squares = accumulate_squares(accumulate_squares(None, x[:40]), x[40:])
    expected = w.abs() * x.norm(dim=0)
    assert torch.allclose(wanda_scores(w, squares), expected, rtol=1e-5)


def test_gram_is_the_running_mean_of_x_xt():
    x = layer_inputs(tokens=300, features=16)
    gram, count = accumulate_gram(None, x[:100].reshape(4, 25, 16), 0)
    gram, count = accumulate_gram(gram, x[100:], count)
    assert count == 300
    assert torch.allclose(gram, x.T @ x / 300, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)], ids=["50%", "2:4", "4:8"])
def test_wanda_and_sparsegpt_beat_magnitude_on_outlier_inputs(nm):
    x, w = layer_inputs(), weight()
    floor = output_error(x, w, magnitude(w, nm))
    by_wanda = output_error(x, w, w * wanda_mask(w, accumulate_squares(None, x), 0.5, nm))
    gram, _ = accumulate_gram(None, x, 0)
    result = sparsegpt_prune(w, gram, sparsity=0.5, nm=nm, block_size=32)
    by_sparsegpt = output_error(x, w, result.weight)
    # Wanda keeps the weights on outlier features; SparseGPT also re-fits the rest.
    assert by_wanda < 0.8 * floor
    assert by_sparsegpt < 0.5 * floor
    assert by_sparsegpt < by_wanda
    assert torch.all(result.weight[~result.mask] == 0)
    if nm is None:
        assert result.mask.sum(dim=1).tolist() == [64] * w.shape[0]
    else:
        n, m = nm
        assert torch.all(result.mask.reshape(w.shape[0], -1, m).sum(dim=2) == n)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_row_sparsity_is_exact_for_any_block_size(sparsity):
    x, w = layer_inputs(features=100), weight(features=100)
    gram, _ = accumulate_gram(None, x, 0)
    for block in (7, 32, 128):
        mask = sparsegpt_prune(w, gram, sparsity=sparsity, block_size=block).mask
        assert mask.sum(dim=1).tolist() == [100 - pruned_per_row(100, sparsity)] * w.shape[0]


def test_sparsegpt_without_pruning_returns_the_weight():
    x, w = layer_inputs(), weight()
    gram, _ = accumulate_gram(None, x, 0)
    result = sparsegpt_prune(w, gram, sparsity=0.0)
    assert torch.allclose(result.weight, w, atol=1e-4)
    assert result.mask.all()


def test_sparsegpt_dead_inputs_get_zero_weight():
    x, w = layer_inputs(), weight()
    x[:, 10] = 0
    gram, _ = accumulate_gram(None, x, 0)
    result = sparsegpt_prune(w, gram, sparsity=0.5, block_size=32)
    assert torch.all(result.weight[:, 10] == 0)
    assert output_error(x, w, result.weight) < 0.5 * output_error(x, w, magnitude(w, None))


def test_sparsegpt_does_not_change_its_inputs():
    x, w = layer_inputs(), weight()
    gram, _ = accumulate_gram(None, x, 0)
    w0, g0 = w.clone(), gram.clone()
    sparsegpt_prune(w, gram, nm=(2, 4))
    assert torch.equal(w, w0) and torch.equal(gram, g0)
