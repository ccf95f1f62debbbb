"""Quantized embeddings and lm_head: packed lookups, one stored copy of a tied pair, reloads."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import compress
from compress.errors import ExportError
from compress.export.writer import export_model
from compress.formats.int import IntFormat, quantize_int
from compress.formats.int.embedding import QuantEmbedding
from compress.formats.int.linear import QuantLinear
from compress.ir import QuantizedWeight, get_quantized
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext
from tests.conftest import tiny_llama_config

EMBEDDINGS = ["model.embed_tokens", "lm_head"]


def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def stored_keys(folder) -> set[str]:
    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


@pytest.mark.parametrize(
    ("bits", "group", "symmetric"), [(8, None, True), (4, 32, True), (3, 16, False)]
)
def test_lookup_dequantizes_the_gathered_rows(bits, group, symmetric):
    torch.manual_seed(0)
    embedding = nn.Embedding(50, 64)
    fmt = IntFormat(bits, group, symmetric)
    record = QuantizedWeight(*quantize_int(embedding.weight, fmt), fmt)
    module = QuantEmbedding.from_record(embedding, record)
    ids = torch.tensor([[3, 0, 49, 3], [7, 7, 1, 2]])
    expected = nn.functional.embedding(ids, record.dequantize())
    assert torch.equal(module(ids), expected)
    assert torch.equal(module.dequantize(), record.dequantize())
    assert {name for name, _ in module.named_buffers()} == (
        {"qweight", "scales"} | ({"qzeros"} if not symmetric else set())
    )


def test_tied_pair_is_quantized_once_and_stored_once(tmp_path):
    model = tied_llama()
    rtn(model, RTNConfig(bits=4, group_size=32), PassContext())
    report = rtn(model, RTNConfig(bits=8, group_size=None, targets=EMBEDDINGS), PassContext())
    assert report.touched == EMBEDDINGS
    assert get_quantized(model.lm_head) is get_quantized(model.model.embed_tokens)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor

    export_model(model, None, tmp_path / "export", recipe={})
    keys = stored_keys(tmp_path / "export")
    assert "model.embed_tokens.qweight" in keys
    assert not [k for k in keys if k.startswith("lm_head.")]  # the tie is kept on disk
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["quantization_config"]["tied"] == {"lm_head": "model.embed_tokens"}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    embed, head = loaded.model.embed_tokens, loaded.lm_head
    assert isinstance(embed, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.qweight.data_ptr() == embed.qweight.data_ptr()  # one copy in memory too
    assert head.scales.data_ptr() == embed.scales.data_ptr()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        actual = loaded(ids).logits
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_quantizing_one_of_a_tied_pair_unties_it(tmp_path):
    model = tied_llama()
    original_embedding = model.model.embed_tokens.weight.detach().clone()
    report = rtn(model, RTNConfig(bits=4, group_size=32, targets=["lm_head"]), PassContext())
    assert report.notes and "untied" in report.notes[0]
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, original_embedding)  # untouched
    assert not model.config.tie_word_embeddings

    export_model(model, None, tmp_path / "export", recipe={})
    keys = stored_keys(tmp_path / "export")
    assert {"model.embed_tokens.weight", "lm_head.qweight"} <= keys
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert isinstance(loaded.lm_head, QuantLinear)
    assert isinstance(loaded.model.embed_tokens, nn.Embedding)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        actual = loaded(ids).logits
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())


def test_group_size_must_divide_the_embedding_width():
    model = tied_llama()
    with pytest.raises(compress.CompressError, match=r"model\.embed_tokens"):
        rtn(model, RTNConfig(bits=8, group_size=48, targets=EMBEDDINGS), PassContext())


def test_compressed_tensors_refuses_a_quantized_embedding(tmp_path):
    model = tied_llama()
    rtn(model, RTNConfig(bits=8, group_size=None, targets=EMBEDDINGS), PassContext())
    with pytest.raises(ExportError, match="quantized embedding"):
        export_model(model, None, tmp_path / "ct", recipe={}, format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
