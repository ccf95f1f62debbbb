"""The N:M sparse integer format: spec, bit-exact packing, the native GEMV against the reference on
every instruction-set build this CPU runs, and the export of a pruned-then-quantized model that
stores only the kept codes and reloads with the same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (the loader of our exports)
from compress.errors import ExportError, FormatError
from compress.export.writer import export_model
from compress.formats import format_from_dict, runtime_for
from compress.formats.int.linear import QuantLinear
from compress.formats.int.spec import IntFormat
from compress.formats.nm import cpu, kernels
from compress.formats.nm.linear import NMLinear
from compress.formats.nm.packed import PackedNM, pack_nm
from compress.formats.nm.spec import NMIntFormat, kept_positions
from compress.formats.packing import pack_codes
from compress.ir import QuantizedWeight, SparsityMask, get, get_quantized, records
from compress.prune.prune import PruneConfig, prune
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import parse_recipe
from compress.registry import PassContext
from compress.utils.native import cpu_isa
from tests.conftest import NATIVE_TEST_LEVELS, force_native_build

# --- spec ---------------------------------------------------------------------------------------


def test_registered_and_round_trips():
    fmt = NMIntFormat(2, 4, 4, 64, symmetric=False, scale_dtype="bfloat16")
    assert format_from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt
    assert fmt.label() == "int4 g64 asym 2:4"
    assert runtime_for(fmt).linear_from_record == NMLinear.from_record


def test_nominal_bits_count_values_positions_and_scales():
    # 2:4 int4 g64 sym: half the codes at 4 bits, 2-bit positions, fp16 scale a 64 columns
    assert NMIntFormat(2, 4, 4, 64).bits_per_weight(576) == pytest.approx(2 + 1 + 16 / 64)
    assert IntFormat(4, 64).bits_per_weight(576) == pytest.approx(4 + 16 / 64)
    # 4:8: 3-bit positions
    assert NMIntFormat(4, 8, 4, 64).bits_per_weight(512) == pytest.approx(3.5 + 0.25)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"n": 4, "m": 4, "bits": 4}, "0 < n < m"),
        ({"n": 2, "m": 4, "bits": 4, "group_size": 66}, "straddle"),
        ({"n": 2, "m": 4, "bits": 9}, "2..8"),
    ],
)
def test_bad_formats_are_refused(fields, words):
    with pytest.raises(FormatError, match=words):
        NMIntFormat(**fields)


def test_width_not_a_multiple_of_m_is_refused():
    with pytest.raises(FormatError, match="multiple of m=4"):
        NMIntFormat(2, 4, 4).check_width(70)


# --- packing ------------------------------------------------------------------------------------

FORMATS = [
    NMIntFormat(2, 4, 4, 64),
    NMIntFormat(2, 4, 4, 32, symmetric=False),
    NMIntFormat(2, 4, 3, 16),
    NMIntFormat(1, 4, 2, 64),
    NMIntFormat(2, 4, 8, None),
    NMIntFormat(4, 8, 4, 64),
    NMIntFormat(1, 2, 4, 32, scale_dtype="e8m0"),
    NMIntFormat(2, 4, 5, 64, symmetric=False, scale_dtype="bfloat16"),
]


def packed(fmt: NMIntFormat, out_features: int, in_features: int, *, bias=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    codes, scales, zeros = fmt.quantize(weight)
    qweight, qindex = pack_nm(codes, zeros, fmt)
    qzeros = None if zeros is None else pack_codes(zeros.reshape(1, -1), fmt.bits)[0]
    b = torch.randn(out_features, generator=generator) if bias else None
    return PackedNM(qweight, qindex, scales, qzeros, b, fmt, in_features), codes


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label())
def test_pack_unpack_is_bit_exact(fmt):
    w, codes = packed(fmt, 13, 128)
    assert torch.equal(w.codes(), codes)
    assert w.qweight.shape == (13, (fmt.kept(128) * fmt.bits + 7) // 8)
    # the stored weight is the record's: dequantizing either gives the same bits
    record = QuantizedWeight(codes, w.scales, w.zeros(), fmt)
    assert torch.equal(w.dequantize(), record.dequantize())


def test_quantize_keeps_the_largest_magnitudes_of_each_run():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 0.0, 0.0, -0.2]])
    codes, _, _ = NMIntFormat(2, 4, 8).quantize(weight)
    kept = (codes.to(torch.int32) != 128).nonzero()[:, 1].tolist()
    assert kept == [1, 2, 4, 7]


def test_runs_with_fewer_nonzeros_store_zeros_at_free_positions():
    nonzero = torch.tensor([[False, False, False, True, False, False, False, False]])
    positions = kept_positions(nonzero, 2, 4)
    assert positions.tolist() == [[0, 3, 4, 5]]


def test_a_run_with_too_many_nonzeros_names_row_and_columns():
    nonzero = torch.zeros(3, 8, dtype=torch.bool)
    nonzero[2, 4:7] = True
    with pytest.raises(ValueError, match=r"row 2, columns 4\.\.7: 3 nonzero"):
        kept_positions(nonzero, 2, 4)


# --- kernels ------------------------------------------------------------------------------------


@pytest.fixture(params=NATIVE_TEST_LEVELS)
def isa(request, monkeypatch):
    return force_native_build(request.param, monkeypatch, cpu.native, "the N:M GEMV")


# (out, in): 2:4 steps of 16 and 8 codes, per-channel rows whose kept count is no multiple of 16
SHAPES = [(37, 384), (5, 64), (16, 576)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.label())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rows", [1, 11])
def test_native_gemv_matches_the_reference(isa, fmt, shape, rows):
    out_features, in_features = shape
    if in_features % (fmt.group_size or 1):
        pytest.skip("group does not divide the width")
    w, _ = packed(fmt, out_features, in_features, bias=True, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x.double(), w.dequantize(torch.float64), w.bias.double())
    got = cpu.gemv(x, w)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_vector_path_is_built_where_the_cpu_has_one():
    if cpu_isa() == "generic":
        pytest.skip("this CPU has neither AVX2 nor AVX-512")
    assert cpu.vectorized()


def test_bf16_activations_agree_with_the_reference():
    w, _ = packed(NMIntFormat(2, 4, 4, 64), 64, 576)
    x = torch.randn(2, 576).bfloat16()
    got = cpu.gemv(x, w)
    assert got.dtype == torch.bfloat16
    expected = F.linear(x.float(), w.dequantize())
    assert torch.allclose(got.float(), expected, rtol=2e-2, atol=5e-2)


def test_decode_takes_the_native_gemv_and_prefill_the_reference(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    fmt = NMIntFormat(2, 4, 4, 64)
    assert kernels.select(fmt, 576, rows=1, dtype=torch.float32) == "cpu_gemv"
    assert kernels.select(fmt, 576, rows=64, dtype=torch.float32) == "reference"
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    assert kernels.select(fmt, 576, rows=1, dtype=torch.float32) == "reference"


def test_module_buffers_are_the_stored_tensors_and_forward_is_the_record():
    fmt = NMIntFormat(2, 4, 4, 32, symmetric=False)
    linear = nn.Linear(128, 24)
    codes, scales, zeros = fmt.quantize(linear.weight.detach())
    record = QuantizedWeight(codes, scales, zeros, fmt)
    module = NMLinear.from_record(linear, record)
    stored = {t.name: (t.shape, t.dtype) for t in fmt.stored_tensors(24, 128)}
    buffers = {name: (tuple(b.shape), b.dtype) for name, b in module.named_buffers()}
    assert buffers == stored
    x = torch.randn(5, 128)
    expected = F.linear(x, record.dequantize(), linear.bias.detach())
    for rows in (x[:1], x):  # the native GEMV and the reference
        assert torch.allclose(module(rows), expected[: len(rows)], rtol=1e-5, atol=1e-5)


def test_unpacked_zero_points_are_kept_until_qzeros_changes():
    fmt = NMIntFormat(2, 4, 4, 32, symmetric=False)
    linear = nn.Linear(128, 24)
    codes, scales, zeros = fmt.quantize(linear.weight.detach())
    module = NMLinear.from_record(linear, QuantizedWeight(codes, scales, zeros, fmt))
    first = module.packed().unpacked_zeros
    assert first is not None and torch.equal(first, zeros)
    assert module.packed().unpacked_zeros is first  # not unpacked again
    shifted = (zeros.to(torch.int16) + 1).clamp(max=15).to(torch.uint8)
    module.qzeros.copy_(pack_codes(shifted.reshape(1, -1), fmt.bits)[0])
    assert torch.equal(module.packed().unpacked_zeros, shifted)
    # the native GEMV reads the new zero points, as a freshly unpacked reference does
    fresh = PackedNM(module.qweight, module.qindex, module.scales, module.qzeros, None, fmt, 128)
    x = torch.randn(1, 128)
    expected = F.linear(x, fresh.dequantize(), linear.bias)
    assert torch.allclose(module(x), expected, rtol=1e-5, atol=1e-5)


# --- export -------------------------------------------------------------------------------------


def pruned_and_quantized(tiny_llama, *, symmetric=True):
    model = copy.deepcopy(tiny_llama)
    prune(model, PruneConfig(method="magnitude", pattern="2:4"), PassContext())
    rtn(model, RTNConfig(bits=4, group_size=32, symmetric=symmetric), PassContext())
    return model


def safetensors_bytes(folder):
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.mark.parametrize("symmetric", [True, False])
def test_export_stores_kept_codes_and_reloads_with_equal_logits(tiny_llama, tmp_path, symmetric):
    model = pruned_and_quantized(tiny_llama, symmetric=symmetric)
    export_model(model, None, tmp_path / "sparse")
    export_model(model, None, tmp_path / "dense", sparse=False)
    manifest = json.loads((tmp_path / "sparse" / "compress_manifest.json").read_text())
    kinds = {entry["format"]["kind"] for entry in manifest["modules"].values()}
    assert kinds == {"nm_int"}
    assert safetensors_bytes(tmp_path / "sparse") < safetensors_bytes(tmp_path / "dense")
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        expected = model(ids).logits
        for folder, module_type in (("sparse", NMLinear), ("dense", QuantLinear)):
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / folder).eval()
            assert isinstance(loaded.model.layers[0].mlp.down_proj, module_type)
            for ids_ in (ids, ids[:1, :1]):  # prefill (reference) and decode (native GEMV)
                assert torch.allclose(
                    loaded(ids_).logits, model(ids_).logits, rtol=1e-4, atol=1e-4
                ), folder
        assert torch.allclose(loaded(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_sparse_export_decoder_bytes_against_dense(tiny_llama, tmp_path):
    """What a 2:4 int4 g32 layer stores against the dense int4 layer: values halve, positions
    add 1 bit a weight, scales stay: (2 + 1 + 0.5) / (4 + 0.5)."""
    model = pruned_and_quantized(tiny_llama)
    export_model(model, None, tmp_path / "sparse")
    export_model(model, None, tmp_path / "dense", sparse=False)
    from safetensors.torch import load_file

    def linear_bytes(folder):
        tensors = {}
        for path in folder.glob("*.safetensors"):
            tensors.update(load_file(path))
        return sum(
            t.numel() * t.element_size()
            for k, t in tensors.items()
            if ".layers." in k and k.rsplit(".", 1)[1] in ("qweight", "qindex", "scales")
        )

    ratio = linear_bytes(tmp_path / "sparse") / linear_bytes(tmp_path / "dense")
    assert ratio == pytest.approx(3.5 / 4.5, abs=1e-3)


def test_codes_that_break_the_pattern_are_refused_naming_the_layer(tiny_llama, tmp_path):
    model = pruned_and_quantized(tiny_llama)
    module = model.model.layers[1].self_attn.o_proj
    record = get_quantized(module)
    assert record is not None and get(module, SparsityMask) is not None
    record.codes[3, 0:4] = 1  # a whole run nonzero
    with pytest.raises(ExportError, match=r"model.layers.1.self_attn.o_proj: row 3, columns 0..3"):
        export_model(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unstructured_masks_and_unpruned_layers_stay_dense(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    prune(model, PruneConfig(method="magnitude", sparsity=0.5), PassContext())
    rtn(model, RTNConfig(bits=4, group_size=32), PassContext())
    export_model(model, None, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "compress_manifest.json").read_text())
    assert {e["format"]["kind"] for e in manifest["modules"].values()} == {"int"}
    assert len(list(records(model, SparsityMask))) == 14


def test_recipe_export_sparse_key():
    base = {"model": "builtin:smollm2-135m", "passes": [{"pass": "rtn", "bits": 4}]}
    on = parse_recipe({**base, "export": {"dir": "out"}}, source="test")
    off = parse_recipe({**base, "export": {"dir": "out", "sparse": False}}, source="test")
    assert on.export is not None and on.export.sparse
    assert off.export is not None and not off.export.sparse
