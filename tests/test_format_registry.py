"""Formats are a registered family: the manifest's dict names a kind, the registry builds it,
and a format added from outside the package exports, reloads and is inspected like ours."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import tests.example_format  # noqa: F401  (registers int8_rowscale, a folder outside compress/)
from compress.errors import FormatError
from compress.export.summary import summarize_export
from compress.export.writer import export_model
from compress.formats import format_from_dict, format_kinds, register_format
from compress.formats.int import IntFormat
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


def test_a_config_patch_changes_shapes_in_config_json(tiny_llama, tmp_path):
    """The writer's shape hook: a pass that shrinks the MLPs leaves a ConfigPatch, and the export
    is a smaller model that stock transformers loads as it is."""
    from torch import nn

    from compress.ir import ConfigPatch, attach

    model = copy.deepcopy(tiny_llama)
    keep = torch.arange(96)  # the first 96 of 128 MLP channels
    for layer in model.model.layers:
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = nn.Linear(old.in_features, 96, bias=False)
            new.weight.data = old.weight.data[keep].clone()
            setattr(mlp, name, new)
        down = nn.Linear(96, mlp.down_proj.out_features, bias=False)
        down.weight.data = mlp.down_proj.weight.data[:, keep].clone()
        mlp.down_proj = down
    attach(model, ConfigPatch({"intermediate_size": 96}))
    export_model(model, None, tmp_path / "small", recipe={})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    assert loaded.config.intermediate_size == 96
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
