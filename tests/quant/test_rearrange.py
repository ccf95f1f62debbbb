"""The ``rearrange`` pass: the same function with channels sorted, fewer blocks that share an
outlier with ordinary values."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from compress.errors import PassError
from compress.ir import Permutation, get, records
from compress.quant.rearrange import (
    RearrangeConfig,
    apply_permutation_records,
    block_crest,
    rearrange,
)
from compress.quant.rotate import RotateConfig, rotate
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext, get_pass
from tests.conftest import FAMILIES, tiny_family_model

SITES = ["mlp", "values", "residual"]


def token_ids(samples: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (samples, length), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def with_scattered_outliers(model: torch.nn.Module, factor: float = 20.0) -> torch.nn.Module:
    """Large input columns spread over many blocks, as trained LLMs have: a few hidden
    channels (every reader's columns), intermediate channels (down_proj's columns) and head
    dimensions (o_proj's columns). The function changes; the tests compare against it."""
    hidden = torch.tensor([3, 21, 40, 58])
    inner = torch.arange(5, 128, 17)
    heads = torch.arange(2, 64, 9)
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj):
                linear.weight[:, hidden] *= factor
            for linear in (layer.mlp.gate_proj, layer.mlp.up_proj):
                linear.weight[:, hidden] *= factor
            layer.mlp.down_proj.weight[:, inner] *= factor
            layer.self_attn.o_proj.weight[:, heads] *= factor
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", [*SITES, "all"])
def test_rearranged_model_computes_the_same_function(family: str, site: str) -> None:
    model = (
        with_scattered_outliers(tiny_family_model(family))
        if family in ("llama", "qwen2")
        else tiny_family_model(family)
    )
    sorted_model = copy.deepcopy(model)
    sites = SITES if site == "all" else [site]
    report = rearrange(sorted_model, RearrangeConfig(sites=sites), PassContext())  # type: ignore[arg-type]
    ids = token_ids()
    want, got = logits(model, ids), logits(sorted_model, ids)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert report.touched and all(f"{s}_block_crest_after" in report.metrics for s in sites)


def test_sorting_lowers_the_block_crest() -> None:
    """Blocks of 8 (two per head of 16: sorting inside a head changes which block a value
    dimension lands in; with blocks of a whole head it could not)."""
    model = with_scattered_outliers(tiny_family_model("llama"))
    sorted_model = copy.deepcopy(model)
    report = rearrange(sorted_model, RearrangeConfig(block_size=8), PassContext())
    for site in SITES:
        before = report.metrics[f"{site}_block_crest_before"]
        assert report.metrics[f"{site}_block_crest_after"] < 0.9 * before, site
    down = model.model.layers[0].mlp.down_proj.weight
    assert block_crest(sorted_model.model.layers[0].mlp.down_proj.weight, 8) < block_crest(down, 8)


def test_random_order_is_a_control_that_keeps_the_function_but_not_the_crest() -> None:
    """order: random permutes the same channels (the function is unchanged) without gathering
    the outliers: the crest stays about where it was, which the sorted order lowers."""
    model = with_scattered_outliers(tiny_family_model("llama"))
    shuffled, again = copy.deepcopy(model), copy.deepcopy(model)
    config = RearrangeConfig(block_size=8, order="random", seed=3)
    report = rearrange(shuffled, config, PassContext())
    rearrange(again, config, PassContext())
    ids = token_ids()
    want = logits(model, ids)
    assert (logits(shuffled, ids) - want).abs().max() <= 1e-4 * want.abs().max()
    moved = get(shuffled.model.layers[0].mlp.down_proj, Permutation)
    assert moved is not None and moved.columns is not None
    assert not torch.equal(moved.columns, torch.arange(moved.columns.numel()))
    same = get(again.model.layers[0].mlp.down_proj, Permutation)
    assert same is not None and torch.equal(same.columns, moved.columns)  # seeded
    for site in SITES:
        before = report.metrics[f"{site}_block_crest_before"]
        assert report.metrics[f"{site}_block_crest_after"] > 0.9 * before, site


def test_ordinary_columns_are_rounded_finer_and_kl_drops() -> None:
    """What the sort is for: ordinary columns no longer share a block (and its scale) with an
    outlier, so their rounding error drops; the model's KL follows."""
    model = with_scattered_outliers(tiny_family_model("llama"))
    ids = token_ids(8, 32)
    reference = F.log_softmax(logits(model, ids), -1)
    config = RTNConfig(bits=4, group_size=16, symmetric=True)
    ordinary = torch.ones(128, dtype=torch.bool)
    ordinary[torch.arange(5, 128, 17)] = False  # the planted down_proj outlier columns

    def quantize(sort: bool) -> tuple[float, float]:
        candidate = copy.deepcopy(model)
        if sort:
            rearrange(candidate, RearrangeConfig(block_size=16), PassContext())
        down = candidate.model.layers[0].mlp.down_proj
        order = get(down, Permutation).columns if sort else torch.arange(128)  # type: ignore[union-attr]
        weight = down.weight.detach().clone()
        rtn(candidate, config, PassContext())
        error = (down.weight.detach() - weight)[:, ordinary[order]]
        relative = error.norm() / weight[:, ordinary[order]].norm()
        log_q = F.log_softmax(logits(candidate, ids), -1)
        kl = F.kl_div(log_q, reference, log_target=True, reduction="batchmean")
        return float(relative), float(kl)

    (plain_error, plain_kl), (sorted_error, sorted_kl) = quantize(False), quantize(True)
    assert sorted_error < 0.5 * plain_error, (sorted_error, plain_error)
    assert sorted_kl < 0.8 * plain_kl, (sorted_kl, plain_kl)


def test_records_put_another_copy_in_the_same_order() -> None:
    model = with_scattered_outliers(tiny_family_model("llama", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    original = copy.deepcopy(model)
    rearrange(model, RearrangeConfig(), PassContext())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    down = get(model.model.layers[1].mlp.down_proj, Permutation)
    assert down is not None and down.rows is not None and down.columns is not None
    assert set(down.group.split(",")) == {"model.layers.1.mlp", "residual"}
    reordered = copy.deepcopy(original)
    apply_permutation_records(model, reordered)
    for (name, a), (_, b) in zip(
        model.named_parameters(), reordered.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    assert len(list(records(model, Permutation))) > 10


def test_refused_after_quantization_after_rotate_and_twice() -> None:
    quantized = tiny_family_model("llama")
    rtn(quantized, RTNConfig(bits=4, group_size=32), PassContext())
    with pytest.raises(PassError, match="after a quantization pass"):
        rearrange(quantized, RearrangeConfig(), PassContext())
    rotated = tiny_family_model("llama")
    rotate(rotated, RotateConfig(), PassContext())
    with pytest.raises(PassError, match="after rotate") as caught:
        rearrange(rotated, RearrangeConfig(), PassContext())
    assert "one of rotate and rearrange" in (caught.value.hint or "")
    sorted_model = tiny_family_model("llama")
    rearrange(sorted_model, RearrangeConfig(sites=["mlp"]), PassContext())
    with pytest.raises(PassError, match="twice"):
        rearrange(sorted_model, RearrangeConfig(sites=["values"]), PassContext())
    with pytest.raises(PassError, match="after rearrange"):
        rotate(sorted_model, RotateConfig(), PassContext())


def test_registered_with_a_validated_config() -> None:
    assert get_pass("rearrange").config_cls is RearrangeConfig
    with pytest.raises(ValueError, match="sites"):
        RearrangeConfig(sites=["keys"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="sites"):
        RearrangeConfig(sites=[])


def test_a_correction_after_rearrange_reads_the_original_in_the_same_order(tmp_path: Path) -> None:
    """rearrange → rtn → lora_correct: the error is taken against the reordered original, so
    the adapters cancel most of it (against the unordered one they could not)."""
    from compress.pipeline import Pipeline
    from tests.adapters.conftest import write_recipe
    from tests.conftest import save_tiny_llama, write_word_text

    model_dir = save_tiny_llama(tmp_path / "model", layers=2, seed=3)
    text = write_word_text(tmp_path / "t.txt", lines=24, words=40)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        model_dir,
        text,
        [{"pass": "lora_correct", "rank": 4}],
        tmp_path / "out",
    )
    recipe.write_text(recipe.read_text().replace("passes:\n", "passes:\n  - {pass: rearrange}\n"))
    result = Pipeline.from_yaml(recipe).run()
    report = next(p for p in result.report["passes"] if p["name"] == "lora_correct")
    assert report["metrics"]["mean_error_ratio"] < 0.6
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    ids = token_ids()
    original = logits(AutoModelForCausalLM.from_pretrained(str(model_dir)), ids)
    bare = logits(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), compress_adapter=None), ids
    )
    assert (logits(loaded, ids) - original).square().mean() < 0.9 * (
        bare - original
    ).square().mean()
