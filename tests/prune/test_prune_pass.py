"""The ``prune`` pass on tiny models: exact masks in the IR, export and reload, the pipeline,
offload and resume, interplay with quantization, and configuration errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from transformers import AutoModelForCausalLM

from compress.errors import PassError, RecipeError
from compress.export.writer import export_model
from compress.formats.bitmask.linear import BitmaskLinear
from compress.ir import SparsityMask, get, get_quantized, records
from compress.offload import LayerStore, work_dir_for
from compress.pipeline import Pipeline
from compress.prune.prune import PruneConfig, prune
from compress.quant.gptq import GPTQConfig, gptq
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import CalibrationSpec, ModelSpec, load_recipe, parse_recipe
from compress.registry import PassContext, get_pass
from compress.utils.hooks import capture_inputs
from tests.conftest import tiny_family_model

METHODS = ["magnitude", "wanda", "sparsegpt"]


def calibration(samples=16, length=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (samples, length), generator=generator)


def run(model, **settings):
    return prune(model, PruneConfig(**settings), PassContext(calibration=calibration()))


def masks(model) -> dict[str, SparsityMask]:
    return dict(records(model, SparsityMask))


def assert_masks_hold(model, expected_count=14):
    found = masks(model)
    assert len(found) == expected_count
    modules = dict(model.named_modules())
    for name, record in found.items():
        weight = modules[name].weight.detach()
        assert record.mask.shape == weight.shape and record.mask.dtype == torch.bool
        assert torch.all(weight[~record.mask] == 0), name
    return found


# --- masks --------------------------------------------------------------------------------------


def test_registered_as_calibrated_pass():
    entry = get_pass("prune")
    assert entry.config_cls is PruneConfig and entry.calibrated


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_sparsity_is_exact_in_every_row(tiny_llama, method, sparsity):
    model = copy.deepcopy(tiny_llama)
    report = run(model, method=method, sparsity=sparsity)
    assert len(report.touched) == 14
    for name, record in assert_masks_hold(model).items():
        columns = record.mask.shape[1]
        kept = columns - round(sparsity * columns)
        assert record.pattern == "unstructured"
        assert record.mask.sum(dim=1).tolist() == [kept] * record.mask.shape[0], name
    assert report.metrics["sparsity"] == pytest.approx(sparsity, abs=0.005)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_is_exact_in_every_group(tiny_llama, method, pattern):
    model = copy.deepcopy(tiny_llama)
    n, m = map(int, pattern.split(":"))
    report = run(model, method=method, pattern=pattern)
    for name, record in assert_masks_hold(model).items():
        rows, columns = record.mask.shape
        assert record.pattern == pattern
        assert torch.all(record.mask.reshape(rows, columns // m, m).sum(dim=2) == n), name
    assert report.metrics["sparsity"] == pytest.approx(1 - n / m)


def test_targets_and_ignore(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    report = prune(
        model,
        PruneConfig(method="magnitude", targets=["*mlp*", "lm_head"], ignore=["*.down_proj"]),
        PassContext(),
    )
    assert sorted(masks(model)) == sorted(
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up")
    )
    assert "lm_head" in report.skipped and "decoder layers" in report.skipped["lm_head"]
    assert report.skipped["model.layers.0.mlp.down_proj"] == "matched an ignore pattern"


def layer_output_errors(original, pruned, ids):
    """Relative output error of every pruned Linear on the original model's inputs."""
    names = list(masks(pruned))
    theirs = dict(original.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    with capture_inputs({n: theirs[n] for n in names}, inputs.__setitem__), torch.no_grad():
        original(ids)
    mine = dict(pruned.named_modules())
    errors = {}
    for name in names:
        x = inputs[name].reshape(-1, inputs[name].shape[-1])
        reference = x @ theirs[name].weight.detach().T
        errors[name] = float(
            (x @ mine[name].weight.detach().T - reference).norm() / reference.norm()
        )
    return errors


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_calibrated_methods_beat_magnitude_on_layer_outputs(pattern):
    """A model whose hidden states have outlier features (as trained LLMs do): scale a few
    embedding channels and the matching norm weights up (each in its own group of 4 and of 8, so
    an N:M mask can keep them all)."""
    model = tiny_family_model("llama", seed=3)
    outliers = [3, 13, 19, 28, 35, 46]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, outliers] *= 30
        for layer in model.model.layers:
            layer.input_layernorm.weight[outliers] *= 8
            layer.post_attention_layernorm.weight[outliers] *= 8
    ids = calibration(samples=4, length=32, seed=7)
    mean = {}
    for method in METHODS:
        pruned = copy.deepcopy(model)
        run(pruned, method=method, pattern=pattern)
        errors = layer_output_errors(model, pruned, ids)
        mean[method] = sum(errors.values()) / len(errors)
    assert mean["wanda"] < 0.9 * mean["magnitude"], mean
    assert mean["sparsegpt"] < 0.8 * mean["magnitude"], mean
    assert mean["sparsegpt"] < mean["wanda"], mean


# --- export, pipeline, offload ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_export_reloads_with_equal_logits(tiny_llama, tmp_path, method):
    model = copy.deepcopy(tiny_llama)
    run(model, method=method, pattern="2:4")
    export_model(model, None, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    ids = calibration(samples=2, length=20, seed=3)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    reloaded = dict(loaded.named_modules())
    for name, record in masks(model).items():  # stored as values plus a bitmask
        module = reloaded[name]
        assert isinstance(module, BitmaskLinear)
        assert torch.all(module.dequantize()[~record.mask] == 0)
        assert torch.equal(module.dequantize(), model.get_submodule(name).weight.detach())


def pipeline(model_dir, text_file, out, passes, **kwargs) -> Pipeline:
    return Pipeline(
        ModelSpec(name=str(model_dir)),
        passes,
        calibration=CalibrationSpec(dataset=str(text_file), samples=8, seq_len=32),
        export=out,
        **kwargs,
    )


def weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


SPARSEGPT_24 = [PruneConfig(method="sparsegpt", pattern="2:4", block_size=32)]


@pytest.fixture(scope="module")
def plain_export(model_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "export"
    result = pipeline(model_dir, text_file, out, SPARSEGPT_24).run()
    assert len(masks(result.model)) == 7 * 3
    assert result.report["passes"][0]["metrics"]["sparsity"] == pytest.approx(0.5)
    return out


def test_recipe_through_the_pipeline(model_dir, text_file, tmp_path):
    recipe = parse_recipe(
        {
            "model": str(model_dir),
            "calibration": {"dataset": str(text_file), "samples": 8, "seq_len": 32},
            "passes": [{"pass": "prune", "method": "wanda", "sparsity": 0.5}],
            "export": {"dir": str(tmp_path / "wanda")},
        },
        source="test",
    )
    result = Pipeline.from_recipe(recipe).run()
    assert len(masks(result.model)) == 7 * 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "wanda")
    ids = calibration(samples=2, length=16)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-5)


def test_offloaded_run_writes_the_same_bytes(model_dir, text_file, plain_export, tmp_path):
    out = tmp_path / "offloaded"
    pipeline(model_dir, text_file, out, SPARSEGPT_24, offload=True).run()
    assert weight_bytes(out) == weight_bytes(plain_export)


class _Killed(BaseException):
    """Stands for the process dying: not a CompressError, so checkpoints are kept."""


def test_resume_restores_masks_from_checkpoints(
    model_dir, text_file, plain_export, tmp_path, monkeypatch
):
    out = tmp_path / "export"
    original_finish = LayerStore.finish

    def dying_finish(self, index, name, module, hidden, report):
        original_finish(self, index, name, module, hidden, report)
        if index == 1:
            raise _Killed

    monkeypatch.setattr(LayerStore, "finish", dying_finish)
    with pytest.raises(_Killed):
        pipeline(model_dir, text_file, out, SPARSEGPT_24).run()
    assert work_dir_for(out).is_dir()
    monkeypatch.setattr(LayerStore, "finish", original_finish)
    result = pipeline(model_dir, text_file, out, SPARSEGPT_24, resume=True).run()
    assert weight_bytes(out) == weight_bytes(plain_export)
    # layers 0 and 1 came back from their checkpoints, masks included
    restored = masks(result.model)
    assert len(restored) == 7 * 3
    assert all(r.pattern == "2:4" for r in restored.values())
    assert len(result.report["passes"][0]["per_module"]) == 7 * 3


# --- with quantization --------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_after_prune_keeps_pruned_weights_zero(tiny_llama, symmetric):
    model = copy.deepcopy(tiny_llama)
    run(model, method="wanda", pattern="2:4")
    rtn(model, RTNConfig(bits=4, group_size=32, symmetric=symmetric), PassContext())
    assert_masks_hold(model)


@pytest.mark.parametrize(("symmetric", "act_order"), [(True, False), (False, False), (False, True)])
def test_gptq_after_prune_keeps_the_zeros_and_compensates(tiny_llama, symmetric, act_order):
    """GPTQ reads the SparsityMask: pruned positions get the code of exact zero, their weight
    is fed back like a rounding error, and the result beats rounding the pruned weights."""
    model = copy.deepcopy(tiny_llama)
    run(model, method="sparsegpt", pattern="2:4")
    pruned = copy.deepcopy(model)
    config = GPTQConfig(bits=4, group_size=32, symmetric=symmetric, act_order=act_order)
    gptq(model, config, PassContext(calibration=calibration()))
    assert_masks_hold(model)
    for name, record in masks(model).items():
        quantized = get_quantized(model.get_submodule(name))
        assert quantized is not None
        assert torch.all(quantized.dequantize()[~record.mask] == 0), name
    plain = copy.deepcopy(pruned)
    rtn(plain, RTNConfig(bits=4, group_size=32, symmetric=symmetric), PassContext())
    # Scored on the calibration windows, the error GPTQ minimises: there it is 0.66-0.70 of
    # RTN's in every case. (On 4 held-out windows of this random model the margin was a few
    # percent either way, and flipped for asymmetric act-order between an AVX2 and an AVX-512
    # CPU.)
    ids = calibration()
    with torch.no_grad():
        reference = pruned(ids).logits
        gptq_error = (model(ids).logits - reference).square().mean()
        rtn_error = (plain(ids).logits - reference).square().mean()
    assert gptq_error < 0.8 * rtn_error


def test_prune_after_quantization_is_refused(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    rtn(model, RTNConfig(bits=4, group_size=32), PassContext())
    with pytest.raises(PassError, match=r"layer model\.layers\.0\.\S+ is already quantized") as e:
        run(model, method="magnitude")
    assert "before rtn/gptq" in (e.value.hint or "")


# --- configuration errors -----------------------------------------------------------------------


def test_magnitude_needs_no_calibration(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    prune(model, PruneConfig(method="magnitude"), PassContext())
    assert_masks_hold(model)


def test_calibrated_methods_need_calibration(tiny_llama):
    with pytest.raises(PassError, match=r"prune \(method wanda\) needs calibration") as info:
        prune(copy.deepcopy(tiny_llama), PruneConfig(method="wanda"), PassContext())
    assert "calibration:" in (info.value.hint or "")


def recipe_error(**settings) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse_recipe({"model": "m", "passes": [{"pass": "prune", **settings}]}, source="r")
    return info.value


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1])
def test_sparsity_out_of_range_names_the_key(value):
    error = recipe_error(sparsity=value)
    assert f"passes[0].sparsity: {value} is not valid" in error.message


def test_unquoted_nm_pattern_says_to_quote_it():
    error = recipe_error(pattern=124)  # what YAML makes of `pattern: 2:4`
    assert "passes[0].pattern" in error.message and "quote it" in error.message


def test_unquoted_nm_pattern_in_a_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: m\npasses:\n  - {pass: prune, method: wanda, pattern: 2:4}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "r.yaml:3" in info.value.message and "quote it" in info.value.message


def test_bad_pattern_and_contradicting_sparsity():
    assert "'N:M'" in recipe_error(pattern="2-4").message
    assert "contradicts pattern 2:4" in recipe_error(pattern="2:4", sparsity=0.7).message
    assert PruneConfig(pattern="2:4", sparsity=0.5).fraction == 0.5
    with pytest.raises(ValidationError):
        PruneConfig(method="obs")


def test_pattern_not_dividing_in_features_names_the_layer_before_any_work(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(
        PassError,
        match=r"layer model\.layers\.0\.self_attn\.q_proj: .*by 24, "
        r"but it has 64",
    ) as info:
        run(model, method="magnitude", pattern="2:24")
    assert "ignore" in (info.value.hint or "")
    assert not masks(model)


def test_block_size_must_hold_whole_nm_groups(tiny_llama):
    with pytest.raises(PassError, match="block_size 30 is not a multiple of M=8") as info:
        run(copy.deepcopy(tiny_llama), method="sparsegpt", pattern="4:8", block_size=30)
    assert "divisible by 8" in (info.value.hint or "")


def test_no_module_matched(tiny_llama):
    with pytest.raises(PassError, match="no Linear module"):
        run(copy.deepcopy(tiny_llama), method="magnitude", targets=["nothing*"])


def test_mask_is_attached_to_linears_only(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    run(model, method="magnitude")
    for module in model.modules():
        if get(module, SparsityMask) is not None:
            assert isinstance(module, nn.Linear)


def test_shipped_2of4_int4_recipe_exports_sparse_on_a_tiny_model(model_dir, text_file, tmp_path):
    """recipes/smollm2-2of4-sparsegpt-w4.yaml's passes and export settings, on the tiny model:
    every decoder Linear is stored in the N:M sparse format and reloads with equal logits."""
    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "smollm2-2of4-sparsegpt-w4.yaml")
    assert recipe.export is not None and recipe.export.sparse
    result = Pipeline(
        ModelSpec(name=str(model_dir)),
        [
            p.model_copy(update={"block_size": 32}) if isinstance(p, PruneConfig) else p
            for p in recipe.passes
        ],
        calibration=CalibrationSpec(dataset=str(text_file), samples=8, seq_len=32),
        export=tmp_path / "export",
    ).run()
    manifest = json.loads((tmp_path / "export" / "compress_manifest.json").read_text())
    kinds = {name: entry["format"]["kind"] for name, entry in manifest["modules"].items()}
    assert len(kinds) == 7 * 3 and set(kinds.values()) == {"nm_int"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = calibration(samples=2, length=16)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-4)
