"""The FP8 and 4-bit table formats' Triton kernels against their reference dequantization. Without
CUDA they run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before import)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `gpu` extra is not installed")

from compress.formats import triton_tiles
from compress.formats.fp4 import FP4Format, quantize_fp4
from compress.formats.fp4 import triton_kernels as fp4_tk
from compress.formats.fp4.packed import pack_fp4_codes
from compress.formats.fp4.table import PackedTable
from compress.formats.fp8 import FP8Format
from compress.formats.fp8 import triton_kernels as fp8_tk
from compress.formats.fp8.packed import PackedFP8

if torch.cuda.is_available() == triton_tiles.INTERPRETED:  # imported earlier in the other mode
    triton_tiles = importlib.reload(triton_tiles)
    fp8_tk = importlib.reload(fp8_tk)
    fp4_tk = importlib.reload(fp4_tk)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = [("gemv", 1), ("gemv", 3), ("gemm", 6)]


def on_device(packed):
    return type(packed)(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in packed))


def check(triton_linear, w, in_features, kernel, rows):
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    expected = torch.nn.functional.linear(x, w.dequantize().to(DEVICE), w.bias)
    got = triton_linear(x, w, kernel)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "fmt",
    [
        FP8Format("e4m3", "channel"),
        FP8Format("e5m2", "tensor"),
        FP8Format("e4m3", "block", 48),
        FP8Format("e4m3", "mx"),
    ],
    ids=lambda f: f.label(),
)
@pytest.mark.parametrize(("kernel", "rows"), KERNELS)
def test_fp8_kernels_match_the_reference(fmt, kernel, rows):
    weight = torch.randn(40, 160, generator=torch.Generator().manual_seed(0))
    weight[0, :3] = torch.tensor([2e-6, -3e-5, 40.0])  # subnormal codes and an outlier
    codes, scales, _ = fmt.quantize(weight)
    w = on_device(PackedFP8(codes, scales, torch.randn(40), fmt))
    check(fp8_tk.triton_linear, w, 160, kernel, rows)


@pytest.mark.parametrize(
    "fmt",
    [FP4Format("nf4"), FP4Format("fp4"), FP4Format("mxfp4"), FP4Format("nvfp4")],
    ids=str,
)
@pytest.mark.parametrize(("kernel", "rows"), KERNELS)
def test_fp4_kernels_match_the_reference(fmt, kernel, rows):
    weight = torch.randn(40, 192, generator=torch.Generator().manual_seed(0)) * 0.05
    codes, scales, tensor_scale = quantize_fp4(weight, fmt)
    packed = PackedTable(pack_fp4_codes(codes), scales, tensor_scale, torch.randn(40), fmt, 192)
    check(fp4_tk.triton_linear, on_device(packed), 192, kernel, rows)


def test_a_wrong_scale_decode_would_be_caught():
    """E8M0 scales must be decoded as exponents: read as plain numbers the product is off."""
    fmt = FP8Format("e4m3", "mx")
    codes, scales, _ = fmt.quantize(torch.randn(8, 64))
    w = on_device(PackedFP8(codes, scales, None, fmt))
    x = torch.randn(2, 64).to(DEVICE)
    wrong = triton_tiles.Tile(fp8_tk._fp8_tile, [w.qweight, w.scales], [64, 1, 32, 2], [1, 0])
    got = triton_tiles.linear(x, wrong, 8, 64, None)
    assert not torch.allclose(got, torch.nn.functional.linear(x, w.dequantize().to(DEVICE)))
