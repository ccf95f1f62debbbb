"""Exports load through transformers' own from_pretrained into packed modules."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (registers the quantizer)
from compress.errors import ExportError
from compress.export.manifest import MANIFEST_NAME
from compress.export.summary import summarize_export
from compress.export.writer import export_model
from compress.formats.int.linear import QuantLinear
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext

FORMATS = [
    (2, 32, True),
    (3, 64, False),
    (4, 32, True),
    (5, None, False),
    (6, 16, True),
    (8, None, True),
]


def quantized_copy(model, bits, group, symmetric):
    model = copy.deepcopy(model)
    rtn(model, RTNConfig(bits=bits, group_size=group, symmetric=symmetric), PassContext())
    return model


@pytest.mark.parametrize(("bits", "group", "symmetric"), FORMATS)
def test_reload_gives_packed_modules_and_equal_logits(tiny_llama, tmp_path, bits, group, symmetric):
    model = quantized_copy(tiny_llama, bits, group, symmetric)
    export_model(model, None, tmp_path / "export", recipe={"passes": []})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()

    packed = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(packed) == 7 * loaded.config.num_hidden_layers
    for key in loaded.state_dict():
        if "_proj." in key:  # every projection holds only packed codes and scales
            assert not key.endswith(".weight"), key
    assert all(m.qweight.dtype == torch.uint8 for m in packed)

    ids = torch.randint(
        0, loaded.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = model(ids).logits
        actual = loaded(ids).logits
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    generated = loaded.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


@pytest.mark.parametrize(("bits", "group", "symmetric"), FORMATS)
def test_stored_bits_match_nominal(tiny_llama, tmp_path, bits, group, symmetric):
    model = quantized_copy(tiny_llama, bits, group, symmetric)
    export_model(model, None, tmp_path / "export")
    summary = summarize_export(tmp_path / "export", verify=True)
    assert summary.per_module
    for name, entry in summary.per_module.items():
        assert entry["bits_per_weight"] == pytest.approx(
            entry["nominal_bits_per_weight"], rel=0.01
        ), name


def test_tied_embedding_is_stored_once(tiny_llama, tmp_path):
    model = quantized_copy(tiny_llama, 4, 32, True)
    export_model(model, None, tmp_path / "export")
    summary = summarize_export(tmp_path / "export")
    expected = sum(p.numel() for p in tiny_llama.parameters())  # parameters() dedupes ties
    assert summary.params == expected


@pytest.fixture
def exported(tiny_llama, tmp_path):
    model = quantized_copy(tiny_llama, 4, 32, True)
    return export_model(model, None, tmp_path / "export")


def test_truncated_shard_is_refused(exported):
    shard = exported / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ExportError, match=r"model\.safetensors: size .* \(truncated"):
        AutoModelForCausalLM.from_pretrained(exported)


def test_flipped_checksum_is_refused(exported):
    manifest = json.loads((exported / MANIFEST_NAME).read_text())
    digest = manifest["files"]["model.safetensors"]["sha256"]
    manifest["files"]["model.safetensors"]["sha256"] = ("0" if digest[0] != "0" else "1") + digest[
        1:
    ]
    (exported / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"model\.safetensors: checksum mismatch"):
        AutoModelForCausalLM.from_pretrained(exported)


def test_unknown_format_version_is_refused(exported):
    config = json.loads((exported / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (exported / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="unknown compress format version 99"):
        AutoModelForCausalLM.from_pretrained(exported)


def test_missing_manifest_is_refused(exported):
    (exported / MANIFEST_NAME).unlink()
    with pytest.raises(ExportError, match="not a compress export"):
        AutoModelForCausalLM.from_pretrained(exported)


def test_existing_folder_is_not_overwritten(tiny_llama, exported):
    before = sorted(p.name for p in exported.iterdir())
    with pytest.raises(ExportError, match="already exists"):
        export_model(tiny_llama, None, exported)
    assert sorted(p.name for p in exported.iterdir()) == before


def test_failed_export_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    from compress.utils.safetensors_io import ShardWriter

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ShardWriter, "close", explode)
    with pytest.raises(OSError, match="disk full"):
        export_model(quantized_copy(tiny_llama, 4, 32, True), None, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_sharded_export_loads(tiny_llama, tmp_path):
    model = quantized_copy(tiny_llama, 4, 32, True)
    export_model(model, None, tmp_path / "export", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "export").glob("model-*.safetensors"))
    assert len(shards) > 2
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def test_per_channel_group_nominal_cost_is_parameter_weighted(tiny_llama, tmp_path):
    """Per-channel scales cost 16/K bits: q_proj (K=64) and down_proj (K=128) differ."""
    model = quantized_copy(tiny_llama, 8, None, True)
    export_model(model, None, tmp_path / "export")
    group = summarize_export(tmp_path / "export").per_format["int8 per-channel sym"]
    modules = [m for n, m in model.named_modules() if n.endswith("_proj")]
    expected = sum(m.weight.numel() * (8 + 16 / m.in_features) for m in modules) / group.params
    assert group.nominal_bits_per_weight == pytest.approx(expected)
    assert group.bits_per_weight == pytest.approx(expected)


_STOCK_LOAD = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as error:
    print(f"{type(error).__name__}: {error}")
    sys.exit(3)
print("loaded")
"""


def test_stock_transformers_refuses_export_without_import_compress(tiny_llama, tmp_path):
    """Without ``import compress`` transformers would load packed layers as randomly initialised
    Linears with only a warning; the guarded model_type makes it stop with the fix in the text."""
    import subprocess
    import sys

    model = quantized_copy(tiny_llama, 4, 32, True)
    export_model(model, None, tmp_path / "export", recipe={"passes": []})
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["compress_base_model_type"] == "llama"
    done = subprocess.run(
        [sys.executable, "-c", _STOCK_LOAD, str(tmp_path / "export")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "import compress" in done.stdout
    # with compress imported the same folder loads as the family's own classes
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert loaded.config.model_type == "llama"
    assert type(loaded).__name__ == "LlamaForCausalLM"
