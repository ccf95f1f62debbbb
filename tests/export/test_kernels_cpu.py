"""Native CPU kernels against the plain-torch reference, over a grid of awkward shapes, for every
instruction-set build this CPU can run (generic, AVX2, AVX-512, AMX: ``COMPRESS_CPU_ISA`` forces
each), so the paths of the other kinds of machine are exercised too.

The first test of each level builds its extension (about a minute; cached by source and level).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import ExportError, FormatError
from compress.formats.int import IntFormat, cpu, kernels, quantize_int
from compress.formats.int.linear import QuantLinear
from compress.ir import QuantizedWeight
from compress.utils.native import ISA_LEVELS, cpu_flags, cpu_isa

_NEEDS = {
    "avx2": "avx2, fma, f16c",
    "avx512": "avx512f/bw/vl/dq and avx512_vnni",
    "amx": "avx512_bf16, amx_tile and amx_bf16",
}


@pytest.fixture(params=ISA_LEVELS)
def isa(request, monkeypatch):
    """Each build this CPU can run, forced by COMPRESS_CPU_ISA; the others skip, saying why."""
    level = request.param
    runs = cpu_isa()
    if ISA_LEVELS.index(level) > ISA_LEVELS.index(runs):
        pytest.skip(f"this CPU runs the {runs} build at most; {level} needs {_NEEDS[level]}")
    monkeypatch.setenv("COMPRESS_CPU_ISA", level)
    assert cpu.native() is not None, f"the {level} build of the native kernels failed (see log)"
    assert cpu.isa() == level, f"asked for the {level} build, got {cpu.isa()} (see the log)"
    return level


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


def test_the_running_build_is_this_cpus_level(monkeypatch):
    monkeypatch.delenv("COMPRESS_CPU_ISA", raising=False)
    assert cpu.isa() == cpu_isa()
    assert cpu.vectorized() == (cpu_isa() != "generic")
    assert not cpu.amx() or cpu_isa() == "amx"


def test_each_build_reports_its_own_level_and_paths(isa):
    assert cpu.isa() == isa
    assert cpu.vectorized() == (isa != "generic")
    if isa != "amx":
        assert not cpu.amx()  # AMX code exists only in the amx build
    elif not cpu.amx():
        pytest.skip("this kernel refused the process AMX tile state (arch_prctl)")
    tiles = "bf16 tiles" if cpu.bf16_gemm_native() else "fp32 tiles"
    if isa == "amx":
        want = "amx"
    elif isa == "avx512" and "avx512_bf16" in cpu_flags():
        assert cpu.bf16_dot()
        want = f"avx512-bf16 to {cpu.DOT_MAX_ROWS} rows, then {tiles}"
    else:
        assert not cpu.bf16_dot()  # the AVX512-BF16 GEMM exists only in AVX-512 builds
        want = tiles
    assert cpu.gemm_path(torch.bfloat16, 128, 4096) == want
    assert cpu.gemm_path(torch.float32, 128, 4096) == "fp32 tiles"
    assert cpu.gemm_path(torch.bfloat16, 40, 4096) != "amx"  # 40-input groups: no whole tiles


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_native_kernels_match_reference_fp32(bits, symmetric, shape, isa):
    out_features, in_features, group = shape
    module = make(out_features, in_features, IntFormat(bits, group, symmetric))
    for batch in (1, 3, 17):
        x = torch.randn(batch, in_features)
        want = kernels.KERNELS["reference"](x, module.packed())
        for name in NATIVE:
            got = kernels.KERNELS[name](x, module.packed())
            assert got.shape == want.shape and got.dtype == torch.float32
            assert relative_error(got, want) < 1e-5, (name, batch)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_native_dequantize_is_exact(bits, symmetric, shape, isa):
    out_features, in_features, group = shape
    module = make(out_features, in_features, IntFormat(bits, group, symmetric), bias=False)
    args = (module.qweight, module.scales, module.qzeros, bits, group, in_features)
    assert torch.equal(cpu.dequantize(*args), module.dequantize(torch.float32))
    # bf16 tiles (AVX-512: lookup tables per group) round like the reference's .to(bfloat16)
    assert torch.equal(cpu.dequantize_bf16(*args), module.dequantize(torch.bfloat16))


# Shapes for the bf16 GEMM paths (AMX: 16-token blocks in pairs, 32-row weight tile pairs in
# panels of 128, 32-input blocks): token counts around 16 and 32, rows past a panel and not a
# multiple of 16, inputs not a multiple of 32 (per-channel), and groups without whole 32-input
# blocks (g 40, g 24: bf16 tiles even on AMX).
BF16_GEMM_SHAPES = [
    (200, 256, 64),
    (129, 320, 32),
    (17, 100, None),
    (33, 1152, 128),
    (40, 200, 40),
    (24, 72, 24),
    (64, 4096, None),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", BF16_GEMM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}")
def test_bf16_gemm_matches_reference(bits, shape, isa):
    """bf16 prefill multiplies the reference's own bf16 weights with fp32 accumulation: within
    bf16 rounding of the output of the exact product, as close as F.linear in bf16 gets."""
    out_features, in_features, group = shape
    module = make(out_features, in_features, IntFormat(bits, group, bits % 2 == 0))
    module.bias.data = module.bias.data.to(torch.bfloat16)
    weight = module.dequantize(torch.bfloat16).float()
    for tokens in (1, 15, 16, 17, 33, 70):
        x = torch.randn(tokens, in_features).to(torch.bfloat16)
        oracle = F.linear(x.float(), weight, module.bias.float())
        reference = kernels.KERNELS["reference"](x, module.packed())
        got = kernels.KERNELS["cpu_gemm"](x, module.packed())
        assert got.dtype == torch.bfloat16 and got.shape == reference.shape
        limit = max(1.5 * relative_error(reference, oracle), 4e-3)
        assert relative_error(got, oracle) <= limit, tokens


@pytest.mark.parametrize("tiles", [True, False])
def test_bf16_gemm_without_amx_uses_the_requested_tiles(tiles, isa):
    """The tile dtype for torch's GEMM follows the CPU (bf16 hardware or not); both are exercised
    on any machine: bf16 tiles match the reference's bf16 F.linear, fp32 tiles are closer."""
    module = make(48, 256, IntFormat(4, 64, True), bias=False)
    x = torch.randn(2, 9, 256).to(torch.bfloat16)
    oracle = F.linear(x.float(), module.dequantize(torch.bfloat16).float())
    got = cpu.gemm(x, module.qweight, module.scales, None, 4, 64, bf16_tiles=tiles, tile_rows=20)
    assert got.shape == (2, 9, 48) and got.dtype == torch.bfloat16
    assert relative_error(got, oracle) < 4e-3


DOT_SHAPES = [  # (out, in, group, tokens): panels, 16-row and 16-token blocks with their rests
    (48, 256, 64, 9),
    (130, 96, None, 37),  # N past whole blocks; one group, K = 3 blocks of 32
    (70, 200, None, 16),  # K with a tail of 8 inputs in its last block
    (300, 64, 32, 33),
    (96, 576, 64, 1),
]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", DOT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g{s[2]}m{s[3]}")
def test_avx512_bf16_gemm_matches_bf16_tiles(bits, symmetric, shape, isa):
    """Our AVX512-BF16 GEMM multiplies the same bf16 weights as the tiles do, exactly, with
    fp32 sums (only their order differs): outputs within a bf16 rounding of the tile path's,
    bias included. Runs wherever the CPU has VDPBF16PS (the avx512 build; the AVX2 build reports
    no such path)."""
    if not cpu.bf16_dot():
        if isa == "avx512" and not cpu.amx():
            assert "avx512_bf16" not in cpu_flags(), "the CPU has VDPBF16PS but the path is off"
        pytest.skip(f"no AVX512-BF16 GEMM in the {isa} build on this CPU")
    out_features, in_features, group, tokens = shape
    module = make(out_features, in_features, IntFormat(bits, group, symmetric))
    x = torch.randn(2, tokens, in_features).to(torch.bfloat16)
    args = (x, module.qweight, module.scales, module.qzeros, bits, group)
    dot = cpu.gemm(*args, bias=module.bias, dot_max_rows=2 * tokens)
    tiles = cpu.gemm(*args, bias=module.bias, dot_max_rows=0)
    assert dot.shape == tiles.shape == (2, tokens, out_features) and dot.dtype == torch.bfloat16
    oracle = F.linear(x.float(), module.dequantize(torch.bfloat16).float(), module.bias.float())
    assert relative_error(dot, tiles) < 2e-3
    assert relative_error(dot, oracle) <= max(1.2 * relative_error(tiles, oracle), 1e-3)
    assert cpu.gemm_path(torch.bfloat16, group, in_features, rows=2 * tokens) == "avx512-bf16"
    assert cpu.gemm_path(torch.bfloat16, group, in_features, rows=cpu.DOT_MAX_ROWS + 1) != (
        "avx512-bf16"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_half_activations_match_fp32_oracle(dtype, bits, batch, isa):
    """In fp32 (or int16 dots) inside, the native kernels are at least as close to exact as the
    reference, per-8 blocks (g 40) and whole 64-code blocks (g 64) alike."""
    group = 40 if bits == 7 else 64  # 7-bit codes have no int16 path
    module = make(33, 320, IntFormat(bits, group, False))
    x = torch.randn(2, batch, 320).to(dtype)
    oracle = kernels.KERNELS["reference"](x.float(), module.packed())
    reference = kernels.KERNELS["reference"](x, module.packed())
    for name in NATIVE:
        got = kernels.KERNELS[name](x, module.packed())
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
def test_int16_activation_path_matches_reference(bits, symmetric, shape, isa):
    """x rounded to int16 per chunk: within 1e-4 of exact (measured worst 3.4e-5); a wrong lane
    order, chunk scale or zero-point term is off by O(1)."""
    out_features, in_features, group = shape
    module = make(out_features, in_features, IntFormat(bits, group, symmetric), bias=False)
    for batch in (1, 3, 17):  # tiles of 4, 2 and 1 rows
        x = torch.randn(batch, in_features)
        want = kernels.KERNELS["reference"](x, module.packed())
        got = cpu.gemv(
            x, module.qweight, module.scales, module.qzeros, bits, group, int16_acts=True
        )
        assert relative_error(got, want) < 1e-4, batch


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32", "e8m0"])
def test_int16_path_reads_every_scale_dtype(scale_dtype, isa):
    """Scales of eight groups are loaded as one vector: K 1152 has a full octet and one more."""
    module = make(20, 1152, IntFormat(4, 128, True, scale_dtype=scale_dtype), bias=False)
    x = torch.randn(3, 1152)
    want = kernels.KERNELS["reference"](x, module.packed())
    got = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert relative_error(got, want) < 1e-4


def test_int16_path_with_an_outlier_channel(isa):
    """One activation 1000x the rest (as LLMs have) costs precision only inside its chunk."""
    module = make(64, 1024, IntFormat(4, 128, True), bias=False)
    x = torch.randn(1, 1024)
    x[0, 300] = 1000.0
    want = kernels.KERNELS["reference"](x.double().float(), module.packed())
    got = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert relative_error(got, want) < 1e-4


def test_int16_path_propagates_non_finite_activations_like_the_reference(isa):
    """A non-finite chunk has no int16 scale: the call falls back to fp32."""
    module = make(16, 256, IntFormat(4, 128, True), bias=False)
    x = torch.randn(2, 256)
    x[0, 5] = float("inf")
    x[1, 200] = float("nan")
    want = kernels.KERNELS["reference"](x, module.packed())
    got = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert not want.isfinite().any()  # inf * weights of both signs: inf or nan everywhere
    assert torch.equal(got.isfinite(), want.isfinite())


def test_half_activations_take_the_int16_path_and_fp32_the_exact_one():
    module = make(33, 512, IntFormat(4, 128, True), bias=False)
    x = torch.randn(1, 512)
    exact = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=False)
    rounded = cpu.gemv(x, module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert not torch.equal(exact, rounded)  # the int16 rounding shows in the last bits
    assert torch.equal(kernels.KERNELS["cpu_gemv"](x, module.packed()), exact)
    x16 = x.to(torch.bfloat16)
    rounded16 = cpu.gemv(x16.float(), module.qweight, module.scales, None, 4, 128, int16_acts=True)
    assert torch.equal(
        kernels.KERNELS["cpu_gemv"](x16, module.packed()), rounded16.to(torch.bfloat16)
    )


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32", "e8m0"])
def test_every_scale_dtype(scale_dtype, isa):
    module = make(40, 128, IntFormat(4, 64, True, scale_dtype=scale_dtype))
    x = torch.randn(3, 128)
    want = kernels.KERNELS["reference"](x, module.packed())
    for name in NATIVE:
        assert relative_error(kernels.KERNELS[name](x, module.packed()), want) < 1e-5, name


def test_tile_boundaries_of_the_gemm(isa):
    """Row tiles that do not divide N, and a tile of one row."""
    module = make(37, 64, IntFormat(3, 32, False), bias=False)
    x = torch.randn(5, 64)
    want = kernels.KERNELS["reference"](x, module.packed())
    for tile in (1, 8, 36, 1000):
        got = cpu.gemm(x, module.qweight, module.scales, module.qzeros, 3, 32, tile_rows=tile)
        assert relative_error(got, want) < 1e-5, tile


def test_group_that_does_not_divide_the_input_is_refused():
    """The format has no ragged last group: such a group size is rejected before packing."""
    with pytest.raises(FormatError, match="does not divide the input dimension 100"):
        make(8, 100, IntFormat(4, 64))


def test_selection_by_rows_and_override(monkeypatch):
    monkeypatch.delenv("COMPRESS_CPU_ISA", raising=False)
    fmt = IntFormat(4, 128)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        most = cpu.gemv_max_rows(dtype)
        assert 1 <= most <= kernels.GEMV_MAX_ROWS
        assert kernels.select(fmt, 4096, rows=1, dtype=dtype) == "cpu_gemv"
        assert kernels.select(fmt, 4096, rows=most, dtype=dtype) == "cpu_gemv"
        assert kernels.select(fmt, 4096, rows=most + 1, dtype=dtype) == "cpu_gemm"
    build = cpu.isa()
    rows = cpu.gemv_max_rows(torch.bfloat16)
    how = cpu.gemm_path(torch.bfloat16, 128, 4096)
    assert kernels.describe(fmt, 4096) == (
        f"cpu_gemv (≤{rows} rows; int16 dots), cpu_gemm ({how}); {build} build"
    )
    assert kernels.describe(IntFormat(7, 128), 4096).startswith(f"cpu_gemv (≤{rows} rows), ")
    rows32 = cpu.gemv_max_rows(torch.float32)
    assert kernels.describe(IntFormat(4, 32), 4096, dtype=torch.float32) == (
        f"cpu_gemv (≤{rows32} rows), cpu_gemm (fp32 tiles); {build} build"
    )
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    assert kernels.select(fmt, 4096, rows=1, dtype=torch.float32) == "reference"
    assert kernels.describe(fmt, 4096) == "reference"
    monkeypatch.setenv("COMPRESS_KERNEL", "cpu_gemv")
    assert kernels.describe(fmt, 4096) == f"cpu_gemv (int16 dots); {build} build"
    monkeypatch.setenv("COMPRESS_KERNEL", "refrence")
    with pytest.raises(ExportError, match="did you mean 'reference'"):
        kernels.select(fmt, 4096, rows=1, dtype=torch.float32)


def test_crossover_follows_the_build(isa):
    """Measured per build and dtype (cpu.gemv_max_rows): the AMX GEMM takes over earliest."""
    bf16 = cpu.gemv_max_rows(torch.bfloat16)
    if isa == "generic":
        assert bf16 == 1 and cpu.gemv_max_rows(torch.float32) == 1
    elif cpu.amx():
        assert bf16 == 4
    else:
        assert bf16 == (8 if cpu.bf16_gemm_native() else 16)
    assert kernels.describe(IntFormat(4, 128), 4096).endswith(f"; {isa} build")


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
    with caplog.at_level("INFO", logger="compress.formats.int.kernels"):
        got = module(x)
    assert "'cpu_gemv'" in caplog.text
    assert relative_error(got, kernels.KERNELS["reference"](x, module.packed())) < 1e-5


def test_decode_choice_is_remembered_but_follows_the_override(monkeypatch):
    """Decode remembers its kernel per (rows, dtype, device, COMPRESS_KERNEL, COMPRESS_CPU_ISA):
    setting a variable between calls still switches the path."""
    module = make(24, 128, IntFormat(4, 64, True))
    x = torch.randn(1, 128)
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    native = module(x)
    assert torch.equal(native, kernels.KERNELS["cpu_gemv"](x, module.packed()))
    reference = kernels.KERNELS["reference"](x, module.packed())
    assert not torch.equal(native, reference)  # else the switch could not be seen
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    assert torch.equal(module(x), reference)
    monkeypatch.delenv("COMPRESS_KERNEL")
    assert torch.equal(module(x), native)
    assert sorted(module._decode_kernels.values()) == ["cpu_gemv", "reference"]


def test_decode_choice_follows_a_forced_build(monkeypatch):
    """The remembered decode kernel is keyed by COMPRESS_CPU_ISA too: the portable build hands
    two rows to the GEMM, the AVX2 build keeps them in the GEMV."""
    if cpu_isa() == "generic":
        pytest.skip("this CPU runs the generic build only; the test needs avx2 beside it")
    module = make(24, 128, IntFormat(4, 64, True))
    x = torch.randn(2, 128)
    monkeypatch.setenv("COMPRESS_CPU_ISA", "generic")
    module(x)
    monkeypatch.setenv("COMPRESS_CPU_ISA", "avx2")
    module(x)
    assert sorted(module._decode_kernels.values()) == ["cpu_gemm", "cpu_gemv"]


def test_prefill_choice_is_remembered_once_for_every_row_count_above_the_gemv():
    module = make(24, 128, IntFormat(4, 64, True))
    for rows in (kernels.GEMV_MAX_ROWS + 1, 100, 512):
        x = torch.randn(rows, 128)
        assert torch.equal(module(x), kernels.KERNELS["cpu_gemm"](x, module.packed()))
    assert list(module._decode_kernels.values()) == ["cpu_gemm"]
