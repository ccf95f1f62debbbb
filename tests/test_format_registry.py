"""Formats are a registered family: the manifest's dict names a kind, the registry builds it,
and a format added from outside the package exports, reloads and is inspected like ours."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import tests.example_format  # registers int8_rowscale (a folder of its own, outside compress/)
from compress.errors import FormatError
from compress.export.summary import summarize_export
from compress.export.writer import export_model
from compress.formats import IntFormat, format_from_dict, format_kinds, register_format
from compress.ir import QuantizedWeight, record_from_state, set_quantized
from compress.utils.modules import select_linears
from tests.example_format import RowScaleInt8


def test_builtin_and_example_kinds_are_registered():
    assert {"int", "int8_rowscale"} <= set(format_kinds())


def test_format_dicts_round_trip():
    for fmt in (IntFormat(3, 16, False), IntFormat(8, None, True, "bfloat16"), RowScaleInt8()):
        assert format_from_dict(fmt.to_dict()) == fmt


def test_entries_without_a_kind_are_integer_formats():
    legacy = {"bits": 4, "group_size": 64, "symmetric": True, "scale_dtype": "float16"}
    assert format_from_dict(legacy) == IntFormat(4, 64)


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(FormatError, match="unknown format kind 'mxfp9'") as caught:
        format_from_dict({"kind": "mxfp9"})
    assert "int" in (caught.value.hint or "")


def test_a_kind_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):

        @register_format(runtime="nowhere")
        class Impostor:
            kind = "int"


def test_a_format_from_outside_exports_reloads_and_is_inspected(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    fmt = RowScaleInt8()
    linears, _ = select_linears(model, None, [])
    for module in linears.values():
        codes, scales, zeros = fmt.quantize(module.weight)
        set_quantized(module, QuantizedWeight(codes, scales, zeros, fmt))
    export_model(model, None, tmp_path / "export", recipe={})

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    packed = [m for m in loaded.modules() if type(m).__name__ == "RowScaleLinear"]
    assert len(packed) == len(linears)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, actual = model(ids).logits, loaded(ids).logits
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5)

    summary = summarize_export(tmp_path / "export", verify=True)
    group = summary.per_format["int8 row-scale fp32"]
    assert group.modules == len(linears)
    assert group.bits_per_weight == pytest.approx(8 + 32 / 64, rel=0.05)

    record = QuantizedWeight(*fmt.quantize(torch.randn(4, 8)), fmt)
    tensors, meta = record.to_state()
    again = record_from_state("quantized", tensors, meta)
    assert isinstance(again, QuantizedWeight) and again.fmt == fmt
    assert torch.equal(again.codes, record.codes)
