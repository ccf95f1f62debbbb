"""The ``contextual`` pass and Sirius on tiny models: thresholds hit the target sparsity, the
decode kernel equals the masked dense product, Sirius reproduces dense greedy output (and fails
without rollback), export reload runs sparse (and loads dense in stock transformers), recipes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from compress.errors import PassError
from compress.export.writer import export_model
from compress.pipeline import Pipeline
from compress.prune import sirius as sirius_module
from compress.prune.contextual import (
    CONFIG_KEY,
    ContextualConfig,
    ContextualLinear,
    contextual,
    dense_mode,
    error_curve,
    greedy_allocation,
    install_from_config_,
    magnitude_threshold,
    site_column_scale,
)
from compress.prune.contextual_kernel import (
    masked_linear_reference,
    native,
    sparse_gemv,
    sparse_gemv_torch,
)
from compress.prune.sirius import sirius_decoding, sirius_generate
from compress.recipe import CalibrationSpec, ModelSpec, load_recipe
from compress.registry import PassContext, get_pass
from compress.utils.hooks import capture_inputs
from tests.conftest import save_tiny_llama

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "smollm2-contextual50.yaml"


def calibration(samples: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (samples, length), generator=generator)


def sparse_copy(model, sparsity: float, **settings):
    model = copy.deepcopy(model)
    report = contextual(
        model,
        ContextualConfig(sparsity=sparsity, **settings),
        PassContext(calibration=calibration()),
    )
    return model, report


@torch.no_grad()
def greedy(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0)  # fmt: skip


# --- thresholds ---------------------------------------------------------------------------------


def test_registered_as_calibrated_pass():
    entry = get_pass("contextual")
    assert entry.config_cls is ContextualConfig and entry.calibrated


def test_magnitude_threshold_is_the_quantile():
    values = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    assert magnitude_threshold(values, 0.3) == 30.0
    assert int((values.abs() <= 30.0).sum()) == 30
    assert magnitude_threshold(values, 0.0) is None


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_thresholds_hit_the_target_on_calibration_data(tiny_llama, sparsity):
    model, report = sparse_copy(tiny_llama, sparsity)
    assert report.metrics["calibration_sparsity"] == pytest.approx(sparsity, abs=0.01)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, ContextualLinear)}
    assert len(modules) == 2 * 7
    zeroed: dict[str, list[float]] = {name: [] for name in modules}

    def seen(name: str, x: torch.Tensor) -> None:
        masked = modules[name].masked(x, modules[name].threshold)
        zeroed[name].append(float((masked == 0).float().mean()))

    with capture_inputs(modules, seen), torch.no_grad():
        model(calibration())  # the calibration text, through the sparse model
    for name, fractions in zeroed.items():
        # every site was calibrated on exactly these inputs (the sparse sites before it)
        assert sum(fractions) / len(fractions) == pytest.approx(sparsity, abs=0.01), name


def test_error_curve_grows_from_zero_to_one():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(50, 16, generator=generator)
    curve = error_curve(samples, torch.rand(16, generator=generator) + 0.1, 10)
    assert curve.shape == (11,) and float(curve[0]) == 0.0
    assert float(curve[-1]) == pytest.approx(1.0)
    assert torch.all(curve[1:] >= curve[:-1])


def test_greedy_allocation_reaches_the_weighted_target_and_spares_the_sensitive_site():
    levels = torch.linspace(0, 1, 41)
    curves = {"flat": levels**4, "steep": levels.sqrt()}  # zeroing "steep" costs far more
    allocated = greedy_allocation(curves, {"flat": 3.0, "steep": 1.0}, 0.5)
    mean = (3 * allocated["flat"] + allocated["steep"]) / 4
    assert 0.5 <= mean <= 0.5 + 1 / 40
    assert allocated["flat"] > 0.5 > allocated["steep"]


def test_greedy_allocation_pass_hits_the_mean_by_weight(tiny_llama):
    _, report = sparse_copy(tiny_llama, 0.5, allocation="greedy")
    for metrics in report.per_module.values():
        allocated = {k.removesuffix("_allocated"): v for k, v in metrics.items() if "alloc" in k}
        assert set(allocated) == {"qkv", "o", "gate_up", "down"}
        weights = {"qkv": 64 * 128, "o": 64 * 64, "gate_up": 64 * 256, "down": 128 * 64}
        mean = sum(weights[s] * allocated[s] for s in weights) / sum(weights.values())
        assert 0.5 <= mean <= 0.53
        for site, value in allocated.items():
            assert metrics[f"{site}_calibration_sparsity"] == pytest.approx(value, abs=0.01)


def test_sparsity_zero_leaves_the_model_dense(tiny_llama):
    model, _ = sparse_copy(tiny_llama, 0.0)
    ids = calibration(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits, rtol=0, atol=0)


def test_sparse_model_changes_logits_and_dense_mode_restores_them(tiny_llama):
    model, _ = sparse_copy(tiny_llama, 0.5)
    ids = calibration(2, 16)
    with torch.no_grad():
        dense = tiny_llama(ids).logits
        assert not torch.allclose(model(ids).logits, dense, atol=1e-3)
        with dense_mode(model):
            torch.testing.assert_close(model(ids).logits, dense, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(ids).logits, dense, atol=1e-3)


@pytest.mark.parametrize("score", ["magnitude", "weighted"])
def test_one_token_decode_equals_the_masked_forward(uneven_llama, score):
    """The kernel path (one token) and the masked dense path (several tokens) agree."""
    model, _ = sparse_copy(uneven_llama, 0.5, score=score)
    ids = calibration(1, 12)
    with torch.no_grad():
        whole = model(ids).logits[0, -1]
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=out.past_key_values).logits[0, -1]
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)


# --- the kernel ---------------------------------------------------------------------------------

SHAPES = [(1, 1), (7, 5), (64, 128), (128, 64), (576, 192), (33, 300), (1000, 17)]


@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("path", ["dispatch", "torch"])
def test_kernel_equals_masked_dense_matmul(in_features, out_features, sparsity, path):
    generator = torch.Generator().manual_seed(in_features * 31 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    x = torch.randn(in_features, generator=generator)
    threshold = float(x.abs().quantile(sparsity)) if sparsity < 1 else float("inf")
    kernel = sparse_gemv if path == "dispatch" else sparse_gemv_torch
    got = kernel(x, weight.t().contiguous(), threshold)
    expected = masked_linear_reference(x, weight, threshold)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("in_features", "out_features"), [(576, 1536), (1536, 576), (65, 130)])
def test_kernel_in_bf16_is_within_bf16_rounding(in_features, out_features):
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    x = torch.randn(in_features, generator=generator).bfloat16()
    threshold = float(x.float().abs().median())
    got = sparse_gemv(x, weight.t().contiguous(), threshold)
    assert got.dtype == torch.bfloat16
    expected = masked_linear_reference(x, weight, threshold)
    scale = expected.abs().max()
    assert float((got.float() - expected).abs().max()) <= 0.01 * float(scale)


def test_native_kernel_builds_here():
    """The machine running the tests has a compiler (the int kernels need one too)."""
    assert native() is not None


# --- Sirius -------------------------------------------------------------------------------------


@pytest.mark.parametrize("period", [1, 3, 8])
def test_sirius_with_a_dense_draft_model_is_the_dense_output(tiny_llama, period):
    model, _ = sparse_copy(tiny_llama, 0.0)
    ids = calibration(1, 6)
    expected = greedy(tiny_llama, ids, 24)
    tokens, stats = sirius_generate(model, ids, max_new_tokens=24, period=period)
    assert torch.equal(tokens, expected)
    assert stats.corrections == 0 and stats.rejected == 0


@pytest.mark.parametrize("period", [1, 2, 5])
def test_sirius_with_sparsity_is_the_dense_greedy_output(tiny_llama, period):
    model, _ = sparse_copy(tiny_llama, 0.7)
    expected_tokens = 0
    for seed in range(3):
        ids = calibration(1, 6, seed=seed)
        expected = greedy(tiny_llama, ids, 24)
        assert not torch.equal(greedy(model, ids, 24), expected)  # sparsity alone diverges
        tokens, stats = sirius_generate(model, ids, max_new_tokens=24, period=period)
        assert torch.equal(tokens, expected)
        assert stats.corrections > 0
        expected_tokens += 1
    assert expected_tokens == 3


def test_sirius_without_rollback_of_the_cache_goes_wrong(tiny_llama, monkeypatch):
    """The check above fails when the cache keeps the sparse entries of rejected drafts."""
    model, _ = sparse_copy(tiny_llama, 0.7)
    ids = calibration(1, 6)
    expected = greedy(tiny_llama, ids, 24)

    def no_rollback(cache, length):
        return None

    monkeypatch.setattr(sirius_module, "_crop_to", no_rollback)
    tokens, _ = sirius_generate(model, ids, max_new_tokens=24, period=1)
    assert not torch.equal(tokens, expected)


def test_sirius_lenient_acceptance_checks_less(tiny_llama):
    model, _ = sparse_copy(tiny_llama, 0.5)
    ids = calibration(1, 6)
    _, strict = sirius_generate(model, ids, max_new_tokens=24, period=4)
    _, lenient = sirius_generate(model, ids, max_new_tokens=24, period=4, min_prob=1e-9)
    assert lenient.rejected == 0 and lenient.accepted >= strict.accepted


def test_sirius_draft_confidence_checks_early_and_keeps_the_dense_output(tiny_llama):
    """A random tiny model is unsure of every token (p well below 0.5): each round then ends
    after one draft, so fewer drafts are thrown away than with the fixed period, the output is
    still the dense greedy one; a confidence no draft falls below changes nothing."""
    model, _ = sparse_copy(tiny_llama, 0.7)
    ids = calibration(1, 6)
    expected = greedy(tiny_llama, ids, 24)
    tokens, fixed = sirius_generate(model, ids, max_new_tokens=24, period=8)
    early_tokens, early = sirius_generate(
        model, ids, max_new_tokens=24, period=8, draft_confidence=0.5
    )
    assert torch.equal(tokens, expected) and torch.equal(early_tokens, expected)
    assert early.sparse_steps == early.dense_checks - 1  # one draft per round (and the prompt)
    assert early.early_checks >= early.dense_checks - 2  # all but a last round of budget 1
    assert early.rejected < fixed.rejected and fixed.early_checks == 0
    _, never = sirius_generate(model, ids, max_new_tokens=24, period=8, draft_confidence=1e-12)
    assert never == fixed


def test_sirius_through_generate(tiny_llama):
    model, _ = sparse_copy(tiny_llama, 0.7, sirius_period=3)
    ids = calibration(1, 6)
    produced = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0,
                              custom_generate=sirius_decoding)  # fmt: skip
    assert torch.equal(produced, greedy(tiny_llama, ids, 20))


def test_sirius_refuses_batches_and_sampling(tiny_llama):
    model, _ = sparse_copy(tiny_llama, 0.5)
    with pytest.raises(PassError, match="one non-empty sequence"):
        sirius_generate(model, calibration(2, 6), max_new_tokens=4, period=2)
    with pytest.raises(PassError, match=r"draft_confidence must be between 0 and 1, got 1\.5"):
        sirius_generate(model, calibration(1, 6), max_new_tokens=4, period=2, draft_confidence=1.5)
    with pytest.raises(PassError, match="greedy"):
        model.generate(calibration(1, 6), max_new_tokens=4, do_sample=True, pad_token_id=0,
                       custom_generate=sirius_decoding)  # fmt: skip


# --- export -------------------------------------------------------------------------------------

PLAIN = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForCausalLM
    folder, ids_path, out = sys.argv[1:]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.load(ids_path)).logits
    assert not any(name == "compress" or name.startswith("compress.") for name in sys.modules)
    torch.save(logits, out)
    """
)


def test_export_reloads_sparse_with_sirius_and_plain_transformers_loads_it_dense(
    tiny_llama, tmp_path
):
    model, _ = sparse_copy(tiny_llama, 0.7, sirius_period=4, sirius_draft_confidence=0.25)
    folder = export_model(model, None, tmp_path / "export")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == "llama"  # not guarded: the weights are plain
    assert saved[CONFIG_KEY]["sparsity"] == 0.7
    assert saved[CONFIG_KEY]["sirius"] == {"period": 4, "draft_confidence": 0.25}
    assert len(saved[CONFIG_KEY]["thresholds"]) == 2

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert sum(isinstance(m, ContextualLinear) for m in loaded.modules()) == 14
    assert sirius_module.configured_draft_confidence(loaded) == 0.25
    ids = calibration(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    prompt = ids[:1, :6]
    sparse_only = greedy(model, prompt, 20)
    produced = loaded.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(produced, greedy(tiny_llama, prompt, 20))  # Sirius, from the config
    assert not torch.equal(produced, sparse_only)

    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        torch.testing.assert_close(
            torch.load(tmp_path / "o"), tiny_llama(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_export_without_sirius_generates_sparse(tiny_llama, tmp_path):
    model, _ = sparse_copy(tiny_llama, 0.7)
    folder = export_model(model, None, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = calibration(1, 6)
    assert torch.equal(
        loaded.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0),
        greedy(model, prompt, 20),
    )


def test_weighted_score_zeroes_the_entries_that_move_the_output_least():
    """At the same sparsity, ranking entries by |x| * column norm (WINA) leaves a far smaller
    output error than ranking by |x| when the columns' norms differ."""
    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        norms = torch.logspace(-1, 1, 64)[torch.randperm(64, generator=generator)]
        linear.weight.copy_(torch.randn(48, 64, generator=generator) * norms)
    x = torch.randn(2000, 64, generator=generator)
    scale = site_column_scale(torch.nn.ModuleDict({"p": linear}), ("p",))
    assert float(scale.square().mean()) == pytest.approx(1.0)
    errors = {}
    for name, layer_scale in (("magnitude", None), ("weighted", scale)):
        scores = x.abs() if layer_scale is None else x.abs() * layer_scale
        threshold = magnitude_threshold(scores, 0.5)
        assert threshold is not None
        layer = ContextualLinear.from_linear(copy.deepcopy(linear), threshold, layer_scale)
        masked = layer.masked(x, threshold)
        assert float((masked == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
        with torch.no_grad():
            errors[name] = float((layer(x) - linear(x)).square().sum() / linear(x).square().sum())
    assert errors["weighted"] < 0.5 * errors["magnitude"]


def test_weighted_export_recomputes_the_column_scales_and_version_1_reads_as_magnitude(
    uneven_llama, tmp_path
):
    ids = calibration(2, 16)
    weighted, _ = sparse_copy(uneven_llama, 0.5, score="weighted")
    magnitude, _ = sparse_copy(uneven_llama, 0.5)
    folder = export_model(weighted, None, tmp_path / "weighted")
    spec = json.loads((folder / "config.json").read_text())[CONFIG_KEY]
    assert (spec["version"], spec["score"]) == (2, "weighted")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    scaled = [m for m in loaded.modules() if isinstance(m, ContextualLinear)]
    assert len(scaled) == 14 and all(m.input_scale is not None for m in scaled)
    assert "input_scale" not in "".join(loaded.state_dict())  # recomputed, not stored
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, weighted(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(magnitude(ids).logits, weighted(ids).logits, atol=1e-3)

    old = {"version": 1, "sparsity": 0.5, "sirius": None,
           "thresholds": magnitude.config.contextual_sparsity["thresholds"]}  # fmt: skip
    dense = copy.deepcopy(uneven_llama)
    assert install_from_config_(dense, old) == 14
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, magnitude(ids).logits, rtol=0, atol=0)
    with pytest.raises(PassError, match="score"):
        install_from_config_(copy.deepcopy(uneven_llama), {**spec, "score": "wina"})


# --- pipeline and recipes -----------------------------------------------------------------------


def test_pipeline_runs_contextual_and_evaluates_the_reloaded_export(model_dir, text_file, tmp_path):
    out = tmp_path / "export"
    result = Pipeline(
        ModelSpec(name=str(model_dir)),
        [ContextualConfig(sparsity=0.5, sirius_period=4)],
        calibration=CalibrationSpec(dataset=str(text_file), samples=8, seq_len=32),
        export=out,
    ).run()
    passes = result.report["passes"]
    assert passes[0]["metrics"]["calibration_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(passes[0]["touched"]) == 3
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, ContextualLinear) for m in loaded.modules()) == 3 * 7


def test_distill_trains_the_sparse_model_and_a_second_pass_measures_the_thresholds_again(
    text_file, tmp_path
):
    """contextual → distill → contextual (recipes/smollm2-contextual50-distill.yaml): distill
    trains every decoder weight with the masks in the forward pass (held-out KL falls), the
    weights it trained are the ones exported, and the second pass puts new thresholds on the
    trained inputs that cut the target again; the export reloads sparse with those."""
    from compress.distill.distill import DistillConfig

    # peaked predictions (a larger init): sparsity costs a KL that training can win back
    model_dir = save_tiny_llama(tmp_path / "model", layers=2, seed=3, initializer_range=0.15)
    distill = DistillConfig.model_validate(
        {"dataset": str(text_file), "samples": 16, "seq_len": 32, "held_out": 4, "steps": 12,
         "gradient_accumulation": 2, "eval_every": 4, "checkpoint_every": 4, "lr": 3e-3,
         "freeze": ["model.embed_tokens", "lm_head"]}
    )  # fmt: skip
    out = tmp_path / "export"
    result = Pipeline(
        ModelSpec(name=str(model_dir)),
        [ContextualConfig(sparsity=0.5), distill, ContextualConfig(sparsity=0.5)],
        calibration=CalibrationSpec(dataset=str(text_file), samples=8, seq_len=32),
        export=out,
    ).run()
    first, trained, second = result.report["passes"]
    assert trained["metrics"]["held_out_kl_after"] < 0.8 * trained["metrics"]["held_out_kl_before"]
    assert second["metrics"]["calibration_sparsity"] == pytest.approx(0.5, abs=0.01)
    layer = "model.layers.1"
    moved = [
        abs(second["per_module"][layer][key] / first["per_module"][layer][key] - 1)
        for key in first["per_module"][layer]
        if key.endswith("_threshold")
    ]
    assert max(moved) > 0.01  # training moved the inputs, the thresholds followed
    loaded = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    projection = loaded.model.layers[1].mlp.down_proj
    assert isinstance(projection, ContextualLinear)
    assert projection.threshold == pytest.approx(second["per_module"][layer]["down_threshold"])
    assert not torch.equal(projection.weight, original.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(loaded.lm_head.weight, original.lm_head.weight)  # frozen


def test_shipped_recipe_validates():
    recipe = load_recipe(RECIPE)
    assert recipe.model.name == "smollm2-135m"
    (entry,) = recipe.passes
    assert isinstance(entry, ContextualConfig)
    assert (entry.sparsity, entry.sirius_period) == (0.5, 2)
    assert recipe.evaluate is not None and recipe.evaluate.kl


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sirius_period": 0}, "sirius_period"),
        ({"sirius_draft_confidence": 0.5}, "sirius_draft_confidence"),
        ({"sirius_period": 4, "sirius_draft_confidence": 1.0}, "sirius_draft_confidence"),
        ({"sites": ["mlp"]}, "sites"),
        ({"sparsty": 0.5}, "sparsty"),
    ],
)
def test_config_errors_name_the_key(settings, key):
    with pytest.raises(ValidationError, match=key):
        ContextualConfig(**settings)


def test_needs_calibration(tiny_llama):
    with pytest.raises(PassError, match="calibration"):
        contextual(copy.deepcopy(tiny_llama), ContextualConfig(), PassContext())
