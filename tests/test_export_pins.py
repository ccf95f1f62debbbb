"""The bytes of exported weight files, pinned: a refactor of formats, IR or writer must not change
what lands on disk for an existing recipe.

The tiny model's weights come from integers (``randint / 997``), so they are the same on every
CPU (no vectorised random normal whose rounding could differ between instruction sets), and RTN
with min-max ranges is exact elementwise arithmetic. If a change of the stored layout is
intended, bump the format version and update these digests in the same commit.
"""

import hashlib

import pytest
import torch
from transformers import LlamaForCausalLM

from compress.export.writer import export_model
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext
from tests.conftest import tiny_llama_config

PINNED = {
    # (bits, group_size, symmetric, embeddings too) -> sha256 of model.safetensors. The symmetric
    # digests changed with commit 050d703 (scales that use the lowest code): other values in the
    # same layout, so no format version bump; older exports decode as before.
    (4, 32, True, False): "c70c32f9983c0a667669a413c16ef1ed8ce345936a97115ea52604d6a5c52c09",
    (3, 16, False, False): "b0c015ab4664d28ec9bf581241719aab6870a47b25d90685492b7bde1222d435",
    (4, 32, True, True): "18caa430b4e4cc4a08dbd91b92041f70ae203c03ffdf669dca9e351ed8b1240d",
}


def integer_llama() -> LlamaForCausalLM:
    config = tiny_llama_config()
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            values = torch.randint(-1000, 1001, parameter.shape, generator=generator)
            scale = 1.0 if "norm" in name else 0.05
            parameter.copy_(
                values.to(torch.float32) / 997.0 * scale + (1.0 if "norm" in name else 0)
            )
    return model


@pytest.mark.parametrize(("bits", "group", "symmetric", "embeddings"), list(PINNED))
def test_export_bytes_are_pinned(tmp_path, bits, group, symmetric, embeddings):
    model = integer_llama()
    rtn(model, RTNConfig(bits=bits, group_size=group, symmetric=symmetric), PassContext())
    if embeddings:
        targets = ["model.embed_tokens", "lm_head"]
        rtn(model, RTNConfig(bits=8, group_size=None, targets=targets), PassContext())
    export_model(model, None, tmp_path / "export", recipe={})
    digest = hashlib.sha256((tmp_path / "export" / "model.safetensors").read_bytes()).hexdigest()
    assert digest == PINNED[(bits, group, symmetric, embeddings)]
