"""compressed-tensors export: loads through transformers' own quantizer and compressed-tensors'
decompressor, and computes what our own export of the same quantized model computes."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (registers the compress quantizer for the reference export)
from compress.errors import ExportError, RecipeError
from compress.export.compressed_tensors import FORMAT_NAME
from compress.export.summary import summarize_export
from compress.export.writer import export_model
from compress.formats.int.linear import QuantLinear
from compress.ir import get_quantized
from compress.pipeline import Pipeline
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import ExportSpec, parse_recipe
from compress.registry import PassContext

ct = pytest.importorskip("compressed_tensors", reason="the `vllm` extra is not installed")

SERVABLE = [(4, 32), (4, 64), (8, None), (8, 32)]  # (bits, group_size), symmetric


def quantized(model: nn.Module, **options: object) -> nn.Module:
    model = copy.deepcopy(model)
    rtn(model, RTNConfig(**options), PassContext())  # type: ignore[arg-type]
    return model


def both_exports(model: nn.Module, tmp_path: Path) -> tuple[nn.Module, nn.Module]:
    export_model(model, None, tmp_path / "compress")
    export_model(model, None, tmp_path / "ct", format=FORMAT_NAME)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "compress").eval()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    return ours, theirs


def token_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(("bits", "group_size"), SERVABLE)
def test_transformers_loads_it_with_our_weights_and_logits(
    tiny_llama: nn.Module, tmp_path: Path, bits: int, group_size: int | None
) -> None:
    model = quantized(tiny_llama, bits=bits, group_size=group_size, symmetric=True)
    ours, theirs = both_exports(model, tmp_path)
    assert type(theirs.config.quantization_config).__name__ == "CompressedTensorsConfig"

    ids = token_ids(ours.config.vocab_size)
    with torch.no_grad():
        want, got = ours(ids).logits, theirs(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    # The same codes and scales: the dense weights compressed-tensors rebuilt (on the first
    # forward) equal our dequantized ones bit for bit.
    theirs_modules = dict(theirs.named_modules())
    packed = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert len(packed) == 14
    for name, module in packed.items():
        assert torch.equal(theirs_modules[name].weight, module.dequantize(torch.float32)), name


def test_bf16_model_keeps_bf16_and_close_logits(
    tiny_llama: nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Scales are stored in the model dtype (what the loader allocates): fp16 → bf16 rounds them.
    model = quantized(copy.deepcopy(tiny_llama).to(torch.bfloat16), bits=4, group_size=32)
    with caplog.at_level(logging.WARNING, logger="compress.export.compressed_tensors"):
        ours, theirs = both_exports(model, tmp_path)
    assert "torch.float16 scales rounded to torch.bfloat16" in caplog.text
    scale = load_file(tmp_path / "ct" / "model.safetensors")[
        "model.layers.0.mlp.down_proj.weight_scale"
    ]
    assert scale.dtype == torch.bfloat16 and theirs.dtype == torch.bfloat16
    ids = token_ids(ours.config.vocab_size)
    with torch.no_grad():
        want, got = ours(ids).logits.float(), theirs(ids).logits.float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_compressed_tensors_decompresses_our_tensors(tiny_llama: nn.Module, tmp_path: Path) -> None:
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = quantized(tiny_llama, bits=4, group_size=32, symmetric=True)
    export_model(model, None, tmp_path / "ct", format=FORMAT_NAME)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.format == "pack-quantized"
    (scheme,) = parsed.config_groups.values()
    tensors = load_file(tmp_path / "ct" / "model.safetensors")

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert sorted(scheme.targets) == sorted(names)
    assert parsed.ignore == ["lm_head"]  # stays dense; vLLM reads the list
    for name in names:
        state = {
            leaf: tensors[f"{name}.{leaf}"]
            for leaf in ("weight_packed", "weight_scale", "weight_shape")
        }
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(weight, model.get_submodule(name).weight), name


def test_mixed_formats_get_one_config_group_each(tiny_llama: nn.Module, tmp_path: Path) -> None:
    model = quantized(tiny_llama, bits=8, group_size=None, targets=["*.mlp.*"])
    rtn(model, RTNConfig(bits=4, group_size=32, targets=["*.self_attn.*"]), PassContext())
    ours, theirs = both_exports(model, tmp_path)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = {
        (g["weights"]["num_bits"], g["weights"]["strategy"]): len(g["targets"])
        for g in config["config_groups"].values()
    }
    assert groups == {(8, "channel"): 6, (4, "group"): 8}
    ids = token_ids(ours.config.vocab_size)
    with torch.no_grad():
        want, got = ours(ids).logits, theirs(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_summary_and_manifest_describe_it(tiny_llama: nn.Module, tmp_path: Path) -> None:
    model = quantized(tiny_llama, bits=4, group_size=64, symmetric=True)
    export_model(model, None, tmp_path / "ct", format=FORMAT_NAME)
    summary = summarize_export(tmp_path / "ct", verify=True)
    shapes = [m.weight.shape for n, m in model.named_modules() if ".layers." in n and "_proj" in n]
    assert summary.quantized_params == sum(n * k for n, k in shapes) == 73728
    # int4 codes (rows of 64 codes fill whole words), fp32 scales per 64, an int64 [N, K] each
    stored = sum(n * k // 2 + 4 * n * k // 64 + 16 for n, k in shapes)
    assert summary.quantized_bits_per_weight == 8 * stored / 73728


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"bits": 3, "group_size": 32}, "3-bit codes"),
        ({"bits": 5, "group_size": None}, "5-bit codes"),
        ({"bits": 4, "group_size": 16}, "group size 16"),
        ({"bits": 4, "group_size": 32, "symmetric": False}, "asymmetric"),
    ],
)
def test_unservable_formats_are_refused(
    tiny_llama: nn.Module, tmp_path: Path, options: dict[str, object], reason: str
) -> None:
    model = quantized(tiny_llama, **options)
    with pytest.raises(ExportError) as error:
        export_model(model, None, tmp_path / "ct", format=FORMAT_NAME)
    message = str(error.value)
    assert "'model.layers.0.self_attn.q_proj'" in message
    assert "cannot be exported as compressed-tensors" in message
    assert reason in message
    assert error.value.hint and "format: compress" in error.value.hint
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize(
    ("v_proj", "listing"),
    [
        ({"bits": 8, "group_size": None}, "v_proj: int8 per-channel symmetric"),
        (None, "v_proj: not quantized"),
    ],
)
def test_fused_projections_must_share_a_format(
    tiny_llama: nn.Module, tmp_path: Path, v_proj: dict[str, object] | None, listing: str
) -> None:
    # vLLM loads q/k/v as one qkv_proj with one scheme.
    model = quantized(tiny_llama, bits=4, group_size=32, targets=["*.q_proj", "*.k_proj"])
    if v_proj is not None:
        rtn(model, RTNConfig(**v_proj, targets=["*.v_proj"]), PassContext())  # type: ignore[arg-type]
    with pytest.raises(ExportError) as error:
        export_model(model, None, tmp_path / "ct", format=FORMAT_NAME)
    message = str(error.value)
    assert "model.layers.0.self_attn.q_proj: int4 group 32 symmetric" in message
    assert f"model.layers.0.self_attn.{listing}" in message
    assert "vLLM fuses them into one layer" in message
    assert not (tmp_path / "ct").exists()


def test_recipe_runs_end_to_end(tiny_llama, byte_tokenizer, tmp_path: Path) -> None:
    recipe = parse_recipe(
        {
            "model": "unused-here",
            "passes": [{"pass": "rtn", "bits": 4, "group_size": 32}],
            "export": {"dir": str(tmp_path / "ct"), "format": "compressed-tensors"},
        }
    )
    assert recipe.export is not None and recipe.export.format == FORMAT_NAME
    model = copy.deepcopy(tiny_llama)
    result = Pipeline(model, recipe.passes, tokenizer=byte_tokenizer, export=recipe.export).run()
    assert result.export_dir == tmp_path / "ct"
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == FORMAT_NAME
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    ids = token_ids(256)
    with torch.no_grad():
        want, got = model(ids).logits, reloaded(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_unknown_export_format_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match=r"export\.format"):
        parse_recipe({"model": "m", "passes": [], "export": {"dir": "x", "format": "gguf"}})
    assert ExportSpec(dir=Path("x"), format="compressed-tensors").format == FORMAT_NAME


@pytest.mark.slow
def test_smollm2_int4_logits_match_our_export(smollm2, tmp_path: Path) -> None:
    model, _ = smollm2
    # SmolLM2's hidden size 576 is not a multiple of 128: group 64 is the largest vLLM group.
    # In fp32: a bf16 export's compressed-tensors scales are rounded to bf16 (the dtype vLLM and
    # transformers allocate them in), which moves logits by ~0.5; fp32 keeps the fp16 scales exact.
    model = quantized(copy.deepcopy(model).float(), bits=4, group_size=64, symmetric=True)
    ours, theirs = both_exports(model, tmp_path)
    ids = token_ids(ours.config.vocab_size)
    with torch.no_grad():
        want, got = ours(ids).logits, theirs(ids).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


FLOAT_FORMATS = [
    {"format": "fp8_e4m3", "scaling": "channel"},
    {"format": "fp8_e4m3", "scaling": "tensor"},
    {"format": "fp8_e4m3", "scaling": "block", "scale_block": 32},
    {"format": "mxfp4"},
    {"format": "nvfp4"},
]


@pytest.mark.parametrize("options", FLOAT_FORMATS, ids=lambda o: "-".join(map(str, o.values())))
def test_float_formats_load_with_our_weights(
    tiny_llama: nn.Module, tmp_path: Path, options: dict[str, object]
) -> None:
    """FP8 (float-quantized), MXFP4 and NVFP4 (their pack-quantized layouts) through
    transformers' compressed-tensors quantizer: the weights it rebuilds are ours (bit for bit,
    except NVFP4, whose global scale compressed-tensors divides by), and so are the logits.
    compressed-tensors unpacks FP4 into bf16 weights, which an fp32 model cannot multiply on
    CPU: the FP4 cases use the tiny model in bf16, as real FP4 checkpoints are."""
    fp4 = options["format"] in ("mxfp4", "nvfp4")
    source = copy.deepcopy(tiny_llama).to(torch.bfloat16) if fp4 else tiny_llama
    model = quantized(source, **options)
    ours, theirs = both_exports(model, tmp_path)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    layout = {"fp8_e4m3": "float-quantized"}.get(str(options["format"]))
    assert config["format"] == (layout or f"{options['format']}-pack-quantized")
    ids = token_ids(ours.config.vocab_size)
    with torch.no_grad():
        want, got = ours(ids).logits.float(), theirs(ids).logits.float()
    assert (got - want).abs().max() <= (2e-2 if fp4 else 1e-5) * want.abs().max()
    theirs_modules = dict(theirs.named_modules())
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    dtype = torch.bfloat16 if fp4 else torch.float32
    exact = options["format"] != "nvfp4"
    for name in names:
        record = get_quantized(model.get_submodule(name))
        assert record is not None
        mine, rebuilt = record.dequantize(dtype).float(), theirs_modules[name].weight.float()
        if exact:
            assert torch.equal(rebuilt, mine), name
        else:
            assert (rebuilt - mine).abs().max() <= 1e-2 * mine.abs().max(), name
    assert summarize_export(tmp_path / "ct", verify=True).per_module  # inspect reads it back


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"format": "fp8_e5m2"}, "E5M2 weights"),
        ({"format": "fp8_e4m3", "scaling": "mx"}, "MXFP8"),
        ({"format": "nf4"}, "use format: bitsandbytes"),
    ],
)
def test_float_formats_without_a_layout_are_refused(
    tiny_llama: nn.Module, tmp_path: Path, options: dict[str, object], reason: str
) -> None:
    model = quantized(tiny_llama, **options)
    with pytest.raises(ExportError, match=reason):
        export_model(model, None, tmp_path / "ct", format=FORMAT_NAME)
    assert not (tmp_path / "ct").exists()
