"""The N:M sparse format's Triton kernels against the reference. Without CUDA they run in Triton's
CPU interpreter (``TRITON_INTERPRET=1``, set before the kernels are imported)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `gpu` extra is not installed")

from compress.formats import triton_tiles
from compress.formats.int import triton_kernels as int_tk
from compress.formats.nm import triton_kernels as tk
from compress.formats.nm.packed import PackedNM, pack_nm
from compress.formats.nm.spec import NMIntFormat
from compress.formats.packing import pack_codes

if torch.cuda.is_available() == triton_tiles.INTERPRETED:  # imported earlier in the other mode
    int_tk = importlib.reload(int_tk)
    triton_tiles = importlib.reload(triton_tiles)
    tk = importlib.reload(tk)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FORMATS = [
    NMIntFormat(2, 4, 4, 64),
    NMIntFormat(2, 4, 3, 32, symmetric=False),
    NMIntFormat(4, 8, 4, 64, scale_dtype="e8m0"),
    NMIntFormat(1, 4, 2, None),
]


def packed(fmt: NMIntFormat, out_features: int, in_features: int, *, seed: int = 0) -> PackedNM:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    codes, scales, zeros = fmt.quantize(weight)
    qweight, qindex = pack_nm(codes, zeros, fmt)
    qzeros = None if zeros is None else pack_codes(zeros.reshape(1, -1), fmt.bits)[0]
    bias = torch.randn(out_features, generator=generator)
    w = PackedNM(qweight, qindex, scales, qzeros, bias, fmt, in_features)
    return PackedNM(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label())
@pytest.mark.parametrize(("kernel", "rows"), [("gemv", 1), ("gemv", 3), ("gemm", 5)])
def test_kernels_match_the_reference(fmt, kernel, rows):
    w = packed(fmt, 40, 192, seed=rows)
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    expected = torch.nn.functional.linear(x, w.dequantize().to(DEVICE), w.bias)
    got = tk.triton_linear(x, w, kernel)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_a_broken_position_decode_would_be_caught():
    """Positions matter: the same kept codes at other positions give another product."""
    w = packed(NMIntFormat(2, 4, 4, 64), 16, 128)
    x = torch.randn(2, 128).to(DEVICE)
    shifted = w._replace(qindex=w.qindex ^ 0x55)  # every 2-bit position flipped in its low bit
    assert not torch.allclose(tk.triton_linear(x, shifted, "gemv"), tk.triton_linear(x, w, "gemv"))
    expected = torch.nn.functional.linear(x, shifted.dequantize().to(DEVICE), w.bias)
    assert torch.allclose(tk.triton_linear(x, shifted, "gemv"), expected, rtol=1e-4, atol=1e-3)
