"""The ``rotate`` pass: same function after the fused rotation, fewer outliers for the quantizer."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from compress.errors import ExportError, PassError
from compress.export.writer import export_model
from compress.ir import ConfigPatch, Rotation, get
from compress.quant.rotate import RotateConfig, rotate
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext, get_pass
from compress.utils.hadamard import (
    ONLINE_HADAMARD_KEY,
    hadamard,
    has_hadamard,
    random_orthogonal,
    randomized_hadamard,
    transforms_input_online,
)
from tests.conftest import tiny_family_model

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def token_ids(samples: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (samples, length), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def with_outliers(model: torch.nn.Module, factor: float = 30.0) -> torch.nn.Module:
    """A few residual channels much larger than the rest, as trained LLMs have."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:3] *= factor
    return model


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 48, 64, 576, 640, 1536])
def test_hadamard_orders_are_orthonormal_with_unit_magnitude_entries(n: int) -> None:
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n**-0.5))
    signed = randomized_hadamard(n, seed=3)
    assert torch.allclose(signed @ signed.T, torch.eye(n, dtype=h.dtype), atol=1e-12)


def test_orders_without_a_construction_are_refused_with_a_hint() -> None:
    assert not has_hadamard(6) and not has_hadamard(36)
    with pytest.raises(PassError, match="order 6") as caught:
        hadamard(6)
    assert "random_orthogonal" in (caught.value.hint or "")
    q = random_orthogonal(6, seed=1)
    assert torch.allclose(q @ q.T, torch.eye(6, dtype=q.dtype), atol=1e-12)


@pytest.mark.parametrize("family", ROTATABLE)
@pytest.mark.parametrize("method", ["hadamard", "random_orthogonal"])
def test_rotated_model_computes_the_same_function(family: str, method: str) -> None:
    model = tiny_family_model(family)
    rotated = copy.deepcopy(model)
    report = rotate(rotated, RotateConfig(method=method, seed=5), PassContext())
    ids = token_ids()
    want, got = logits(model, ids), logits(rotated, ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # ... with other weights: the rotation really happened and is recorded
    name = "model.layers.0.self_attn." + ("qkv_proj" if family == "phi3" else "q_proj")
    before, after = model.get_submodule(name), rotated.get_submodule(name)
    assert not torch.allclose(before.weight, after.weight, atol=1e-3)
    record = get(after, Rotation)
    assert record is not None and record.method == method and record.axis == "in"
    assert name in report.touched and report.notes


def test_tied_embeddings_are_untied_and_the_report_says_so() -> None:
    model = tiny_family_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rotated = copy.deepcopy(model)
    report = rotate(rotated, RotateConfig(), PassContext())
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight
    assert not rotated.config.tie_word_embeddings
    assert any("untied" in note for note in report.notes)
    ids = token_ids()
    want = logits(model, ids)
    assert (logits(rotated, ids) - want).abs().max() <= 1e-4 * want.abs().max()


def test_rotation_lowers_int3_error_on_a_model_with_outlier_channels() -> None:
    model = with_outliers(tiny_family_model("llama"))
    ids = token_ids(8, 32)
    reference = F.log_softmax(logits(model, ids), -1)

    def kl_after(passes: list[tuple[object, object]]) -> float:
        candidate = copy.deepcopy(model)
        for fn, config in passes:
            fn(candidate, config, PassContext())  # type: ignore[operator]
        log_q = F.log_softmax(logits(candidate, ids), -1)
        return float(F.kl_div(log_q, reference, log_target=True, reduction="batchmean"))

    config = RTNConfig(bits=3, group_size=32, symmetric=False)
    plain = kl_after([(rtn, config)])
    rotated = kl_after([(rotate, RotateConfig()), (rtn, config)])
    assert rotated < 0.7 * plain, (rotated, plain)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_families_with_post_norms_are_refused(family: str) -> None:
    with pytest.raises(PassError, match="residual") as caught:
        rotate(tiny_family_model(family), RotateConfig(), PassContext())
    assert "Llama" in (caught.value.hint or "")


def test_rotate_after_quantization_is_refused() -> None:
    # rtn leaves codes in the IR (packed at export): rotating the weights under them would
    # silently make the codes describe other weights
    model = tiny_family_model("llama")
    rtn(model, RTNConfig(bits=4, group_size=32), PassContext())
    with pytest.raises(PassError, match="after a quantization pass"):
        rotate(model, RotateConfig(), PassContext())


def test_registered_with_a_validated_config() -> None:
    assert get_pass("rotate").config_cls is RotateConfig
    with pytest.raises(ValueError, match="method"):
        RotateConfig(method="givens")  # type: ignore[arg-type]


# ------------------------------------------------------------- online down_proj transform


def with_mlp_outliers(model: torch.nn.Module, factor: float = 30.0) -> torch.nn.Module:
    """A few down_proj columns much larger than the rest, which set their groups' scales
    (up_proj's matching rows scaled down: the same function)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:3] /= factor
            layer.mlp.down_proj.weight[:, :3] *= factor
    return model


@pytest.mark.parametrize("family", ROTATABLE)
def test_online_down_transform_keeps_the_function(family: str) -> None:
    model = tiny_family_model(family)
    rotated = copy.deepcopy(model)
    report = rotate(rotated, RotateConfig(seed=2, online_down=True), PassContext())
    ids = token_ids()
    want = logits(model, ids)
    assert (logits(rotated, ids) - want).abs().max() <= 1e-4 * want.abs().max()
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert getattr(rotated.config, ONLINE_HADAMARD_KEY) == {"method": "hadamard", "modules": downs}
    patch = get(rotated, ConfigPatch)
    assert patch is not None and patch.updates[ONLINE_HADAMARD_KEY]["modules"] == downs
    assert all(transforms_input_online(rotated.get_submodule(name)) for name in downs)
    assert any("online Hadamard" in note for note in report.notes)
    # without the transform the weights alone compute something else
    bare = copy.deepcopy(rotated)
    for name in downs:
        bare.get_submodule(name)._forward_pre_hooks.clear()
    assert (logits(bare, ids) - want).abs().max() > 1e-2 * want.abs().max()


def test_online_down_transform_spreads_outlier_columns_before_rounding() -> None:
    """What the quantizer rounds: down_proj with a few large input columns loses most of its
    small columns in their groups; after the transform no column stands out and int3 rounding
    leaves less error."""
    model = with_mlp_outliers(tiny_family_model("llama"))
    config = RTNConfig(bits=3, group_size=32, symmetric=False, targets=["*.mlp.down_proj"])

    def down_proj_error(rotation: RotateConfig) -> tuple[float, float]:
        candidate = copy.deepcopy(model)
        rotate(candidate, rotation, PassContext())
        weight = candidate.model.layers[0].mlp.down_proj.weight.detach().clone()
        rtn(candidate, config, PassContext())
        rounded = candidate.model.layers[0].mlp.down_proj.weight.detach()
        columns = weight.abs().amax(0)
        error = (rounded - weight).norm() / weight.norm()
        return float(error), float(columns.max() / columns.median())

    (fused_error, fused_peak), (online_error, online_peak) = (
        down_proj_error(RotateConfig()),
        down_proj_error(RotateConfig(online_down=True)),
    )
    assert online_peak < 0.25 * fused_peak, (online_peak, fused_peak)
    assert online_error < 0.85 * fused_error, (online_error, fused_error)


def test_online_down_is_refused_twice_and_for_widths_without_a_hadamard_matrix() -> None:
    model = tiny_family_model("llama")
    rotate(model, RotateConfig(online_down=True), PassContext())
    with pytest.raises(PassError, match="already transforms"):
        rotate(model, RotateConfig(online_down=True), PassContext())
    odd = tiny_family_model("llama", intermediate_size=36)
    with pytest.raises(PassError, match="MLP width 36") as caught:
        rotate(odd, RotateConfig(online_down=True), PassContext())
    assert "online_down: false" in (caught.value.hint or "")


def test_export_with_online_transform_reloads_the_same_function(tmp_path) -> None:
    model = with_mlp_outliers(tiny_family_model("llama"))
    rotate(model, RotateConfig(online_down=True), PassContext())
    rtn(model, RTNConfig(bits=4, group_size=32), PassContext())
    folder = export_model(model, None, tmp_path / "export")
    saved = json.loads((folder / "config.json").read_text())
    assert saved[ONLINE_HADAMARD_KEY]["modules"][0] == "model.layers.0.mlp.down_proj"
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert transforms_input_online(loaded.model.layers[1].mlp.down_proj)
    ids = token_ids()
    want = logits(model, ids)
    assert (logits(loaded, ids) - want).abs().max() <= 1e-4 * want.abs().max()


def test_export_with_online_transform_refuses_a_layout_without_it(tmp_path) -> None:
    model = tiny_family_model("llama")
    rotate(model, RotateConfig(online_down=True), PassContext())
    rtn(model, RTNConfig(bits=8, group_size=None, symmetric=True), PassContext())
    with pytest.raises(ExportError, match="online Hadamard") as caught:
        export_model(model, None, tmp_path / "ct", format="compressed-tensors")
    assert "online_down: false" in (caught.value.hint or "")
    assert not (tmp_path / "ct").exists()


def test_awq_leaves_a_transformed_down_proj_unscaled() -> None:
    model = tiny_family_model("llama")
    rotate(model, RotateConfig(online_down=True), PassContext())
    config = get_pass("awq").config_cls.model_validate({"bits": 4, "group_size": 32})
    calibration = token_ids(4, 32)
    report = get_pass("awq").fn(model, config, PassContext(calibration=calibration))
    skipped = {name: why for name, why in report.skipped.items() if "down_proj" in name}
    assert skipped and all("online" in why for why in skipped.values())


@pytest.mark.parametrize("name", ["smollm2-w3-rotate-gptq.yaml", "smollm2-w4-rotate-gptq.yaml"])
def test_shipped_rotate_recipes_run_their_passes_on_a_tiny_model(name: str, tmp_path) -> None:
    """The recipes' passes on a tiny Llama (group 32, little data): the export reloads and
    computes what the pipeline's model computes, online transform included."""
    from compress.pipeline import Pipeline
    from compress.recipe import CalibrationSpec, ModelSpec, load_recipe
    from compress.registry import config_for
    from tests.conftest import save_tiny_llama, write_word_text

    model_dir = save_tiny_llama(tmp_path / "model", layers=2, seed=3)
    text = write_word_text(tmp_path / "t.txt", lines=24, words=40)
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / name)
    passes = [
        c.model_copy(update={"group_size": 32}) if hasattr(c, "group_size") else c
        for c in recipe.passes
    ]
    assert [config_for(c).name for c in passes] == ["rotate", "gptq"]
    result = Pipeline(
        ModelSpec(name=str(model_dir)),
        passes,
        calibration=CalibrationSpec(dataset=str(text), samples=4, seq_len=32),
        export=tmp_path / "out",
    ).run()
    online = getattr(passes[0], "online_down", False)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert transforms_input_online(loaded.model.layers[0].mlp.down_proj) == online
    ids = token_ids()
    want = logits(result.model, ids)
    assert (logits(loaded, ids) - want).abs().max() <= 1e-3 * want.abs().max()
