"""The bitmask sparse format's Triton kernels against the reference. Without CUDA they run in
Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before the kernels are imported)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `gpu` extra is not installed")

from compress.formats import triton_tiles
from compress.formats.bitmask import triton_kernels as tk
from compress.formats.bitmask.kernels import KERNELS
from compress.formats.bitmask.packed import PackedBitmask, block_offsets, pack_bitmask
from compress.formats.bitmask.spec import BitmaskFormat

if torch.cuda.is_available() == triton_tiles.INTERPRETED:  # imported earlier in the other mode
    triton_tiles = importlib.reload(triton_tiles)
    tk = importlib.reload(tk)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
OUT_FEATURES = 70  # two column blocks of the kernels, the second one partly masked


def sparse_weight(
    out_features: int, in_features: int, dtype: torch.dtype, *, seed: int = 0
) -> torch.Tensor:
    """~50% unstructured sparsity, plus a zero row, a full row and a row holding only its last
    column: rows of very different counts, so every row's offsets differ."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight[torch.rand(out_features, in_features, generator=generator) < 0.5] = 0
    weight[1] = 0
    weight[2] = torch.randn(in_features, generator=generator)
    weight[3] = 0
    weight[3, -1] = 1.5
    weight[4, : in_features // 3] = 0  # a row whose values all sit late
    return weight.to(dtype)


def packed(
    weight: torch.Tensor, *, bias: bool = True, seed: int = 1, cache_offsets: bool = False
) -> PackedBitmask:
    fmt = BitmaskFormat.for_weight(weight)
    bitmask, values = pack_bitmask(weight, fmt)
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(weight.shape[0], generator=generator).to(weight.dtype) if bias else None
    offsets = block_offsets(bitmask) if cache_offsets else None
    w = PackedBitmask(bitmask, values, b, fmt, weight.shape[1], offsets)
    return PackedBitmask(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w))


def activations(rows: int, in_features: int, dtype: torch.dtype, *, seed: int = 2) -> torch.Tensor:
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))
    return x.to(dtype).to(DEVICE)


def assert_matches(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor) -> None:
    """Within a couple of roundings of the largest output: in 16 bits Triton rounds ``x @ W.T``
    before adding the bias (torch rounds once); in fp32 the sums run in another order."""
    assert got.dtype == expected.dtype == x.dtype
    assert got.shape == expected.shape
    eps = torch.finfo(x.dtype).eps
    ulps = 8 if x.dtype == torch.float32 else 2
    atol = ulps * eps * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=eps, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_features", [72, 128, 200])
@pytest.mark.parametrize(("kernel", "rows"), [("gemv", 1), ("gemv", 4), ("gemm", 20)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_kernels_match_the_reference(dtype, in_features, kernel, rows, bias):
    weight = sparse_weight(OUT_FEATURES, in_features, dtype, seed=in_features)
    w = packed(weight, bias=bias)
    x = activations(rows, in_features, dtype, seed=rows)
    got = tk.triton_linear(x, w, kernel)
    assert_matches(got, KERNELS["reference"](x, w), x)


@pytest.mark.parametrize("block_k", [16, 32])
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_tiles_that_start_inside_a_64_column_block(block_k, kernel):
    """Tiles narrower than 64 columns start mid-block: the set bits between the block's start and
    the tile's must be counted too."""
    weight = sparse_weight(OUT_FEATURES, 200, torch.float32, seed=3)
    w = packed(weight)
    x = activations(3 if kernel == "gemv" else 20, 200, torch.float32)
    decode = tk.tile(w)
    if kernel == "gemv":
        got = triton_tiles.splitk_gemv(x, decode, OUT_FEATURES, 200, block_k=block_k, splits=3)
    else:
        got = triton_tiles.dequant_gemm(x, decode, OUT_FEATURES, 200, block_k=block_k)
    expected = KERNELS["reference"](x, w._replace(bias=None))
    assert_matches(got, expected, x)


def test_cached_offsets_and_batched_inputs():
    weight = sparse_weight(OUT_FEATURES, 136, torch.float16, seed=4)
    w = packed(weight, cache_offsets=True)
    x = activations(6, 136, torch.float16).reshape(2, 3, 136)
    got = tk.triton_linear(x, w)  # 6 rows: the GEMM by row count
    assert got.shape == (2, 3, OUT_FEATURES)
    assert_matches(got, KERNELS["reference"](x, w), x)


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_an_all_zero_weight_gives_the_bias(kernel):
    w = packed(torch.zeros(OUT_FEATURES, 72, dtype=torch.bfloat16))
    assert w.fmt.kept == 0
    x = activations(2, 72, torch.bfloat16)
    assert w.bias is not None
    assert torch.equal(tk.triton_linear(x, w, kernel), w.bias.expand(2, -1))


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_wrong_offsets_would_be_caught(kernel):
    """Rows hold different counts, so offsets taken from other rows, or none, put values in the
    wrong columns from the second 64-column block on: the kernel must read them."""
    weight = sparse_weight(OUT_FEATURES, 200, torch.float32, seed=5)
    right = packed(weight)
    offsets = right.offsets()
    assert (offsets[:, 1:] != offsets.roll(1, dims=0)[:, 1:]).any()
    x = activations(3 if kernel == "gemv" else 20, 200, torch.float32)
    expected = KERNELS["reference"](x, right)
    assert_matches(tk.triton_linear(x, right, kernel), expected, x)
    for wrong in (offsets.roll(1, dims=0), torch.zeros_like(offsets)):
        got = tk.triton_linear(x, right._replace(block_offsets=wrong), kernel)
        assert not torch.allclose(got, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("name", "rows"), [("triton_gemv", 2), ("triton_gemm", 9)])
def test_the_kernel_table_runs_these_kernels(name, rows):
    w = packed(sparse_weight(OUT_FEATURES, 72, torch.bfloat16, seed=6))
    x = activations(rows, 72, torch.bfloat16)
    assert_matches(KERNELS[name](x, w), KERNELS["reference"](x, w), x)
