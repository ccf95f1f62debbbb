"""Structured pruning (``prune`` with ``structure: heads | channels | layers``) on tiny models:
shapes and config, equality with the unpruned model where the removed parts were dead, export
reloaded by plain transformers in a process without compress, generation after layer removal,
quantization after pruning, the pipeline, and configuration errors."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.errors import PassError, RecipeError
from compress.export.writer import export_model
from compress.ir import ConfigPatch, get, get_quantized
from compress.pipeline import Pipeline
from compress.prune.prune import PruneConfig, prune
from compress.quant.gptq import GPTQConfig, gptq
from compress.quant.rtn import RTNConfig, rtn
from compress.recipe import CalibrationSpec, ModelSpec, load_recipe, parse_recipe
from compress.registry import LayerAccess, PassContext
from tests.conftest import tiny_family_model

FAMILIES = ["llama", "gemma3_text"]
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-prune25.yaml"


def calibration(samples: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (samples, length), generator=generator)


def run(model, **settings):
    return prune(model, PruneConfig(**settings), PassContext(calibration=calibration()))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def three_layers(family: str, seed: int = 0):
    return tiny_family_model(
        family,
        seed=seed,
        num_hidden_layers=3,
        **({"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
           if family == "gemma3_text" else {}),
    )  # fmt: skip


# --- shapes and config ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_remove_whole_groups(family):
    model = tiny_family_model(family)
    report = run(model, structure="heads", remove=1)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    assert model.config.head_dim == 16
    for layer in model.model.layers:
        attention = layer.self_attn
        assert attention.q_proj.weight.shape == (32, 64)
        assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (16, 64)
        assert attention.o_proj.weight.shape == (64, 32)
    assert get(model, ConfigPatch).updates == {
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
    }
    assert report.per_module["model.layers.0"]["heads_removed"] == 2
    assert report.metrics["parameters_after"] < report.metrics["parameters_before"]
    assert 0 < report.metrics["decoder_fraction_removed"] < 1


@pytest.mark.parametrize("family", FAMILIES)
def test_channels_remove_the_same_count_in_every_layer(family):
    model = tiny_family_model(family)
    report = run(model, structure="channels", sparsity=0.25)
    assert model.config.intermediate_size == 96
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.up_proj.weight.shape == (96, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 96)
    assert get(model, ConfigPatch).updates == {"intermediate_size": 96}
    assert report.per_module["model.layers.1"]["channels_removed"] == 32
    mlp = 3 * 64 * 128
    decoder = report.metrics["decoder_parameters_before"]
    assert report.metrics["decoder_fraction_removed"] == pytest.approx(2 * mlp / 4 / decoder)


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_leave_the_list_in_place_and_renumber(family):
    model = three_layers(family)
    blocks = model.model.layers
    originals = list(blocks)
    report = run(model, structure="layers", remove=1)
    assert model.model.layers is blocks and len(blocks) == 2
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in blocks] == [0, 1]
    removed = [n for n, e in report.per_module.items() if e["removed"]]
    assert len(removed) == 1 and report.touched == removed
    kept = [i for i in range(3) if f"model.layers.{i}" not in removed]
    assert list(blocks) == [originals[i] for i in kept]  # the same modules, in order
    patch = get(model, ConfigPatch).updates
    assert patch["num_hidden_layers"] == 2
    if family == "gemma3_text":
        full = ["sliding_attention", "full_attention", "sliding_attention"]
        assert model.config.layer_types == patch["layer_types"] == [full[i] for i in kept]
        # each attention keeps its own kind; the model reads the kind of position i from config
        assert [layer.self_attn.layer_type for layer in blocks] == model.config.layer_types


def test_two_structured_passes_merge_their_config_patches():
    model = three_layers("llama")
    run(model, structure="channels", remove=32)
    run(model, structure="layers", remove=1)
    assert get(model, ConfigPatch).updates == {"intermediate_size": 96, "num_hidden_layers": 2}


def test_sparsity_rounds_to_the_nearest_count():
    model = tiny_family_model("llama")
    report = run(model, structure="channels", sparsity=0.3)  # 38.4 of 128
    assert model.config.intermediate_size == 128 - 38
    assert report.metrics["removed"] == 38


# --- the pruned model computes what the reference computes -----------------------------------


def dead_channels(model, channels: list[int]) -> None:
    """gate rows zero: silu(0) * up = 0 enters down_proj, so the channels do nothing."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[channels] = 0


def dead_group(model, group: int) -> None:
    """Value rows of one key/value head zero: its query heads output zero."""
    head_dim = model.config.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[group * head_dim : (group + 1) * head_dim] = 0


def dead_layer(model, index: int) -> None:
    """Both residual writers zero: the layer passes its input through."""
    with torch.no_grad():
        layer = model.model.layers[index]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("score", ["l2", "mean_abs"])
def test_removing_dead_channels_keeps_the_logits(family, score):
    model = tiny_family_model(family, seed=1)
    dead = [0, 5, 17, 40, 41, 99, 100, 127]  # awkward places: ends, neighbours
    dead_channels(model, dead)
    reference = copy.deepcopy(model)
    run(model, structure="channels", remove=len(dead), score=score)
    ids = calibration(samples=2, length=24, seed=5)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("group", [0, 1])
def test_removing_a_dead_head_group_keeps_the_logits(family, group):
    model = tiny_family_model(family, seed=2)
    dead_group(model, group)
    reference = copy.deepcopy(model)
    run(model, structure="heads", remove=1)
    ids = calibration(samples=2, length=24, seed=5)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_slicing_the_wrong_group_would_change_the_logits():
    """The oracle above is sharp: removing the live group instead changes the output."""
    model = tiny_family_model("llama", seed=2)
    dead_group(model, 0)
    reference = copy.deepcopy(model)
    dead_group(model, 1)  # now both are dead; the model is not the reference any more
    ids = calibration(samples=2, length=24, seed=5)
    assert not torch.allclose(logits(model, ids), logits(reference, ids), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_removing_a_pass_through_layer_keeps_logits_and_generation(family, index):
    model = three_layers(family, seed=3)
    dead_layer(model, index)
    reference = copy.deepcopy(model)
    report = run(model, structure="layers", remove=1)
    assert report.per_module[f"model.layers.{index}"]["removed"] == 1
    ids = calibration(samples=2, length=24, seed=5)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    settings: dict[str, Any] = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():  # with the KV cache: each remaining layer finds its own entries
        produced = model.generate(ids[:, :10], use_cache=True, **settings)
        expected = reference.generate(ids[:, :10], use_cache=True, **settings)
    assert torch.equal(produced, expected)


# --- export, reload without compress ------------------------------------------------------------

RELOAD = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids_path, out = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.load(ids_path)).logits
    produced = model.generate(torch.load(ids_path)[:, :6], max_new_tokens=4, do_sample=False,
                              pad_token_id=0)
    assert not any(name == "compress" or name.startswith("compress.") for name in sys.modules)
    torch.save({"logits": logits, "generated": produced,
                "parameters": sum(p.numel() for p in model.parameters())}, out)
    """
)


def reload_elsewhere(folder: Path, ids: torch.Tensor, tmp_path: Path) -> dict[str, Any]:
    """Load ``folder`` with stock transformers in a fresh interpreter that never imports
    compress; its logits, a greedy continuation and its parameter count."""
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: compress is not importable by accident
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(tmp_path / "o")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_plain_transformers_with_equal_logits(family, tmp_path):
    model = three_layers(family, seed=4)
    run(model, structure="heads", remove=1)
    run(model, structure="channels", sparsity=0.25)
    run(model, structure="layers", remove=1)
    folder = export_model(model, None, tmp_path / "export")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["intermediate_size"] == 96
    assert (saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"]) == (
        2,
        1,
        16,
    )
    assert "quantization_config" not in saved
    if family == "gemma3_text":
        assert saved["layer_types"] == model.config.layer_types and len(saved["layer_types"]) == 2
    ids = calibration(samples=2, length=20, seed=6)
    reloaded = reload_elsewhere(folder, ids, tmp_path)
    torch.testing.assert_close(reloaded["logits"], logits(model, ids), rtol=1e-4, atol=1e-5)
    assert reloaded["parameters"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model.generate(ids[:, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded["generated"], expected)


def test_export_trains_as_a_float_model(tmp_path):
    """What distillation needs: the reloaded model has float parameters and gradients flow."""
    model = tiny_family_model("llama")
    run(model, structure="channels", remove=32)
    folder = export_model(model, None, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    ids = calibration(samples=2, length=16)
    loss = loaded(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in loaded.parameters() if p.requires_grad)


# --- quantization after structured pruning ------------------------------------------------------


def test_rtn_after_structured_prune(tmp_path):
    model = three_layers("llama")
    run(model, structure="heads", remove=1)
    run(model, structure="channels", remove=32)
    run(model, structure="layers", remove=1)
    report = rtn(model, RTNConfig(bits=4, group_size=32), PassContext())
    assert len(report.touched) == 7 * 2
    assert get_quantized(model.model.layers[0].mlp.down_proj).shape == (64, 96)
    folder = export_model(model, None, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(folder)  # our loader: packed int4
    assert loaded.config.intermediate_size == 96
    ids = calibration(samples=2, length=16)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_gptq_after_structured_prune():
    model = three_layers("gemma3_text")
    run(model, structure="channels", remove=32)
    run(model, structure="layers", remove=1)
    report = gptq(model, GPTQConfig(bits=4, group_size=32), PassContext(calibration=calibration()))
    assert len(report.touched) == 7 * 2
    assert get_quantized(model.model.layers[1].mlp.gate_proj).shape == (96, 64)


def test_pipeline_prunes_then_quantizes_and_exports(model_dir, text_file, tmp_path):
    """Through the pipeline (with its per-layer checkpoint store holding the layer list)."""
    out = tmp_path / "export"
    result = Pipeline(
        ModelSpec(name=str(model_dir)),
        [
            PruneConfig(structure="layers", remove=1),
            PruneConfig(structure="channels", sparsity=0.25),
            GPTQConfig(bits=4, group_size=32),
        ],
        calibration=CalibrationSpec(dataset=str(text_file), samples=8, seq_len=32),
        export=out,
    ).run()
    passes = result.report["passes"]
    assert (
        passes[0]["metrics"]["decoder_parameters_after"]
        < (passes[0]["metrics"]["decoder_parameters_before"])
    )
    assert len(passes[2]["touched"]) == 7 * 2
    assert result.report["model"]["parameters"] == sum(p.numel() for p in result.model.parameters())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert (loaded.config.num_hidden_layers, loaded.config.intermediate_size) == (2, 96)
    ids = calibration(samples=2, length=16)
    torch.testing.assert_close(logits(loaded, ids), logits(result.model, ids), rtol=1e-4, atol=1e-4)


def test_offloaded_pipeline_is_refused(model_dir, text_file, tmp_path):
    with pytest.raises(PassError, match="offloaded") as info:
        Pipeline(
            ModelSpec(name=str(model_dir)),
            [PruneConfig(structure="layers", remove=1)],
            calibration=CalibrationSpec(dataset=str(text_file), samples=4, seq_len=32),
            export=tmp_path / "export",
            offload=True,
        ).run()
    assert "--offload" in (info.value.hint or "")


# --- refusals -----------------------------------------------------------------------------------


def test_structured_prune_after_quantization_is_refused():
    model = tiny_family_model("llama")
    rtn(model, RTNConfig(bits=4, group_size=32), PassContext())
    with pytest.raises(PassError, match=r"model\.layers\.0\.\S+ is already quantized") as info:
        run(model, structure="channels", sparsity=0.25)
    assert "before rtn/gptq" in (info.value.hint or "")


def test_offloaded_layers_are_refused():
    class Offloaded(LayerAccess):
        offloaded = True

    context = PassContext(calibration=calibration(), layers=Offloaded())
    with pytest.raises(PassError, match="offloaded"):
        prune(tiny_family_model("llama"), PruneConfig(structure="heads", remove=1), context)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"structure": "heads", "remove": 2}, "removes 2 of 2 key/value head groups, leaving none"),
        ({"structure": "layers", "sparsity": 0.9}, "removes 2 of 2 decoder layers, leaving none"),
        ({"structure": "channels", "remove": 128}, "removes 128 of 128 MLP channels"),
        ({"structure": "heads", "sparsity": 0.1}, "removes none of the 2 key/value head groups"),
    ],
)
def test_amounts_that_leave_nothing_or_remove_nothing(settings, message):
    model = tiny_family_model("llama")
    reference = copy.deepcopy(model)
    with pytest.raises(PassError, match=message) as info:
        run(model, **settings)
    assert info.value.hint
    ids = calibration(samples=1, length=8)
    assert torch.equal(logits(model, ids), logits(reference, ids))  # refused before any change


def test_fused_attention_names_the_module():
    with pytest.raises(PassError, match=r"model\.layers\.0\.self_attn\.qkv_proj is fused") as e:
        run(tiny_family_model("phi3"), structure="heads", remove=1)
    assert "q_proj/k_proj/v_proj/o_proj" in (e.value.hint or "")


def test_non_llama_attention_names_the_missing_module():
    model = tiny_family_model("llama")
    model.config.model_type = "custom"
    for layer in model.model.layers:
        layer.self_attn.query = layer.self_attn.q_proj
        del layer.self_attn.q_proj
    with pytest.raises(PassError, match=r"no module 'self_attn\.q_proj'"):
        run(model, structure="heads", remove=1)


def test_needs_calibration():
    with pytest.raises(PassError, match=r"prune \(structure layers\) needs calibration"):
        prune(tiny_family_model("llama"), PruneConfig(structure="layers", remove=1), PassContext())


def recipe_error(**settings: Any) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe({"model": "m", "passes": [{"pass": "prune", **settings}]}, source="r")
    return info.value.message


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"structure": "layers", "pattern": "2:4", "remove": 2},
            "pattern '2:4' with structure 'layers'",
        ),
        (
            {"structure": "heads", "method": "sparsegpt", "sparsity": 0.3},
            "method 'sparsegpt' with structure 'heads'",
        ),
        ({"structure": "channels"}, "needs how much to remove: sparsity"),
        ({"structure": "channels", "sparsity": 0.2, "remove": 3}, "keep one"),
        ({"structure": "layers", "remove": 2, "score": "l2"}, "ranked by block influence"),
        ({"structure": "heads", "remove": 1, "targets": ["*q_proj"]}, "targets ['*q_proj']"),
        ({"remove": 3}, "remove 3 applies to structured pruning only"),
        ({"structure": "rows", "remove": 3}, "structure"),
        ({"structure": "layers", "remove": 0}, "remove"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(settings, expected):
    message = recipe_error(**settings)
    assert "passes[0]" in message and expected in message


def test_weight_level_defaults_are_unchanged():
    config = PruneConfig()
    assert (config.structure, config.weight_method, config.fraction, config.pattern) == (
        "weights",
        "wanda",
        0.5,
        "unstructured",
    )


# --- the shipped recipe -----------------------------------------------------------------------

SMOLLM2 = {"hidden": 576, "heads": 9, "kv": 3, "head_dim": 64, "mlp": 1536, "layers": 30}


def smollm2_decoder_parameters(heads: int, kv: int, mlp: int, layers: int) -> int:
    s = SMOLLM2
    attention = s["hidden"] * s["head_dim"] * (2 * heads + 2 * kv)
    return layers * (attention + 3 * s["hidden"] * mlp + 2 * s["hidden"])


def test_recipe_removes_a_quarter_of_smollm2_decoder_parameters():
    recipe = load_recipe(RECIPE)
    assert recipe.export is not None and recipe.evaluate is not None
    shape = {"heads": SMOLLM2["heads"], "kv": SMOLLM2["kv"], "mlp": SMOLLM2["mlp"], "layers": 30}
    totals = {"heads": "kv", "channels": "mlp", "layers": "layers"}
    for config in recipe.passes:
        assert isinstance(config, PruneConfig) and config.structure != "weights"
        key = totals[config.structure]
        removed = config.remove or round((config.sparsity or 0) * shape[key])
        if config.structure == "heads":
            group = shape["heads"] // shape["kv"]
            shape["heads"] -= removed * group
        shape[key] -= removed
    before = smollm2_decoder_parameters(9, 3, 1536, 30)
    assert 1 - smollm2_decoder_parameters(**shape) / before >= 0.25


@pytest.mark.slow
def test_recipe_passes_on_smollm2(smollm2):
    """The recipe's passes on the real model (a short calibration): ≥ 25% of the decoder
    parameters go and the model still predicts."""
    model, tokenizer = smollm2
    model = copy.deepcopy(model).float()  # fp32: bf16 is emulated, slowly, on CPUs without it
    recipe = load_recipe(RECIPE)
    from compress.data import calibration_batch

    ids = calibration_batch(tokenizer, "builtin:wiki", 8, 256)
    context = PassContext(calibration=ids)
    reports = [prune(model, config, context) for config in recipe.passes]
    before = reports[0].metrics["decoder_parameters_before"]
    after = reports[-1].metrics["decoder_parameters_after"]
    assert 1 - after / before >= 0.25
    with torch.no_grad():
        out = model(ids[:2], labels=ids[:2])
    assert torch.isfinite(out.loss) and out.loss < 6


def test_recipe_order_check_refuses_structured_prune_after_a_quantizer(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: m\npasses:\n  - {pass: gptq, bits: 4}\n"
        "  - {pass: prune, structure: layers, remove: 2}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "r.yaml:4" in info.value.message and "prune comes after gptq" in info.value.message
    assert "move prune before gptq" in (info.value.hint or "")
