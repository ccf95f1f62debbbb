"""Native CPU kernels against the plain-torch reference, over a grid of awkward shapes.

The first test in a session builds the extension (tens of seconds; cached by source hash after).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.errors import ExportError, FormatError
from compress.export import cpu, kernels
from compress.export.qlinear import QuantLinear
from compress.formats import IntFormat, quantize_int
from compress.ir import QuantizedWeight

# (out, in, group). Covers every code path of qmatmul.cpp: 64-code super-blocks (g 64/128 and
# per-channel with K a multiple of 64), super-blocks plus an 8-code tail (per-channel K=200),
# per-8 blocks (g 24, 40), a partial last block (per-channel K=100, 130) and the scalar path
# for groups that are not a multiple of 8 (g 20). No dim is a multiple of 64 except where a
# super-block needs it.
SHAPES = [
    (24, 72, 24),
    (17, 100, None),
    (33, 200, 40),
    (5, 60, 20),
    (9, 192, 64),
    (7, 200, None),
    (65, 256, 128),
    (3, 130, None),
]
BITS = [2, 3, 4, 5, 6, 7, 8]
NATIVE = ["cpu_gemv", "cpu_gemm"]


def make(out_features, in_features, fmt, *, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    codes, scales, zeros = quantize_int(linear.weight, fmt)
    return QuantLinear.from_record(linear, QuantizedWeight(codes, scales, zeros, fmt))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def test_extension_builds():
    assert cpu.native() is not None, "the native CPU kernels did not build (see the log)"


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_native_kernels_match_reference_fp32(bits, symmetric, shape):
    out_features, in_features, group = shape
    module = make(out_features, in_features, IntFormat(bits, group, symmetric))
    for batch in (1, 3, 17):
        x = torch.randn(batch, in_features)
        want = kernels.KERNELS["reference"](module, x)
        for name in NATIVE:
            got = kernels.KERNELS[name](module, x)
            assert got.shape == want.shape and got.dtype == torch.float32
            assert relative_error(got, want) < 1e-5, (name, batch)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_native_dequantize_is_exact(bits, symmetric, shape):
    out_features, in_features, group = shape
    module = make(out_features, in_features, IntFormat(bits, group, symmetric), bias=False)
    native = cpu.dequantize(module.qweight, module.scales, module.qzeros, bits, group, in_features)
    assert torch.equal(native, module.dequantize(torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_half_activations_match_fp32_oracle(dtype, bits, batch):
    """In fp32 (or int16 dots) inside, the native kernels are at least as close to exact as the
    reference, per-8 blocks (g 40) and whole 64-code blocks (g 64) alike."""
    group = 40 if bits == 7 else 64  # 7-bit codes have no int16 path
    module = make(33, 320, IntFormat(bits, group, False))
    x = torch.randn(2, batch, 320).to(dtype)
    oracle = kernels.KERNELS["reference"](module, x.float())
    reference = kernels.KERNELS["reference"](module, x)
    for name in NATIVE:
        got = kernels.KERNELS[name](module, x)
        assert got.dtype == dtype and got.shape == (2, batch, 33)
        assert relative_error(got, oracle) <= max(relative_error(reference, oracle), 4e-3), name


# Shapes for the int16-activation path (whole 64-code blocks): chunks of 64 (g 64) and 128
# (g 128, per-channel), several chunks per group (g 256, g 192 = three 64-chunks), a partial
# last octet of chunks (K 1152 = 9 groups) and a per-channel fp32 tail (K 1088 + 8, K 200).
INT16_SHAPES = [
    (9, 192, 64),
    (65, 256, 128),
    (7, 200, None),
    (40, 1152, 128),
    (12, 1024, 256),
    (12, 1152, 192),
    (10, 1096, None),
    (6, 4096, None),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", INT16_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_int16_activation_path_matches_reference(bits, symmetric, shape):
    """x rounded to int16 per chunk: within 1e-4 of exact (measured worst 3.4e-5); a wrong lane
    order, chunk scale or zero-point term is off by O(1)."""
    out_features, in_features, group = shape
    module = make(out_features, in_features, IntFormat(bits, group, symmetric), bias=False)
    for batch in (1, 3, 17):  # tiles of 4, 2 and 1 rows
        x = torch.randn(batch, in_features)
        want = kernels.KERNELS["reference"](module, x)
        got = cpu.gemv(
            x, module.qweight, module.scales, module.qzeros, bits, group, int16_acts=True
        )
        assert relative_error(got, want) < 1e-4, batch


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_int16_path_reads_every_scale_dtype(scale_dtype):
    """Scales of eight groups are loaded as one vector: K 1152 has a full octet and one more."""
    module = make(20, 1152, IntFormat(4, 128, True, scale_dtype=scale_dtype), bias=False)
    x = torch.randn(3, 1152)
    want = kernels.KERNELS["reference"](module, x)
    got = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert relative_error(got, want) < 1e-4


def test_int16_path_with_an_outlier_channel():
    """One activation 1000x the rest (as LLMs have) costs precision only inside its chunk."""
    module = make(64, 1024, IntFormat(4, 128, True), bias=False)
    x = torch.randn(1, 1024)
    x[0, 300] = 1000.0
    want = kernels.KERNELS["reference"](module, x.double().float())
    got = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert relative_error(got, want) < 1e-4


def test_int16_path_propagates_non_finite_activations_like_the_reference():
    """A non-finite chunk has no int16 scale: the call falls back to fp32."""
    module = make(16, 256, IntFormat(4, 128, True), bias=False)
    x = torch.randn(2, 256)
    x[0, 5] = float("inf")
    x[1, 200] = float("nan")
    want = kernels.KERNELS["reference"](module, x)
    got = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert not want.isfinite().any()  # inf * weights of both signs: inf or nan everywhere
    assert torch.equal(got.isfinite(), want.isfinite())


def test_half_activations_take_the_int16_path_and_fp32_the_exact_one():
    module = make(33, 512, IntFormat(4, 128, True), bias=False)
    x = torch.randn(1, 512)
    exact = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=False)
    rounded = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert not torch.equal(exact, rounded)  # the int16 rounding shows in the last bits
    assert torch.equal(kernels.KERNELS["cpu_gemv"](module, x), exact)
    x16 = x.to(torch.bfloat16)
    rounded16 = cpu.gemv(x16.float(), module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert torch.equal(kernels.KERNELS["cpu_gemv"](module, x16), rounded16.to(torch.bfloat16))


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_every_scale_dtype(scale_dtype):
    module = make(40, 128, IntFormat(4, 64, True, scale_dtype=scale_dtype))
    x = torch.randn(3, 128)
    want = kernels.KERNELS["reference"](module, x)
    for name in NATIVE:
        assert relative_error(kernels.KERNELS[name](module, x), want) < 1e-5, name


def test_tile_boundaries_of_the_gemm():
    """Row tiles that do not divide N, and a tile of one row."""
    module = make(37, 64, IntFormat(3, 32, False), bias=False)
    x = torch.randn(5, 64)
    want = kernels.KERNELS["reference"](module, x)
    for tile in (1, 8, 36, 1000):
        got = cpu.gemm(x, module.qweight, module.scales, module.qzeros, 3, 32, tile_rows=tile)
        assert relative_error(got, want) < 1e-5, tile


def test_group_that_does_not_divide_the_input_is_refused():
    """The format has no ragged last group: such a group size is rejected before packing."""
    with pytest.raises(FormatError, match="does not divide the input dimension 100"):
        make(8, 100, IntFormat(4, 64))


def test_selection_by_rows_and_override(monkeypatch):
    fmt = IntFormat(4, 128)
    assert kernels.select(fmt, 4096, rows=1, dtype=torch.bfloat16) == "cpu_gemv"
    assert kernels.select(fmt, 4096, rows=kernels.GEMV_MAX_ROWS, dtype=torch.float32) == "cpu_gemv"
    assert kernels.select(fmt, 4096, rows=kernels.GEMV_MAX_ROWS + 1, dtype=torch.float32) == (
        "cpu_gemm"
    )
    rows = kernels.GEMV_MAX_ROWS
    assert kernels.describe(fmt, 4096) == (
        f"cpu_gemv (≤{rows} rows; int16 dots for bf16/fp16 activations), cpu_gemm"
    )
    assert kernels.describe(IntFormat(7, 128), 4096) == f"cpu_gemv (≤{rows} rows), cpu_gemm"
    assert kernels.describe(IntFormat(4, 32), 4096) == f"cpu_gemv (≤{rows} rows), cpu_gemm"
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    assert kernels.select(fmt, 4096, rows=1, dtype=torch.float32) == "reference"
    assert kernels.describe(fmt, 4096) == "reference"
    monkeypatch.setenv("COMPRESS_KERNEL", "cpu_gemv")
    assert kernels.describe(fmt, 4096) == "cpu_gemv (int16 dots for bf16/fp16 activations)"
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    monkeypatch.setenv("COMPRESS_KERNEL", "refrence")
    with pytest.raises(ExportError, match="did you mean 'reference'"):
        kernels.select(fmt, 4096, rows=1, dtype=torch.float32)


def test_without_the_native_build_the_torch_paths_are_chosen(monkeypatch):
    monkeypatch.setattr(cpu, "native", lambda: None)
    int8 = IntFormat(8, None, True)
    assert kernels.select(int8, 64, rows=1, dtype=torch.bfloat16) == "torch_int8"
    assert kernels.select(int8, 64, rows=1, dtype=torch.float32) == "reference"
    assert kernels.select(IntFormat(4, 32), 64, rows=1, dtype=torch.bfloat16) == "reference"
    assert "unavailable" in kernels.describe(IntFormat(4, 32), 64)


def test_forward_takes_the_selected_path_and_logs_it(caplog):
    module = make(24, 72, IntFormat(4, 24, True))
    x = torch.randn(1, 2, 72)
    kernels._LOGGED.clear()
    with caplog.at_level("INFO", logger="compress.export.kernels"):
        got = module(x)
    assert "'cpu_gemv'" in caplog.text
    assert relative_error(got, kernels.KERNELS["reference"](module, x)) < 1e-5


def test_decode_choice_is_remembered_but_follows_the_override(monkeypatch):
    """Decode remembers its kernel per (rows, dtype, device, COMPRESS_KERNEL): setting the
    variable between calls still switches the path."""
    module = make(24, 128, IntFormat(4, 64, True))
    x = torch.randn(1, 128)
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    native = module(x)
    assert torch.equal(native, kernels.KERNELS["cpu_gemv"](module, x))
    reference = kernels.KERNELS["reference"](module, x)
    assert not torch.equal(native, reference)  # else the switch could not be seen
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    assert torch.equal(module(x), reference)
    monkeypatch.delenv("COMPRESS_KERNEL")
    assert torch.equal(module(x), native)
    assert sorted(module._decode_kernels.values()) == ["cpu_gemv", "reference"]
