"""The MXFP6 Triton kernels against their reference dequantization. Without CUDA they run in
Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before import, as
``tests/formats/test_float_triton.py`` does)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `gpu` extra is not installed")

from compress.formats import triton_tiles
from compress.formats.fp4.table import PackedTable
from compress.formats.fp6 import VARIANTS, FP6Format, quantize_fp6
from compress.formats.fp6 import triton_kernels as fp6_tk
from compress.formats.fp6.packed import pack_fp6_codes

if torch.cuda.is_available() == triton_tiles.INTERPRETED:  # imported earlier in the other mode
    triton_tiles = importlib.reload(triton_tiles)
    fp6_tk = importlib.reload(fp6_tk)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def packed(fmt: FP6Format, out_features: int, in_features: int) -> PackedTable:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    weight[0, :3] = torch.tensor([1e-4, -3e-3, 2.0])  # subnormal codes beside a large value
    codes, scales, _ = quantize_fp6(weight * 0.05, fmt)
    bias = torch.randn(out_features, generator=torch.Generator().manual_seed(1))
    w = PackedTable(pack_fp6_codes(codes), scales, None, bias, fmt, in_features)
    return PackedTable(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w))


@pytest.mark.parametrize("fmt", [FP6Format(v) for v in VARIANTS], ids=str)
@pytest.mark.parametrize(("kernel", "rows"), [("gemv", 1), ("gemv", 3), ("gemm", 6)])
@pytest.mark.parametrize("in_features", [192, 70])  # 70: a partial block, a row of 52.5 bytes
def test_fp6_kernels_match_the_reference(fmt, kernel, rows, in_features):
    w = packed(fmt, 40, in_features)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(DEVICE)
    expected = torch.nn.functional.linear(x, w.dequantize(), w.bias)
    got = fp6_tk.triton_linear(x, w, kernel)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
