"""OCP MXFP6 (E2M3, E3M2): tables, rounding, E8M0 scales, packing, the packed modules against
the reference, rtn recipes, export and reload."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (registers the transformers quantizer)
from compress.errors import FormatError, RecipeError
from compress.formats import format_from_dict, format_kinds
from compress.formats.fp4.table import PackedTable
from compress.formats.fp6 import VARIANTS, FP6Format, dequantize_fp6, quantize_fp6
from compress.formats.fp6 import cpu as fp6_cpu
from compress.formats.fp6 import kernels as fp6_kernels
from compress.formats.fp6 import spec as fp6_spec
from compress.formats.fp6.linear import FP6Embedding, FP6Linear
from compress.formats.fp6.packed import pack_fp6_codes, unpack_fp6_codes
from compress.ir import get_quantized
from compress.pipeline import Pipeline
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import load_recipe, parse_recipe
from compress.registry import PassContext
from tests.conftest import NATIVE_TEST_LEVELS, entropy_coded_export_reloads, force_native_build
from tests.formats.table_checks import TableKit, seeded

RECIPES = Path(__file__).resolve().parent.parent.parent / "recipes"
FORMATS = [FP6Format(v) for v in VARIANTS]
SHAPES = [(1, 1), (7, 5), (37, 70), (64, 128), (96, 33), (3, 17)]

KIT = TableKit(
    quantize=quantize_fp6,
    linear=FP6Linear,
    embedding=FP6Embedding,
    kernels=fp6_kernels,
    cpu=fp6_cpu,
)
packed_linear = KIT.packed_linear


# Hand-derived from the OCP v1.0 bit layouts (sign | exponent | mantissa), 6-bit code -> value.
E2M3_CODES = {
    0b000000: 0.0,
    0b000001: 0.125,  # smallest subnormal: 1/8 * 2**(1-1)
    0b000111: 0.875,  # largest subnormal
    0b001000: 1.0,  # smallest normal: e=1, bias 1
    0b001101: 1.625,
    0b010000: 2.0,
    0b011000: 4.0,
    0b011111: 7.5,  # largest: 1.875 * 2**2
    0b100001: -0.125,
    0b111111: -7.5,
}
E3M2_CODES = {
    0b000000: 0.0,
    0b000001: 0.0625,  # smallest subnormal: 1/4 * 2**(1-3)
    0b000011: 0.1875,
    0b000100: 0.25,  # smallest normal: e=1, bias 3
    0b001100: 1.0,
    0b010101: 5.0,  # 1.25 * 2**(5-3)
    0b011110: 24.0,
    0b011111: 28.0,  # largest: 1.75 * 2**4
    0b100100: -0.25,
    0b111111: -28.0,
}


# ------------------------------------------------------------------------------ the tables


def test_the_kind_is_registered_and_round_trips():
    assert "fp6" in format_kinds()
    for fmt in FORMATS:
        assert format_from_dict(fmt.to_dict()) == fmt
    assert FP6Format().to_dict() == {"kind": "fp6", "variant": "e2m3", "block_size": 32}


@pytest.mark.parametrize(("variant", "expected"), [("e2m3", E2M3_CODES), ("e3m2", E3M2_CODES)])
def test_tables_hold_the_hand_derived_values(variant, expected):
    table = FP6Format(variant).table
    assert table.shape == (64,) and table.dtype == torch.float32
    assert {code: float(table[code]) for code in expected} == expected
    assert torch.equal(table[32:], -table[:32])  # bit 5 is the sign
    assert bool((table[1:32] > table[:31]).all())  # magnitudes rise with the code


def test_e2m3_is_a_grid_of_eighths_and_e3m2_reaches_28():
    e2m3, e3m2 = FP6Format("e2m3"), FP6Format("e3m2")
    assert torch.equal(e2m3.table[:8], torch.arange(8) / 8)  # subnormals in 0.125 steps
    assert (e2m3.max_value, e2m3.emax) == (7.5, 2)
    assert (e3m2.max_value, e3m2.emax) == (28.0, 4)
    assert sorted(set(e3m2.table[:32].tolist()))[-3:] == [20.0, 24.0, 28.0]


def test_labels_and_nominal_bits():
    assert [f.label() for f in FORMATS] == ["mxfp6_e2m3 b32", "mxfp6_e3m2 b32"]
    assert FP6Format().bits_per_weight(576) == 6.25
    assert FP6Format().code_bits == 6


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"variant": "e2m4"}, "did you mean 'e2m3'"),
        ({"variant": "e4m3"}, "must be one of e2m3, e3m2"),
        ({"variant": "e2m3", "block_size": 16}, "32 weights of a row by definition"),
        ({"variant": "e3m2", "block_size": 64}, "got block_size 64"),
    ],
)
def test_bad_formats_are_refused_clearly(fields, words):
    with pytest.raises(FormatError, match=words) as caught:
        FP6Format(**fields)
    assert caught.value.hint


def test_unknown_keys_in_a_stored_format_are_refused():
    with pytest.raises(FormatError, match="unknown keys"):
        format_from_dict({"kind": "fp6", "variant": "e2m3", "block_size": 32, "tensor": 1})


# ----------------------------------------------------------------------- rounding and scales


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_rounding_is_nearest_against_a_float64_oracle(fmt):
    weight = seeded(37, 70) * 0.05
    codes, scales, zeros = quantize_fp6(weight, fmt)
    assert zeros is None and codes.dtype == torch.uint8 and int(codes.max()) < 64
    per_column = fmt.effective_scales(scales, None).double().repeat_interleave(32, dim=1)[:, :70]
    scaled = (weight.double() / per_column).clamp(-fmt.max_value, fmt.max_value)
    table = fmt.table.double()
    best = (scaled[..., None] - table).abs().amin(-1)
    assert torch.equal((scaled - table[codes.long()]).abs(), best)


@pytest.mark.parametrize(
    ("variant", "row", "expected"),
    [
        # the block's amax 7.9 gives X = 2**(2 - 2) = 1: scaled values are the weights
        (
            "e2m3",
            [0.0625, 0.1875, 1.0625, 1.9375, 2.125, 7.75, -0.0625, -3.375, 7.9],
            [0.0, 0.25, 1.0, 2.0, 2.0, 7.5, -0.0, -3.5, 7.5],
        ),
        # amax 31 gives X = 2**(4 - 4) = 1
        (
            "e3m2",
            [0.03125, 0.09375, 0.21875, 26.0, 30.0, -22.0, 2.75, 31.0],
            [0.0, 0.125, 0.25, 24.0, 28.0, -24.0, 3.0, 28.0],
        ),
    ],
)
def test_ties_go_to_even_and_large_values_saturate(variant, row, expected):
    fmt = FP6Format(variant)
    weight = torch.tensor([row + [0.0] * (32 - len(row))])
    codes, scales, _ = quantize_fp6(weight, fmt)
    assert scales.tolist() == [[127]]
    assert fmt.dequantize(codes, scales, None)[0, : len(row)].tolist() == expected


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_e8m0_scales_follow_the_ocp_formula(fmt, seed):
    weight = seeded(16, 96, seed=seed) * torch.logspace(-6, 3, 96)  # blocks of very mixed range
    _, scales, _ = quantize_fp6(weight, fmt)
    assert scales.dtype == torch.uint8 and scales.shape == (16, 3)
    amax = weight.abs().view(16, 3, 32).amax(-1).double()
    expected = [[math.floor(math.log2(a)) - fmt.emax + 127 for a in row] for row in amax.tolist()]
    assert scales.tolist() == expected
    effective = fmt.effective_scales(scales, None)
    assert torch.equal(effective, torch.exp2(scales.double() - 127).float())
    # the block's largest value lands in [2**emax, 2**(emax+1)) before saturation
    ratio = amax / effective.double()
    assert bool(((ratio >= 2**fmt.emax) & (ratio < 2 ** (fmt.emax + 1))).all())


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_zero_blocks_get_the_smallest_scale_and_zero_codes(fmt):
    weight = seeded(3, 80)
    weight[1] = 0.0
    weight[0, 32:64] = 0.0
    codes, scales, _ = quantize_fp6(weight, fmt)
    assert scales[1].tolist() == [0, 0, 0] and scales[0, 1] == 0
    assert not bool(codes[1].any()) and not bool(codes[0, 32:64].any())
    again = dequantize_fp6(codes, scales, None, fmt)
    assert not bool(again[1].any()) and not bool(again[0, 32:64].any())
    assert fmt.effective_scales(torch.tensor([0, 254], dtype=torch.uint8), None).tolist() == [
        2.0**-127,
        2.0**127,
    ]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_weights_on_the_grid_round_trip_exactly(fmt):
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 64, (9, 70), generator=generator).to(torch.uint8)
    codes[:, ::32] = 31  # each block's largest magnitude is the table's: requantizing keeps X
    scales = torch.randint(110, 140, (9, 3), generator=generator, dtype=torch.uint8)
    weight = dequantize_fp6(codes, scales, None, fmt)
    again_codes, again_scales, _ = quantize_fp6(weight, fmt)
    assert torch.equal(again_scales, scales)
    assert torch.equal(dequantize_fp6(again_codes, again_scales, None, fmt), weight)
    # codes agree but for -0 (code 32), which encodes as +0
    assert torch.equal(again_codes, torch.where(codes == 32, 0, codes).to(torch.uint8))


def test_non_finite_weights_and_mismatched_scales_are_refused():
    fmt = FP6Format("e3m2")
    with pytest.raises(FormatError, match="NaN or inf"):
        quantize_fp6(torch.tensor([[1.0, float("inf")]]), fmt)
    codes, scales, _ = quantize_fp6(seeded(4, 128), fmt)
    with pytest.raises(FormatError, match="scales of shape"):
        dequantize_fp6(codes, scales[:, :1], None, fmt)
    with pytest.raises(FormatError, match="no zero points"):
        dequantize_fp6(codes, scales, torch.ones(1), fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_searched_clip_never_rounds_a_block_worse(fmt):
    weight = seeded(24, 128, seed=7) * torch.linspace(0.1, 3.0, 128)
    weight[3, 5] = 40.0  # an outlier worth clipping around
    clip = fmt.search_clip(weight)
    assert clip.shape == fmt.scale_shape(24, 128)
    assert bool(clip.ne(1.0).any())

    def block_errors(ratio):
        q = dequantize_fp6(*quantize_fp6(weight, fmt, clip_ratio=ratio), fmt)
        return (weight - q).square().view(24, -1, 32).sum(-1)

    assert bool((block_errors(clip) <= block_errors(1.0)).all())


# ------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("shape", [*SHAPES, (2, 3), (5, 4), (4, 9), (3, 257)])
def test_pack_unpack_round_trip_is_bit_exact(shape):
    codes = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(0))
    codes = codes.to(torch.uint8)
    packed = pack_fp6_codes(codes)
    assert packed.shape == (shape[0], math.ceil(6 * shape[1] / 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_fp6_codes(packed, shape[1]), codes)
    assert torch.equal(packed[:, 0] & 0x3F, codes[:, 0])  # code 0 in the low six bits


def test_four_codes_fill_three_bytes_little_endian():
    codes = torch.tensor([[0b000001, 0b111110, 0b101010, 0b010101]], dtype=torch.uint8)
    stream = sum(int(c) << (6 * k) for k, c in enumerate(codes[0]))
    assert pack_fp6_codes(codes)[0].tolist() == [stream & 0xFF, stream >> 8 & 0xFF, stream >> 16]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_packed_dequantize_is_the_reference_bit_for_bit(fmt, out_features, in_features):
    _, record, module = packed_linear(fmt, out_features, in_features)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(module.dequantize(dtype), record.dequantize(dtype))


# ----------------------------------------------------------------------------- packed modules


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_buffers_are_exactly_the_stored_tensors(fmt, out_features, in_features):
    KIT.check_buffers_are_the_stored_tensors(fmt, out_features, in_features)


@pytest.mark.parametrize("kernel", sorted(k for k in fp6_kernels.KERNELS if "triton" not in k))
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize(("out_features", "in_features"), [*SHAPES, (300, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_reference(kernel, fmt, out_features, in_features, dtype, monkeypatch):
    KIT.check_kernel_matches_the_reference(
        kernel, fmt, out_features, in_features, dtype, monkeypatch
    )


def test_decode_takes_the_native_gemv_and_prefill_the_tiles(monkeypatch):
    KIT.check_decode_takes_the_gemv_and_prefill_the_tiles(FP6Format("e3m2"), monkeypatch)


@pytest.fixture(params=NATIVE_TEST_LEVELS)
def isa(request, monkeypatch):
    return force_native_build(request.param, monkeypatch, fp6_cpu.native, "the fp6 GEMV")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize(("out_features", "in_features"), [(300, 576), (7, 257), (5, 96), (3, 13)])
@pytest.mark.parametrize("rows", [1, 11])
def test_native_gemv_matches_the_reference_on_every_build(
    isa, fmt, out_features, in_features, rows
):
    """Whole steps of 16 and 8 codes take the vector path, a partial block's last codes the
    scalar one (257: one code past 256, 13: no whole block); weights in fp32."""
    weight = seeded(out_features, in_features, seed=8) * 0.05
    weight[0, 1] = 3.0  # a block where small weights land on subnormal codes
    codes, scales, _ = quantize_fp6(weight, fmt)
    bias = seeded(out_features, seed=4)
    packed = PackedTable(pack_fp6_codes(codes), scales, None, bias, fmt, in_features)
    x = seeded(rows, in_features, seed=9)
    got = fp6_cpu.gemv(x, packed)
    expected = F.linear(x.double(), packed.dequantize(torch.float64), bias.double())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_tables_made_while_a_model_loads_on_meta_stay_on_the_cpu():
    """transformers builds a model under ``torch.device("meta")``, which is when the packed
    module first imports this folder's kernels: their tables must still hold data (a meta
    scale table failed every decode step of a reloaded export)."""
    fp6_spec._table.cache_clear()
    try:
        with torch.device("meta"):
            importlib.reload(fp6_cpu)
            table = FP6Format("e2m3").table
        assert fp6_cpu._BYTES.device.type == "cpu" and table.device.type == "cpu"
        _, record, module = packed_linear(FP6Format("e2m3"), 9, 64)
        x = seeded(1, 64)
        expected = F.linear(x, record.dequantize(), module.bias)
        torch.testing.assert_close(fp6_cpu.gemv(x, module.packed()), expected)
    finally:
        fp6_spec._table.cache_clear()


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_native_gemv_takes_any_row_count(fmt):
    KIT.check_native_gemv_takes_any_row_count(fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_embedding_gathers_the_dequantized_rows(fmt):
    KIT.check_embedding_gathers_the_dequantized_rows(fmt)


def test_runtime_is_registered():
    KIT.check_runtime_is_registered(FP6Format("e3m2"))


# -------------------------------------------------------------------------------- rtn recipes


@pytest.mark.parametrize("variant", VARIANTS)
def test_rtn_recipes_name_mxfp6_formats(variant):
    recipe = parse_recipe(
        {"model": "smollm2-135m", "passes": [{"pass": "rtn", "format": f"mxfp6_{variant}"}]}
    )
    config = recipe.passes[0]
    assert config.formats() == [FP6Format(variant)]
    dumped = config.model_dump(mode="json")
    assert not {"bits", "group_size", "symmetric", "scale_dtype", "scaling", "scale_block"} & set(
        dumped
    )
    assert RTNConfig.model_validate(dumped).formats() == [FP6Format(variant)]


@pytest.mark.parametrize(
    ("entry", "key", "value", "words"),
    [
        ({"format": "mxfp6_e2m3", "bits": 6}, "bits", "6", "6-bit codes into a fixed table"),
        ({"format": "mxfp6_e2m3", "group_size": 64}, "group_size", "64", "32 wide by definition"),
        ({"format": "mxfp6_e3m2", "scale_block": 16}, "scale_block", "16", "blocks of 32"),
        ({"format": "mxfp6_e3m2", "scaling": "mx"}, "scaling", "'mx'", "fp8 formats"),
        ({"format": "mxfp6"}, "format", "'mxfp6'", ""),
    ],
)
def test_bad_rtn_combinations_name_key_and_value(entry, key, value, words):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": "smollm2-135m", "passes": [{"pass": "rtn", **entry}]})
    message = str(caught.value)
    assert f"passes[0].{key}: {value} is not valid" in message, message
    assert words in message, message


@pytest.mark.parametrize("observer", ["minmax", "mse"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_rtn_leaves_fp6_records_and_dequantized_weights(tiny_llama_copy, variant, observer):
    config = RTNConfig(format=f"mxfp6_{variant}", observer=observer)
    report = rtn(tiny_llama_copy, config, PassContext())
    assert len(report.touched) == 14
    assert report.metrics["max_relative_error"] < 0.07  # MXFP4 on the same model: < 0.2
    module = tiny_llama_copy.model.layers[0].mlp.down_proj
    record = get_quantized(module)
    assert record is not None and record.fmt == FP6Format(variant)
    assert torch.equal(module.weight, record.dequantize(module.weight.dtype))


@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_rtn_recipes(variant):
    recipe = load_recipe(RECIPES / f"smollm2-mxfp6-{variant}-rtn.yaml")
    (config,) = recipe.passes
    assert isinstance(config, RTNConfig) and config.formats() == [FP6Format(variant)]
    assert recipe.evaluate is not None and recipe.evaluate.kl
    assert recipe.evaluate.max_windows == 32 and recipe.evaluate.seq_len == 512


# ------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_reloads_with_equal_logits(tiny_llama_copy, byte_tokenizer, tmp_path, variant):
    targets = ["model.layers.*", "model.embed_tokens", "lm_head"]
    result = Pipeline(
        model=tiny_llama_copy,
        passes=[RTNConfig(format=f"mxfp6_{variant}", targets=targets)],
        tokenizer=byte_tokenizer,
        export=tmp_path / "export",
    ).run()
    loaded = AutoModelForCausalLM.from_pretrained(result.export_dir).eval()
    linears = [m for m in loaded.modules() if isinstance(m, FP6Linear)]
    assert len(linears) == 7 * 2 + 1  # the projections and lm_head
    assert isinstance(loaded.model.embed_tokens, FP6Embedding)
    assert not any(k.endswith("_proj.weight") for k in loaded.state_dict())
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    generated = loaded.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)


def test_entropy_coded_export_reloads(tiny_llama_copy, byte_tokenizer, tmp_path):
    """6-bit codes through the entropy-coding stage (coded from the IR, packed back on load)."""
    entropy = entropy_coded_export_reloads(tiny_llama_copy, byte_tokenizer, tmp_path, "mxfp6_e3m2")
    assert {e["pack_bits"] for e in entropy["tensors"].values()} == {6}
