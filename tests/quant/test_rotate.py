"""The ``rotate`` pass: same function after the fused rotation, fewer outliers for the quantizer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from compress.errors import PassError
from compress.ir import Rotation, get
from compress.quant.rotate import RotateConfig, rotate
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext, get_pass
from compress.utils.hadamard import hadamard, has_hadamard, random_orthogonal, randomized_hadamard
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
