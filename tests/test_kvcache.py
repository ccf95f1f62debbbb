"""The quantized KV cache: storage round trip, K-sort, memory, chunked attention against the
bf16 cache, ``generate`` through an export's loader, and the ``kv_cache`` pass."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import compress  # noqa: F401  (the loader of our exports)
from compress.errors import PassError
from compress.export.writer import export_model
from compress.quant.kv_cache import KVCacheConfig, kv_cache
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext
from compress.utils.kvcache import KV_CACHE_KEY
from compress.utils.quantized_cache import QuantizedKVCache, QuantizedKVLayer


def states(batch=1, heads=2, tokens=5, dim=16, seed=0, outliers=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, heads, tokens, dim, generator=g)
    for channel in outliers:
        x[..., channel] *= 30.0
    return x


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.01), (4, 0.2)])
def test_layer_returns_stored_tokens_dequantized_and_new_ones_as_given(bits, bound):
    layer = QuantizedKVLayer(bits=bits, group_size=8, ksort=False)
    k1, v1 = states(seed=1), states(seed=2)
    keys, values = layer.update(k1, v1)
    assert keys is k1 and values is v1  # the first call: nothing stored before
    k2, v2 = states(tokens=1, seed=3), states(tokens=1, seed=4)
    keys, values = layer.update(k2, v2)
    assert keys.shape == (1, 2, 6, 16) and layer.get_seq_length() == 6
    assert torch.equal(keys[:, :, -1:], k2) and torch.equal(values[:, :, -1:], v2)
    error = (keys[:, :, :5] - k1).norm() / k1.norm()
    assert 0 < error < bound


def test_ksort_lowers_key_error_when_channels_have_outliers():
    """Two outlier channels in every block of 8 spoil every block's scale; sorted, the eight
    fill one block and the other channels are stored far more finely."""
    outliers = (1, 2, 9, 10, 17, 18, 25, 26)
    keys = states(tokens=8, dim=32, seed=5, outliers=outliers)
    normal = [c for c in range(32) if c not in outliers]  # 24 ordinary channels
    errors = {}
    for ksort in (False, True):
        layer = QuantizedKVLayer(bits=4, group_size=8, ksort=ksort)
        layer.update(keys, keys)
        stored, _ = layer.update(keys[:, :, :1], keys[:, :, :1])
        diff = (stored[:, :, :8] - keys)[..., normal]
        errors[ksort] = float(diff.norm() / keys[..., normal].norm())
    assert errors[True] < 0.25 * errors[False]


def test_memory_is_codes_and_scales():
    layer = QuantizedKVLayer(bits=4, group_size=32)
    layer.update(states(tokens=10, dim=64), states(tokens=10, dim=64))
    values = 2 * 1 * 2 * 10 * 64  # keys and values, batch, heads, tokens, dim
    assert layer.stored_bytes() == values // 2 + (values // 32) * 2
    assert layer.stored_bytes() / (values * 2) == pytest.approx((4 + 16 / 32) / 16)


def chunked_logits(model, ids, cache, chunk):
    outputs = []
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            out = model(ids[:, start : start + chunk], cache=cache, use_cache=True)
            outputs.append(out.logits)
    return torch.cat(outputs, dim=1)


def kl(p_logits, q_logits):
    p = torch.log_softmax(p_logits.double(), -1)
    q = torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_chunked_attention_through_the_cache_stays_close(tiny_llama):
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    reference = chunked_logits(tiny_llama, ids, DynamicCache(config=tiny_llama.config), 8)
    with torch.no_grad():
        assert torch.allclose(reference, tiny_llama(ids).logits, atol=1e-4)  # chunking is exact
    divergence = {}
    for bits in (8, 4):
        cache = QuantizedKVCache(tiny_llama.config, bits=bits, group_size=8)
        divergence[bits] = kl(reference, chunked_logits(tiny_llama, ids, cache, 8))
    assert 0 < divergence[8] < divergence[4] < 0.05


def test_export_generate_uses_the_quantized_cache(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    rtn(model, RTNConfig(bits=8, group_size=None), PassContext())
    kv_cache(model, KVCacheConfig(bits=4, group_size=8), PassContext())
    export_model(model, None, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config[KV_CACHE_KEY] == {"bits": 4, "group_size": 8, "ksort": True}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    seen = []
    original = QuantizedKVLayer.update

    def spy(self, *args, **kwargs):
        seen.append(type(self))
        return original(self, *args, **kwargs)

    QuantizedKVLayer.update = spy
    try:
        out = loaded.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=5, do_sample=False)
    finally:
        QuantizedKVLayer.update = original
    assert out.shape == (1, 9)
    assert seen and set(seen) == {QuantizedKVLayer}


def test_pass_refuses_a_group_that_does_not_divide_the_head(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with pytest.raises(PassError, match="does not divide the head size 16"):
        kv_cache(model, KVCacheConfig(bits=4, group_size=12), PassContext())
    with pytest.raises(PassError, match="4 or 8"):
        kv_cache(model, KVCacheConfig(bits=3, group_size=8), PassContext())


def test_shipped_bfp_kv4_recipe_on_a_tiny_model(tmp_path):
    """recipes/smollm2-bfp-kv4.yaml's passes on a tiny model (head size 16: groups of 8)."""
    from pathlib import Path

    from compress.recipe import load_recipe
    from tests.conftest import run_passes_on_tiny_model

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "smollm2-bfp-kv4.yaml")
    gptq, kv = recipe.passes
    assert isinstance(kv, KVCacheConfig) and (kv.bits, kv.group_size, kv.ksort) == (4, 32, True)
    passes = [gptq, kv.model_copy(update={"group_size": 8})]
    _, loaded = run_passes_on_tiny_model(passes, tmp_path, seed=5)
    assert getattr(loaded.config, KV_CACHE_KEY)["group_size"] == 8
    out = loaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
