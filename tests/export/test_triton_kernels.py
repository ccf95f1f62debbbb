"""Triton kernels against the plain-torch reference.

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, which must be
set before the module is imported); with CUDA the same grid runs compiled on the GPU, plus the
``gpu``-marked tests at real model shapes and half precision.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `gpu` extra is not installed")

from compress.errors import FormatError
from compress.formats import triton_tiles
from compress.formats.int import IntFormat, quantize_int
from compress.formats.int import triton_kernels as tk
from compress.formats.int.linear import QuantLinear
from compress.ir import QuantizedWeight

if torch.cuda.is_available() == triton_tiles.INTERPRETED:  # imported earlier in the other mode
    triton_tiles = importlib.reload(triton_tiles)
    tk = importlib.reload(tk)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def packed_linear(
    out_features: int,
    in_features: int,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    *,
    bias: bool = False,
    seed: int = 0,
    scale_dtype: str = "float16",
) -> QuantLinear:
    """A real QuantLinear packed from a random Linear quantized round-to-nearest."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    fmt = IntFormat(bits, group_size, symmetric, scale_dtype)  # type: ignore[arg-type]
    codes, scales, zeros = quantize_int(linear.weight, fmt)
    module = QuantLinear.from_record(linear, QuantizedWeight(codes, scales, zeros, fmt))
    return module.to(DEVICE)


def reference(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """fp64 oracle: the dense dequantized weight times the input."""
    out = x.double() @ module.dequantize(torch.float64).T
    if module.bias is not None:
        out = out + module.bias.double()
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12))


KERNELS = {"gemm": tk.dequant_gemm, "gemv": tk.splitk_gemv}


@pytest.mark.parametrize("bits", [3, 8])
def test_power_of_two_scales_are_decoded_in_the_kernel(bits: int) -> None:
    """E8M0 exponent bytes (block floating point) become 2**(e-127) inside the tile decode."""
    module = packed_linear(70, 96, bits, 32, True, seed=bits, scale_dtype="e8m0")
    assert module.scales.dtype == torch.uint8
    x = torch.randn(3, 96, device=DEVICE)
    want = reference(module, x)
    for name, kernel in KERNELS.items():
        assert relative_error(kernel(module.packed(), x), want) < 1e-5, name


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_both_kernels_match_reference(bits: int, symmetric: bool, rows: int) -> None:
    # N=70, K=96: neither a multiple of the 64-wide tiles; g=32: two groups per K tile.
    module = packed_linear(70, 96, bits, 32, symmetric, seed=bits)
    x = torch.randn(rows, 96, device=DEVICE)
    want = reference(module, x)
    for name, kernel in KERNELS.items():
        got = kernel(module.packed(), x)
        assert got.shape == (rows, 70) and got.dtype == x.dtype, name
        assert relative_error(got, want) < 1e-5, name


@pytest.mark.parametrize(
    ("out_features", "in_features", "group_size"),
    [
        (33, 200, 40),  # odd N; K, group not powers of two; K*b/8 not whole for odd b
        (130, 72, None),  # per-channel; K shorter than one K tile
        (5, 24, 8),  # fewer outputs than one tile; many groups per tile
        (17, 328, 164),  # a group spans K tiles (block_k 64, 128)
    ],
)
@pytest.mark.parametrize("bits", [3, 4, 5])
def test_awkward_shapes(
    out_features: int, in_features: int, group_size: int | None, bits: int
) -> None:
    symmetric = bits != 4
    module = packed_linear(out_features, in_features, bits, group_size, symmetric, seed=7)
    for rows in (1, 3):
        x = torch.randn(rows, in_features, device=DEVICE)
        want = reference(module, x)
        for name, kernel in KERNELS.items():
            assert relative_error(kernel(module.packed(), x), want) < 1e-5, (name, rows)


@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_gemv_split_counts_agree(splits: int) -> None:
    # K=320 is 5 K-blocks of 64; 3 splits round to 2 blocks each, so the last split is short.
    module = packed_linear(40, 320, 6, 64, False, seed=3)
    x = torch.randn(2, 320, device=DEVICE)
    got = tk.splitk_gemv(module.packed(), x, block_k=64, splits=splits)
    assert relative_error(got, reference(module, x)) < 1e-5


def test_gemm_tile_sizes_agree() -> None:
    module = packed_linear(50, 112, 3, 16, True, seed=4)
    x = torch.randn(20, 112, device=DEVICE)
    want = reference(module, x)
    for block_m, block_n, block_k in [(16, 16, 16), (32, 64, 32), (16, 32, 128)]:
        got = tk.dequant_gemm(module.packed(), x, block_m=block_m, block_n=block_n, block_k=block_k)
        assert relative_error(got, want) < 1e-5, (block_m, block_n, block_k)


@pytest.mark.parametrize("rows", [1, 5])
def test_triton_linear_bias_and_leading_dims(rows: int) -> None:
    # rows 1 takes the GEMV, 5 the GEMM; a (batch, seq, K) input keeps its leading dims.
    module = packed_linear(24, 48, 4, 16, False, bias=True, seed=5)
    x = torch.randn(1, rows, 48, device=DEVICE)
    got = tk.triton_linear(x, module.packed())
    assert got.shape == (1, rows, 24)
    assert relative_error(got.reshape(rows, 24), reference(module, x.reshape(rows, 48))) < 1e-5


@pytest.mark.parametrize(("rows", "kernel"), [(1, "triton_gemv"), (17, "triton_gemm")])
def test_quantlinear_dispatches_to_triton(
    monkeypatch: pytest.MonkeyPatch, rows: int, kernel: str
) -> None:
    from compress.formats.int import kernels

    assert kernels._TRITON_GEMV_MAX_ROWS == tk.GEMV_MAX_ROWS  # one crossover, kept in step
    fmt = IntFormat(bits=5, group_size=16, symmetric=False)
    assert kernels.select(fmt, 48, rows=rows, dtype=torch.float16, device="cuda") == kernel
    # On CPU the interpreter runs the same dispatch when the kernel is forced.
    if DEVICE == "cpu":
        monkeypatch.setenv("COMPRESS_KERNEL", kernel)
    module = packed_linear(24, 48, 5, 16, False, bias=True, seed=6)
    assert module._select(rows=rows, dtype=torch.float32) == kernel
    x = torch.randn(rows, 48, device=DEVICE)
    assert relative_error(module(x), reference(module, x)) < 1e-5


def test_wrong_input_width_is_refused() -> None:
    module = packed_linear(8, 32, 4, 16, True)
    with pytest.raises(FormatError, match="input has 31 features, the packed layer expects 32"):
        tk.dequant_gemm(module.packed(), torch.randn(2, 31, device=DEVICE))


def test_cpu_tensors_need_the_interpreter_or_cuda() -> None:
    assert tk.available(DEVICE)
    assert not tk.available("mps")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, 4, 16, 64])
@pytest.mark.parametrize(
    ("out_features", "in_features"), [(4096, 4096), (11008, 4096), (1536, 576)]
)
def test_gpu_model_shapes_half_precision(
    out_features: int, in_features: int, rows: int, bits: int, dtype: torch.dtype
) -> None:
    module = packed_linear(out_features, in_features, bits, 64, bits != 4)
    x = torch.randn(rows, in_features, device=DEVICE, dtype=dtype)
    want = reference(module, x)
    for name, kernel in KERNELS.items():
        # Half-precision inputs and a half-precision output: a few ulps of the largest value.
        assert relative_error(kernel(module.packed(), x), want) < 2e-2, name
