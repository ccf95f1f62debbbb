"""The bitmask sparse format: spec, packing, the native GEMV, and pruned exports stored with it."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (the loader of our exports)
from compress.errors import FormatError
from compress.export.writer import export_model, sparse_float_record
from compress.formats import format_from_dict
from compress.formats.bitmask import cpu, kernels
from compress.formats.bitmask.linear import BitmaskLinear
from compress.formats.bitmask.packed import (
    PackedBitmask,
    block_offsets,
    pack_bitmask,
    pack_bits,
    unpack_bits,
)
from compress.formats.bitmask.spec import BitmaskFormat
from compress.ir import SparsityMask, attach
from compress.prune.prune import PruneConfig, prune
from compress.registry import PassContext
from tests.conftest import NATIVE_TEST_LEVELS, force_native_build

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def sparse_weight(rows, columns, *, density=0.5, dtype=torch.float32, seed=0):
    """A random weight with about ``density`` nonzeros, row 1 all zero and row 2 full."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=gen)
    w[torch.rand(rows, columns, generator=gen) >= density] = 0
    if rows > 2:
        w[1] = 0
        w[2] = torch.randn(columns, generator=gen)
    return w.to(dtype)


def packed(w, *, bias=False):
    fmt = BitmaskFormat.for_weight(w)
    bitmask, values = pack_bitmask(w, fmt)
    b = torch.randn(w.shape[0]).to(w.dtype) if bias else None
    return PackedBitmask(bitmask, values, b, fmt, w.shape[1])


# --- spec and packing ---------------------------------------------------------------------------


def test_registered_and_round_trips():
    fmt = BitmaskFormat(288, "bfloat16")
    assert format_from_dict(fmt.to_dict()) == fmt
    assert fmt.label() == "bf16 bitmask ≤288/row"


def test_nominal_bits_count_values_and_one_mask_bit_a_weight():
    # half of 576 kept in bf16: 8 bits of values and 1 of mask per weight
    assert BitmaskFormat(288, "bfloat16").bits_per_weight(576) == 9.0
    assert BitmaskFormat(5, "float32").bits_per_weight(12) == (5 * 32 + 16) / 12  # mask padded
    assert BitmaskFormat(288, "bfloat16").pays(576)
    assert not BitmaskFormat(545, "bfloat16").pays(576)  # 15.14 + 1 bits > 16


@pytest.mark.parametrize(
    ("fields", "words"),
    [({"kept": 4, "dtype": "bf16"}, "did you mean 'bfloat16'"), ({"kept": -1}, "non-negative")],
)
def test_bad_formats_are_refused(fields, words):
    with pytest.raises(FormatError, match=words):
        BitmaskFormat(**fields)


def test_bits_pack_little_endian_like_numpy():
    mask = torch.rand(3, 21) < 0.4
    packed_bits = pack_bits(mask)
    assert packed_bits.shape == (3, 3)
    import numpy

    expected = numpy.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert numpy.array_equal(packed_bits.numpy(), expected)
    assert torch.equal(unpack_bits(packed_bits, 21), mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("columns", [13, 64, 200])
def test_pack_unpack_is_bit_exact(dtype, columns):
    w = sparse_weight(9, columns, dtype=dtype)
    p = packed(w)
    assert p.values.dtype == dtype and p.values.shape == (9, columns)  # row 2 is full
    assert torch.equal(p.dequantize(dtype), w)
    assert torch.equal(p.values[1], torch.zeros(columns, dtype=dtype))  # an empty row: padding


def test_rows_with_fewer_values_are_zero_padded_and_negative_zero_reads_as_zero():
    w = torch.tensor([[0.0, 1.5, -0.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    fmt = BitmaskFormat.for_weight(w)
    assert fmt.kept == 2
    bitmask, values = pack_bitmask(w, fmt)
    assert bitmask.tolist() == [[0b1010], [0b0001]]
    assert values.tolist() == [[1.5, 2.0], [3.0, 0.0]]


def test_a_row_with_more_values_than_kept_is_named():
    w = torch.ones(3, 8)
    w[0, 4:] = 0
    with pytest.raises(FormatError, match="row 1 has 8 nonzero weights, but this bitmask format"):
        pack_bitmask(w, BitmaskFormat(4, "float32"))


def test_block_offsets_count_the_values_before_each_64_columns():
    w = sparse_weight(5, 200, density=0.3)
    p = packed(w)
    offsets = block_offsets(p.bitmask)
    assert offsets.shape == (5, 4) and offsets.dtype == torch.int32
    nonzero = w != 0
    for block in range(4):
        assert torch.equal(offsets[:, block], nonzero[:, : 64 * block].sum(dim=1).int())


# --- kernels ------------------------------------------------------------------------------------


@pytest.fixture(params=NATIVE_TEST_LEVELS)
def isa(request, monkeypatch):
    return force_native_build(request.param, monkeypatch, cpu.native, "the bitmask GEMV")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 576), (16, 77), (5, 8)], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_native_gemv_matches_the_reference(isa, dtype, shape, rows):
    out_features, in_features = shape
    w = packed(sparse_weight(out_features, in_features, dtype=dtype, seed=rows), bias=True)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
    expected = F.linear(x.double(), w.dequantize(torch.float64), w.bias.double())
    got = cpu.gemv(x, w)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_native_gemv_reads_values_by_rank_not_by_column(isa):
    """Rows of different counts: a kernel that indexed values by column, or lost count across
    bytes, would pick the wrong value."""
    w = torch.zeros(3, 24)
    w[0, [0, 9, 17, 23]] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w[1, 8:16] = torch.arange(1.0, 9.0)
    w[2, [7]] = 5.0
    x = torch.arange(24.0).unsqueeze(0)
    got = cpu.gemv(x, packed(w))
    middle = sum(v * c for v, c in zip(range(1, 9), range(8, 16), strict=True))
    assert got.tolist() == [[0 + 18 + 51 + 92, middle, 35]]


def test_bf16_activations_agree_with_the_reference():
    w = packed(sparse_weight(64, 576, dtype=torch.bfloat16))
    x = torch.randn(2, 576).bfloat16()
    got = cpu.gemv(x, w)
    assert got.dtype == torch.bfloat16
    expected = F.linear(x.float(), w.dequantize())
    assert torch.allclose(got.float(), expected, rtol=2e-2, atol=5e-2)


def test_decode_takes_the_native_gemv_and_prefill_the_reference(monkeypatch):
    monkeypatch.delenv("COMPRESS_KERNEL", raising=False)
    fmt = BitmaskFormat(288)
    assert kernels.select(fmt, 576, rows=1, dtype=torch.float32) == "cpu_gemv"
    assert kernels.select(fmt, 576, rows=64, dtype=torch.float32) == "reference"
    monkeypatch.setenv("COMPRESS_KERNEL", "reference")
    assert kernels.select(fmt, 576, rows=1, dtype=torch.float32) == "reference"


def test_module_buffers_are_the_stored_tensors_and_forward_is_the_weight():
    linear = nn.Linear(128, 24)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(24, 128) < 0.5)
    attach(linear, SparsityMask(linear.weight != 0))
    record = sparse_float_record(linear)
    assert record is not None and isinstance(record.fmt, BitmaskFormat)
    module = BitmaskLinear.from_record(linear, record)
    stored = {t.name: (t.shape, t.dtype) for t in record.fmt.stored_tensors(24, 128)}
    buffers = {name: (tuple(b.shape), b.dtype) for name, b in module.named_buffers()}
    assert buffers == stored
    x = torch.randn(5, 128)
    expected = linear(x).detach()
    for rows in (x[:1], x):  # the native GEMV and the reference
        assert torch.allclose(module(rows), expected[: len(rows)], rtol=1e-5, atol=1e-5)
    assert module.packed().block_offsets is module.packed().block_offsets  # cached


def test_dense_or_unpruned_layers_get_no_bitmask_record():
    linear = nn.Linear(64, 8)
    assert sparse_float_record(linear) is None  # not pruned
    attach(linear, SparsityMask(torch.ones(8, 64, dtype=torch.bool)))
    assert sparse_float_record(linear) is None  # pruned nothing: the bitmask would cost more


# --- export -------------------------------------------------------------------------------------


def decoder_bytes(folder):
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return sum(
        t.numel() * t.element_size()
        for k, t in tensors.items()
        if ".layers." in k
        and k.rsplit(".", 1)[1] in ("weight", "bitmask", "values")
        and "norm" not in k
    )


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pruned_export_stores_values_and_bitmask_and_reloads_with_equal_logits(
    tiny_llama, tmp_path, pattern
):
    model = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    config = (
        PruneConfig(method="magnitude", sparsity=0.5)
        if pattern == "unstructured"
        else PruneConfig(method="magnitude", pattern=pattern)
    )
    prune(model, config, PassContext())
    export_model(model, None, tmp_path / "sparse")
    export_model(model, None, tmp_path / "dense", sparse=False)
    manifest = json.loads((tmp_path / "sparse" / "compress_manifest.json").read_text())
    kinds = {entry["format"]["kind"] for entry in manifest["modules"].values()}
    assert kinds == {"bitmask"}
    assert len(manifest["modules"]) == 14  # every Linear of both decoder layers
    # half the values at 16 bits plus a bit a weight: 9 of 16 bits
    ratio = decoder_bytes(tmp_path / "sparse") / decoder_bytes(tmp_path / "dense")
    assert ratio == pytest.approx(9 / 16, abs=0.01)
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        sparse = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse").eval()
        dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
        assert isinstance(sparse.model.layers[0].mlp.down_proj, BitmaskLinear)
        for ids_ in (ids, ids[:1, :1]):  # prefill (reference) and decode (native GEMV)
            expected = dense(ids_).logits.float()
            got = sparse(ids_).logits.float()
            if ids_.shape[1] > 1:  # the reference kernel is the dense model's own matmul
                assert torch.equal(got, expected)
            else:
                assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2)
