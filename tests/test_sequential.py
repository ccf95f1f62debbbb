import pytest
import torch
from torch import nn

from compress.errors import PassError
from compress.sequential import capture_layer_inputs, run_sequential
from compress.utils.hooks import capture_inputs


def ids(samples=6, length=12, seed=0):
    return torch.randint(0, 256, (samples, length), generator=torch.Generator().manual_seed(seed))


def test_layer_chain_reproduces_the_model(tiny_llama_copy):
    # a copy: output_hidden_states makes transformers leave output-recording hooks on the model
    tiny_llama = tiny_llama_copy
    batches = capture_layer_inputs(tiny_llama, ids(), batch_size=4)
    assert [h.shape[0] for h in batches.hidden] == [4, 2]
    for layer in tiny_llama.model.layers:
        batches.hidden = batches.run(layer)
    with torch.no_grad():
        expected = tiny_llama(ids(), output_hidden_states=True).hidden_states[-1]
    assert torch.equal(tiny_llama.model.norm(torch.cat(batches.hidden)), expected)


def test_steps_run_in_order_and_hooks_see_every_sample(tiny_llama):
    seen = []

    def step(index, name, layer, run):
        rows = {}
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        with capture_inputs(
            linears, lambda n, x: rows.__setitem__(n, rows.get(n, 0) + x.shape[0] * x.shape[1])
        ):
            run()
        seen.append((index, name, rows))

    run_sequential(tiny_llama, ids(samples=5, length=7), step, batch_size=2)
    assert [(i, n) for i, n, _ in seen] == [(0, "model.layers.0"), (1, "model.layers.1")]
    for _, _, rows in seen:
        assert set(rows) == {
            f"{p}_proj"
            for p in (
                "self_attn.q",
                "self_attn.k",
                "self_attn.v",
                "self_attn.o",
                "mlp.gate",
                "mlp.up",
                "mlp.down",
            )
        }
        assert set(rows.values()) == {5 * 7}
    # hooks were removed
    assert not any(m._forward_pre_hooks for m in tiny_llama.modules())


@pytest.mark.parametrize("changes_layers", [True, False])
def test_a_measuring_step_runs_each_layer_once(tiny_llama_copy, changes_layers):
    # changes_layers=False: the step's own run feeds the next layer, with the same outputs
    model = tiny_llama_copy
    calls = {index: 0 for index in range(len(model.model.layers))}
    inputs = {}
    handles = [
        layer.register_forward_hook(
            lambda _m, _a, _o, index=index: calls.__setitem__(index, calls[index] + 1)
        )
        for index, layer in enumerate(model.model.layers)
    ]

    def step(index, name, layer, run):
        with capture_inputs(
            {"q": layer.self_attn.q_proj}, lambda n, x: inputs.setdefault(index, x)
        ):
            run()

    run_sequential(model, ids(), step, batch_size=4, changes_layers=changes_layers)
    for handle in handles:
        handle.remove()
    batches = 2  # 6 samples in batches of 4
    assert set(calls.values()) == {batches * (2 if changes_layers else 1)}
    reference = {}
    with (
        capture_inputs(
            {"q": model.model.layers[1].self_attn.q_proj},
            lambda n, x: reference.setdefault(1, x),
        ),
        torch.no_grad(),
    ):
        model(ids()[:4])
    assert torch.allclose(inputs[1], reference[1], atol=1e-6)


def test_later_layers_see_compressed_outputs(tiny_llama_copy):
    model = tiny_llama_copy
    captured = {}

    def step(index, name, layer, run):
        with capture_inputs(
            {"q": layer.self_attn.q_proj}, lambda n, x: captured.setdefault(index, x)
        ):
            run()
        if index == 0:  # "compress" layer 0 by zeroing its MLP output
            with torch.no_grad():
                layer.mlp.down_proj.weight.zero_()

    run_sequential(model, ids(samples=2), step, batch_size=2)
    batches = capture_layer_inputs(model, ids(samples=2), batch_size=2)
    after_compressed_layer0 = batches.run(model.model.layers[0])[0]
    normed = model.model.layers[1].input_layernorm(after_compressed_layer0)
    assert torch.allclose(captured[1], normed, atol=1e-6)


def test_model_without_decoder_layers_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(PassError, match="cannot find the decoder layers of Sequential"):
        run_sequential(model, ids(), lambda *a: None)


def test_hooks_are_removed_on_error(tiny_llama):
    def step(index, name, layer, run):
        with capture_inputs({"q": layer.self_attn.q_proj}, lambda n, x: None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_sequential(tiny_llama, ids(), step)
    assert not any(m._forward_pre_hooks for m in tiny_llama.modules())
    assert not tiny_llama.training
