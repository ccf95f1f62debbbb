"""The FP8 weight format: codes, scales, saturation, the packed modules, rtn and the export.

Oracles: the float8 values themselves (every finite bit pattern, in float64) for the round trip
and the rounding bound; the dequantized weight and ``F.linear`` for the modules; the in-memory
quantized model for the exported one.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (registers the transformers quantizer)
from compress import cli
from compress.errors import FormatError, RecipeError
from compress.export.summary import summarize_export
from compress.export.writer import export_model
from compress.formats import format_from_dict, format_kinds, runtime_for
from compress.formats.fp8 import FP8Format, dequantize_fp8, quantize_fp8
from compress.formats.fp8.linear import FP8Embedding, FP8Linear
from compress.ir import QuantizedWeight, get_quantized
from compress.pipeline import Pipeline
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import parse_recipe
from compress.registry import PassContext
from tests.conftest import entropy_coded_export_reloads

VARIANTS = ["e4m3", "e5m2"]
MANTISSA_BITS = {"e4m3": 3, "e5m2": 2}
FORMATS = [
    FP8Format("e4m3", "tensor"),
    FP8Format("e4m3", "channel"),
    FP8Format("e4m3", "block", 16),
    FP8Format("e4m3", "block", 48),  # partial edge blocks on the tiny model (64, 128, 32)
    FP8Format("e5m2", "channel"),
    FP8Format("e5m2", "block", 64),
    FP8Format("e4m3", "mx"),  # MXFP8: E8M0 exponent bytes per 32 weights of a row
    FP8Format("e5m2", "mx"),
]
SHAPES = [(1, 1), (7, 5), (37, 70), (64, 128), (96, 33)]


def finite_values(variant: str) -> torch.Tensor:
    """Every finite value of the variant, float64, from its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = values.view(FP8Format(variant).torch_dtype).to(torch.float64)
    return values[torch.isfinite(values)]


def finite_codes(variant: str) -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    values = codes.view(FP8Format(variant).torch_dtype).to(torch.float32)
    return codes[torch.isfinite(values)]


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label())
def test_to_dict_round_trips_through_the_registry(fmt):
    assert "fp8" in format_kinds()
    data = json.loads(json.dumps(fmt.to_dict()))
    assert data["kind"] == "fp8"
    assert format_from_dict(data) == fmt
    assert fmt.code_bits == 8
    assert runtime_for(fmt).linear_from_record == FP8Linear.from_record


def test_labels_and_nominal_bits():
    assert FP8Format("e4m3", "channel").label() == "fp8 e4m3 per-channel"
    assert FP8Format("e5m2", "tensor").label() == "fp8 e5m2 per-tensor"
    assert FP8Format("e4m3", "block", 64).label() == "fp8 e4m3 block 64"
    assert FP8Format("e4m3", "channel").bits_per_weight(576) == pytest.approx(8 + 32 / 576)
    assert FP8Format("e4m3", "block", 64).bits_per_weight(576) == pytest.approx(8 + 32 / 4096)
    assert FP8Format("e4m3", "tensor").bits_per_weight(576) == 8.0
    assert FP8Format("e5m2", "mx").label() == "mxfp8 e5m2"
    assert FP8Format("e4m3", "mx").bits_per_weight(576) == 8.25


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"variant": "e3m4"}, "variant"),
        ({"scaling": "row"}, "scaling"),
        ({"scaling": "block"}, "block_size"),
        ({"scaling": "block", "block_size": 0}, "block_size"),
        ({"scaling": "channel", "block_size": 64}, "only used with scaling 'block'"),
        ({"scaling": "mx", "block_size": 16}, "32 weights of a row by definition"),
    ],
)
def test_bad_formats_are_refused_clearly(fields, words):
    with pytest.raises(FormatError, match=words):
        FP8Format(**fields)


def test_unknown_keys_in_a_stored_format_are_refused():
    with pytest.raises(FormatError, match="unknown keys"):
        format_from_dict({"kind": "fp8", "variant": "e4m3", "scaling": "channel", "bias": 1})


# --------------------------------------------------------------------------- codes and scales


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("scaling", "block"), [("tensor", None), ("channel", None), ("block", 8)])
def test_representable_values_round_trip_bit_exactly(variant, scaling, block):
    """Weights that are FP8 values times power-of-two block scales, each block holding the
    largest value, come back with exactly those codes and exactly those weights."""
    fmt = FP8Format(variant, scaling, block)
    codes = finite_codes(variant)
    generator = torch.Generator().manual_seed(3)
    out_features, in_features = 24, 40  # block 8: 3 x 5 blocks
    chosen = codes[torch.randint(0, len(codes), (out_features, in_features), generator=generator)]
    bn, bk = fmt.block_shape(out_features, in_features)
    top = torch.tensor(fmt.max_value).to(fmt.torch_dtype).view(torch.uint8)
    chosen[::bn, ::bk] = top  # every block's absolute maximum is the largest finite value
    exponents = torch.randint(
        -8, 8, fmt.scale_shape(out_features, in_features), generator=generator
    )
    block_scales = torch.pow(2.0, exponents.to(torch.float32))
    weight = dequantize_fp8(chosen, block_scales, fmt)

    got_codes, scales, zeros = quantize_fp8(weight, fmt)
    assert zeros is None
    assert torch.equal(scales, block_scales)
    assert torch.equal(got_codes, chosen)
    assert torch.equal(fmt.dequantize(got_codes, scales, None), weight)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("scaling", "block"), [("tensor", None), ("channel", None), ("block", 16)])
def test_rounding_is_nearest_against_a_float64_oracle(variant, scaling, block):
    fmt = FP8Format(variant, scaling, block)
    weight = seeded(50, 70, seed=1) * torch.logspace(-4, 1, 70)  # wide range: subnormals too
    codes, scales, _ = quantize_fp8(weight, fmt)
    grid = finite_values(variant)  # sorted by search below
    grid = torch.unique(grid)
    expanded = fmt.dequantize(torch.zeros_like(codes), scales, None)  # shape check only
    assert expanded.shape == weight.shape

    scale64 = dequantize_fp8(
        torch.full_like(codes, 0x38 if variant == "e4m3" else 0x3C), scales, fmt, torch.float64
    )  # the code for 1.0 times the scale: each weight's own scale, in float64
    x = weight.to(torch.float64) / scale64
    ours = codes.view(fmt.torch_dtype).to(torch.float64)
    index = torch.searchsorted(grid, x.clamp(grid[0], grid[-1])).clamp(1, len(grid) - 1)
    below, above = grid[index - 1], grid[index]
    nearest = torch.where((x - below).abs() <= (above - x).abs(), below, above)
    # the quotient is formed in fp32, so allow its own rounding (2**-24 relative) on top
    slack = x.abs() * 2.0**-23
    assert bool(((x - ours).abs() <= (x - nearest).abs() + slack).all())
    # the textbook bound: half a step, relative for normal numbers, absolute below them
    tiny = float(torch.finfo(fmt.torch_dtype).smallest_normal)
    step_sub = tiny * 2.0 ** -MANTISSA_BITS[variant]
    bound = torch.maximum(
        x.abs() * 2.0 ** -(MANTISSA_BITS[variant] + 1), torch.tensor(step_sub / 2)
    )
    assert bool(((x - ours).abs() <= bound + slack).all())
    # and the reconstructed weight is within that bound of the weight itself
    error = (fmt.dequantize(codes, scales, None, torch.float64) - weight.double()).abs()
    assert bool((error <= (bound + slack) * scale64 * (1 + 2.0**-20)).all())


@pytest.mark.parametrize("variant", VARIANTS)
def test_mxfp8_follows_the_ocp_definition(variant):
    """Shared scale 2**(floor(log2 amax) - emax), emax 8 (E4M3) / 15 (E5M2), stored as its
    biased exponent; elements cast with saturation. Written from the specification, in float64
    for the scale, against the format bit for bit; 70 columns leave a partial last block."""
    fmt = FP8Format(variant, "mx")
    weight = seeded(9, 70, seed=3)
    weight[2, 40] = 7.0  # an outlier: its block's scale follows it, the others do not move
    codes, stored, zeros = quantize_fp8(weight, fmt)
    assert zeros is None and stored.dtype == torch.uint8 and stored.shape == (9, 3)
    emax = {"e4m3": 8, "e5m2": 15}[variant]
    limit = torch.finfo(fmt.torch_dtype).max
    for row in range(9):
        for block in range(3):
            values = weight[row, 32 * block : 32 * block + 32].double()
            exponent = math.floor(math.log2(float(values.abs().max()))) - emax
            assert int(stored[row, block]) == exponent + 127
            expected = (values / 2.0**exponent).clamp(-limit, limit).float().to(fmt.torch_dtype)
            got = codes[row, 32 * block : 32 * block + 32]
            assert torch.equal(got, expected.view(torch.uint8)), (row, block)
    decoded = dequantize_fp8(codes, stored, fmt, torch.float64)
    assert decoded[2, 40] == 7.0  # 7 * 2**-2 = 1.75 * 2**0 is on both grids after scaling


@pytest.mark.parametrize("variant", VARIANTS)
def test_saturation_never_makes_nan_or_inf(variant):
    fmt = FP8Format(variant, "channel")
    weight = seeded(8, 64, seed=2)
    weight[0] = 0.0  # a zero row: smallest normal scale, zero codes
    weight[1, :3] = torch.tensor([1e30, -1e30, 1e-40])  # huge and fp32-subnormal together
    weight[2] = 1e-40  # a row of fp32 subnormals
    codes, scales, _ = quantize_fp8(weight, fmt, clip_ratio=0.25)  # most rows saturate
    values = codes.view(fmt.torch_dtype).to(torch.float32)
    assert bool(torch.isfinite(values).all())
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    assert values.abs().max().item() == fmt.max_value
    assert bool((codes[0] == 0).all())
    top = fmt.max_value
    assert values[1, 0].item() == top and values[1, 1].item() == -top
    assert bool(torch.isfinite(fmt.dequantize(codes, scales, None)).all())
    # and the unclipped range lands exactly on the largest finite value, never beyond
    codes, scales, _ = quantize_fp8(weight, fmt)
    values = codes.view(fmt.torch_dtype).to(torch.float32)
    assert bool(torch.isfinite(values).all())
    assert values[3:].abs().amax(dim=1).eq(top).all()


def test_casts_alone_would_not_saturate_e5m2():
    """Why quantize saturates itself: torch 2.13 clamps an out-of-range E4M3 cast to 448, but
    sends E5M2 past its largest value to inf (and NaN to NaN in both)."""
    assert torch.tensor([500.0]).to(torch.float8_e4m3fn).float().item() == 448.0
    assert torch.isinf(torch.tensor([70000.0]).to(torch.float8_e5m2).float()).all()
    codes, _, _ = quantize_fp8(torch.tensor([[70000.0, 1.0]]), FP8Format("e5m2", "tensor"))
    assert codes.view(torch.float8_e5m2).float()[0, 0].item() == 57344.0


def test_non_finite_weights_are_refused():
    weight = seeded(4, 8)
    weight[1, 2] = float("nan")
    with pytest.raises(FormatError, match="NaN or inf"):
        quantize_fp8(weight, FP8Format())


@pytest.mark.parametrize("block", [48, 100, 128])
def test_block_sizes_that_do_not_divide_give_partial_edge_blocks(block):
    """576 x 192 (SmolLM2's k_proj transposed) in blocks of 48 / 100 / 128: the edge blocks hold
    what is left and take their scale from it."""
    fmt = FP8Format("e4m3", "block", block)
    weight = seeded(192, 576, seed=5)
    fmt.check_width(576)  # any width
    codes, scales, _ = quantize_fp8(weight, fmt)
    rows, cols = -(-192 // block), -(-576 // block)
    assert scales.shape == (rows, cols) == fmt.scale_shape(192, 576)
    for i in range(rows):
        for j in range(cols):
            part = weight[i * block : (i + 1) * block, j * block : (j + 1) * block]
            assert scales[i, j].item() == pytest.approx(part.abs().max().item() / 448, rel=1e-6)
    relative = (fmt.dequantize(codes, scales, None) - weight).norm() / weight.norm()
    assert relative < 0.04
    assert fmt.stored_tensors(192, 576)[1].shape == (rows, cols)


def test_mismatched_scales_are_refused():
    fmt = FP8Format("e4m3", "block", 16)
    codes, scales, _ = quantize_fp8(seeded(32, 32), fmt)
    with pytest.raises(FormatError, match=r"scales of shape \(2, 2\)"):
        fmt.dequantize(codes, scales[:1], None)


# ------------------------------------------------------------------------------------ modules


def packed_linear(fmt: FP8Format, out_features: int, in_features: int, *, bias: bool = True):
    torch.manual_seed(out_features * 1000 + in_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    record = QuantizedWeight(*quantize_fp8(linear.weight, fmt), fmt)
    return linear, record, FP8Linear.from_record(linear, record)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label())
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_buffers_are_exactly_the_stored_tensors(fmt, out_features, in_features):
    _, _, module = packed_linear(fmt, out_features, in_features)
    declared = fmt.stored_tensors(out_features, in_features)
    buffers = dict(module.named_buffers())
    assert list(buffers) == [t.name for t in declared]
    for tensor in declared:
        assert (tuple(buffers[tensor.name].shape), buffers[tensor.name].dtype) == (
            tensor.shape,
            tensor.dtype,
        )
    embedding = FP8Embedding(out_features, in_features, fmt)
    buffers = dict(embedding.named_buffers())
    assert [(n, tuple(b.shape), b.dtype) for n, b in buffers.items()] == [
        (t.name, t.shape, t.dtype) for t in declared
    ]
    # a module built empty (what the loader does) has the same buffers
    empty = runtime_for(fmt).linear(fmt, in_features, out_features, bias=True)
    assert [(n, b.shape, b.dtype) for n, b in empty.named_buffers()] == [
        (n, b.shape, b.dtype) for n, b in module.named_buffers()
    ]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label())
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_the_dequantized_weight(fmt, out_features, in_features, dtype, monkeypatch):
    """The reference kernel bit for bit (the native GEMV: tests/formats/test_fp8_gemv.py)."""
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    linear, record, module = packed_linear(fmt, out_features, in_features)
    module.bias.data = module.bias.data.to(dtype)
    x = seeded(3, 2, in_features, seed=7).to(dtype)
    expected = F.linear(x, record.dequantize(dtype), linear.bias.detach().to(dtype))
    with torch.no_grad():
        assert torch.equal(module(x), expected)
    assert torch.equal(module.dequantize(), record.dequantize())
    assert module.kernel == "reference"
    assert fmt.label() in repr(module)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label())
def test_embedding_gathers_the_dequantized_rows(fmt):
    table = nn.Embedding(70, 37)
    record = QuantizedWeight(*quantize_fp8(table.weight, fmt), fmt)
    module = FP8Embedding.from_record(table, record)
    ids = torch.tensor([[0, 5, 69], [33, 33, 48]])
    expected = F.embedding(ids, record.dequantize())
    assert torch.equal(module(ids), expected)
    assert torch.equal(module.dequantize(), record.dequantize())


def test_tied_lm_head_shares_the_embedding_buffers():
    fmt = FP8Format("e4m3", "block", 16)
    table = nn.Embedding(40, 24)
    record = QuantizedWeight(*quantize_fp8(table.weight, fmt), fmt)
    embedding = FP8Embedding.from_record(table, record)
    head = FP8Linear(24, 40, fmt, persistent=False)
    head.share_buffers(embedding)
    assert head.qweight is embedding.qweight and head.scales is embedding.scales
    x = seeded(2, 24)
    assert torch.allclose(head(x), F.linear(x, record.dequantize()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot share"):
        FP8Linear(24, 41, fmt).share_buffers(embedding)


# -------------------------------------------------------------------------------- rtn recipes


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"format": "fp8_e4m3"}, FP8Format("e4m3", "channel")),
        ({"format": "fp8_e4m3", "scaling": "tensor"}, FP8Format("e4m3", "tensor")),
        ({"format": "fp8_e4m3", "scaling": "block"}, FP8Format("e4m3", "block", 128)),
        (
            {"format": "fp8_e5m2", "scaling": "block", "scale_block": 64},
            FP8Format("e5m2", "block", 64),
        ),
    ],
)
def test_rtn_recipes_name_fp8_formats(entry, expected):
    recipe = parse_recipe({"model": "smollm2-135m", "passes": [{"pass": "rtn", **entry}]})
    config = recipe.passes[0]
    assert config.formats() == [expected]
    # the dump (manifest, resume) holds only the chosen format's keys and validates again
    dumped = config.model_dump(mode="json")
    assert not {"bits", "group_size", "symmetric", "scale_dtype"} & set(dumped)
    assert RTNConfig.model_validate(dumped).formats() == [expected]


def test_integer_rtn_recipes_are_unchanged():
    config = RTNConfig(bits=4, group_size=64)
    assert config.formats() == config.formats()[:1] and config.formats()[0].kind == "int"
    assert set(config.model_dump()) == {
        "bits",
        "group_size",
        "symmetric",
        "scale_dtype",
        "observer",
        "targets",
        "ignore",
    }


@pytest.mark.parametrize(
    ("entry", "key", "value"),
    [
        ({"format": "fp8_e4m3", "bits": 4}, "bits", "4"),
        ({"format": "fp8_e4m3", "group_size": 64}, "group_size", "64"),
        ({"format": "fp8_e5m2", "symmetric": False}, "symmetric", "false"),
        ({"format": "fp8_e4m3", "observer": "mse"}, "observer", "'mse'"),
        ({"format": "fp8_e4m3", "scale_block": 64}, "scale_block", "64"),
        ({"format": "fp8_e4m3", "scaling": "tensor", "scale_block": 64}, "scale_block", "64"),
        ({"format": "fp8_e4m3", "scaling": "mx", "scale_block": 32}, "scale_block", "32"),
        ({"scaling": "block"}, "scaling", "'block'"),
        ({"bits": 8, "scale_block": 64}, "scale_block", "64"),
        ({"format": "fp8"}, "format", "'fp8'"),
        ({"format": "fp8_e4m3", "scaling": "row"}, "scaling", "'row'"),
        ({"format": "fp8_e4m3", "scaling": "block", "scale_block": 0}, "scale_block", "0"),
    ],
)
def test_bad_rtn_combinations_name_key_and_value(entry, key, value):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({"model": "smollm2-135m", "passes": [{"pass": "rtn", **entry}]})
    message = str(caught.value)
    assert f"passes[0].{key}: {value} is not valid" in message, message
    assert "more error" not in message, message  # one mistake, one error


@pytest.mark.parametrize(
    "fmt_entry", [{"scaling": "channel"}, {"scaling": "block", "scale_block": 16}]
)
def test_rtn_leaves_fp8_records_and_dequantized_weights(tiny_llama, fmt_entry):
    model = copy.deepcopy(tiny_llama)
    config = RTNConfig(format="fp8_e4m3", **fmt_entry)
    report = rtn(model, config, PassContext())
    assert len(report.touched) == 14
    assert report.metrics["max_relative_error"] < 0.05
    module = model.model.layers[0].mlp.down_proj
    record = get_quantized(module)
    assert record is not None and record.fmt == config.formats()[0]
    assert torch.equal(module.weight, record.dequantize(module.weight.dtype))


# ------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("fmt_entry", [
    {"format": "fp8_e4m3", "scaling": "channel"},
    {"format": "fp8_e4m3", "scaling": "tensor"},
    {"format": "fp8_e4m3", "scaling": "block", "scale_block": 48},
    {"format": "fp8_e5m2", "scaling": "block", "scale_block": 64},
    {"format": "fp8_e4m3", "scaling": "mx"},
], ids=lambda e: "-".join(str(v) for v in e.values()))  # fmt: skip
def test_export_reloads_with_equal_logits(tiny_llama_copy, byte_tokenizer, tmp_path, fmt_entry):
    targets = ["model.layers.*", "model.embed_tokens", "lm_head"]
    result = Pipeline(
        model=tiny_llama_copy,
        passes=[RTNConfig(**fmt_entry, targets=targets)],
        tokenizer=byte_tokenizer,
        export=tmp_path / "export",
    ).run()
    loaded = AutoModelForCausalLM.from_pretrained(result.export_dir).eval()
    linears = [m for m in loaded.modules() if isinstance(m, FP8Linear)]
    assert len(linears) == 7 * 2 + 1  # the projections and lm_head
    assert isinstance(loaded.model.embed_tokens, FP8Embedding)
    assert not any(k.endswith("_proj.weight") for k in loaded.state_dict())
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    generated = loaded.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)

    summary = summarize_export(result.export_dir, verify=True)
    for entry in summary.per_module.values():
        assert entry["bits_per_weight"] == pytest.approx(entry["nominal_bits_per_weight"], rel=0.05)


def test_tied_fp8_pair_is_stored_once_and_reloads(tiny_llama, byte_tokenizer, tmp_path):
    model = copy.deepcopy(tiny_llama)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    rtn(
        model,
        RTNConfig(format="fp8_e4m3", targets=["model.embed_tokens", "lm_head"]),
        PassContext(),
    )
    export_model(model, byte_tokenizer, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["quantization_config"]["tied"] == {"lm_head": "model.embed_tokens"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    ids = torch.arange(30).reshape(2, 15)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_entropy_coded_fp8_export_reloads(tiny_llama_copy, byte_tokenizer, tmp_path):
    entropy_coded_export_reloads(tiny_llama_copy, byte_tokenizer, tmp_path, "fp8_e4m3")


def test_inspect_reads_an_fp8_export(tiny_llama_copy, byte_tokenizer, tmp_path, capsys):
    Pipeline(
        model=tiny_llama_copy,
        passes=[RTNConfig(format="fp8_e4m3", scaling="block", scale_block=48)],
        tokenizer=byte_tokenizer,
        export=tmp_path / "export",
    ).run()
    capsys.readouterr()
    code = cli.run(["inspect", str(tmp_path / "export")])
    out = capsys.readouterr().out
    assert code == 0
    assert "fp8 e4m3 block 48" in out
    assert "reference" in out  # the kernel it says the format runs
    code = cli.run(["inspect", str(tmp_path / "export"), "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data


def test_gptq_block_size_is_not_an_fp8_key() -> None:
    """GPTQ's config extends RTN's: its lazy-update ``block_size`` must stay its own (the FP8
    block is ``scale_block``), accepted and kept in the dumped recipe."""
    from compress.quant.gptq import GPTQConfig

    config = GPTQConfig(bits=4, group_size=64, block_size=64)
    assert config.block_size == 64 and config.model_dump()["block_size"] == 64
    assert "scale_block" not in config.model_dump()
