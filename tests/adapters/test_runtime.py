"""Adapter records computed in a run: hooks, parameters for training, buffers otherwise."""

from __future__ import annotations

import torch
from torch import nn

from compress.adapters.runtime import AdapterHooks, adapter_hooks
from compress.ir import Adapter, attach


def _linear_with_lora() -> tuple[nn.Linear, Adapter]:
    torch.manual_seed(0)
    linear = nn.Linear(16, 8, bias=False)
    adapter = Adapter(
        "lora", {"lora_A": torch.randn(2, 16), "lora_B": torch.randn(8, 2)}, {"rank": 2, "alpha": 4}
    )
    attach(linear, adapter)
    return linear, adapter


def test_hooks_add_the_adapter_and_leave_no_trace() -> None:
    linear, adapter = _linear_with_lora()
    x = torch.randn(3, 16)
    plain = linear(x)
    with adapter_hooks() as hooks:
        hooks.attach("m", linear)
        assert not any("adapter" in k for k in linear.state_dict())  # checkpoints skip it
        assert not any("adapter" in n for n, _ in linear.named_parameters())
        delta = (x @ adapter.tensors["lora_A"].T) @ adapter.tensors["lora_B"].T * 2.0
        assert torch.allclose(linear(x), plain + delta, atol=1e-5)
    assert torch.equal(linear(x), plain)
    assert set(linear._buffers) == set() and {
        k for k, v in linear._parameters.items() if v is not None
    } == {"weight"}


def test_trained_parameters_are_written_back() -> None:
    linear, adapter = _linear_with_lora()
    hooks = AdapterHooks()
    made = hooks.attach("m", linear, parameters=True)
    assert [p.shape for p in made] == [(2, 16), (8, 2)]
    assert all(not p.requires_grad for p in made)  # frozen until the trainer selects them
    with torch.no_grad():
        made[1].add_(1.0)
    expected = made[1].detach().clone()
    hooks.close()
    assert torch.equal(adapter.tensors["lora_B"], expected)
    assert {k for k, v in linear._parameters.items() if v is not None} == {"weight"}
