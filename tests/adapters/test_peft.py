"""QWHA as a PEFT method: registration, training through ``get_peft_model``, save and load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_qwha_is_an_ordinary_peft_type() -> None:
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    import compress.adapters.qwha as qwha

    qwha.register()  # registering again is a no-op, not PEFT's duplicate error
    assert qwha._peft_type("QWHA") is PeftType.QWHA
    assert PeftType("QWHA") is PeftType.QWHA and PeftType.QWHA in list(PeftType)
    assert PeftType.LORA in list(PeftType)  # the enum is otherwise untouched
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.QWHA].__name__ == "QWHAConfig"
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.QWHA].__name__ == "QWHAModel"


def test_get_peft_model_trains_only_the_coefficients(model_dir: Path) -> None:
    import peft

    from compress.adapters.qwha import QWHAConfig

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    original = _logits(model)
    tuned = peft.get_peft_model(model, QWHAConfig(target_modules=["q_proj", "down_proj"], rank=2))
    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and all("qwha_values" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2 * (2 * (64 + 64) + 2 * (128 + 64))
    assert torch.equal(_logits(tuned), original)  # zero coefficients: the base model's function
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    loss = torch.nn.functional.cross_entropy(
        tuned(IDS).logits[:, :-1].reshape(-1, 256), IDS[:, 1:].reshape(-1)
    )
    loss.backward()
    optimizer.step()
    assert not torch.equal(_logits(tuned), original)


def test_save_and_load_keep_a_chosen_support(model_dir: Path, tmp_path: Path) -> None:
    """The support travels with the adapter: a layer whose coefficients sit elsewhere than the
    seed would draw them is reproduced exactly after ``PeftModel.from_pretrained``; and a layer
    that has already run follows a support changed in place (its derived indices are not
    stale)."""
    import peft

    from compress.adapters.qwha import QWHAConfig

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tuned = peft.get_peft_model(model, QWHAConfig(target_modules=["v_proj"], rank=1, seed=5))
    layer = tuned.base_model.model.model.layers[0].self_attn.v_proj
    count = layer.qwha_values["default"].numel()
    _logits(tuned)  # the layer now holds the seed's support, derived for decoding
    with torch.no_grad():
        layer.qwha_row_counts["default"].zero_()[0] = count  # every coefficient in row 0
        layer.qwha_cols["default"].copy_(torch.arange(count) % 64)
        for name, parameter in tuned.named_parameters():
            if "qwha_values" in name:
                parameter.copy_(
                    torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2))
                )
    expected = _logits(tuned)
    tuned.save_pretrained(str(tmp_path / "qwha"))
    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir)), str(tmp_path / "qwha")
    )
    assert torch.equal(_logits(loaded), expected)
    delta = loaded.base_model.model.model.layers[0].self_attn.v_proj.get_delta_weight("default")
    assert delta[1:].abs().max() == 0 and delta[0].abs().max() > 0


def test_qwha_refuses_what_it_cannot_wrap() -> None:
    from compress.adapters.qwha import QWHAConfig, QWHALinear

    with pytest.raises(TypeError, match="in_features and out_features"):
        QWHALinear(torch.nn.ReLU(), "default", 4, QWHAConfig())
    with pytest.raises(ValueError, match=r"1\.\.64"):
        QWHALinear(torch.nn.Linear(8, 8), "default", 65, QWHAConfig())
    with pytest.raises(ValueError, match="rank"):
        QWHAConfig(rank=0)
