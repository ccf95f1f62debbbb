"""entropy_code through the pipeline: export, manifest, from_pretrained (at load and just in
time), logits bitwise equal to the uncoded export, on a tiny Llama and on real SmolLM2."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress  # noqa: F401  (registers the transformers plug-in)
from compress.errors import ExportError, FormatError, PassError
from compress.export.entropy import decode_mode
from compress.export.manifest import MANIFEST_NAME
from compress.lossless.entropy_code import EntropyCodeConfig
from compress.pipeline import Pipeline
from compress.quant.rtn import RTNConfig

TOKENS = torch.arange(0, 96).reshape(2, 48) * 5 % 256


def _export(model, tokenizer, passes, directory: Path) -> Path:  # type: ignore[no-untyped-def]
    Pipeline(model, passes, tokenizer=tokenizer, export=directory).run()
    return directory


def _logits(directory: Path, mode: str = "load") -> torch.Tensor:
    with decode_mode(mode), torch.no_grad():  # type: ignore[arg-type]
        model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        return model(TOKENS).logits


@pytest.fixture
def bf16_llama(tiny_llama):  # type: ignore[no-untyped-def]
    return copy.deepcopy(tiny_llama).to(torch.bfloat16)


def test_bf16_export_loads_bit_exact(bf16_llama, byte_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plain = _export(copy.deepcopy(bf16_llama), byte_tokenizer, [], tmp_path / "plain")
    coded = _export(
        bf16_llama, byte_tokenizer, [EntropyCodeConfig(min_numel=1024, chunk=512)], tmp_path / "ec"
    )
    manifest = json.loads((coded / MANIFEST_NAME).read_text())
    block = manifest["entropy"]
    assert block["codec"] == "huffman-chunked" and block["tensors"] and block["version"] == 2
    assert all(e["pairs"] and e["kind"] == "bf16" for e in block["tensors"].values())
    assert block["stored_bytes"] < 0.75 * block["raw_bytes"]
    assert all(e["checksum"].startswith("crc32:") for e in block["tensors"].values())
    config = json.loads((coded / "config.json").read_text())
    assert config["quantization_config"]["entropy"]["codec"] == "huffman-chunked"
    reference = _logits(plain)
    assert torch.equal(_logits(coded, "load"), reference)
    assert torch.equal(_logits(coded, "jit"), reference)


def test_jit_keeps_decoder_layers_coded_between_forwards(
    bf16_llama, byte_tokenizer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    coded = _export(
        bf16_llama, byte_tokenizer, [EntropyCodeConfig(min_numel=1024)], tmp_path / "ec"
    )
    with decode_mode("jit"):
        model = AutoModelForCausalLM.from_pretrained(str(coded)).eval()
    up = model.model.layers[0].mlp.up_proj
    assert up.weight.numel() == 0 and up.weight_ec_stream.numel() > 0
    seen: list[int] = []
    handle = up.register_forward_pre_hook(lambda m, a: seen.append(m.weight.numel()))
    with torch.no_grad():
        model(TOKENS[:, :8])
    handle.remove()
    assert seen == [128 * 64] and up.weight.numel() == 0


def test_int4_codes_are_entropy_coded_and_load_bit_exact(
    tiny_llama, byte_tokenizer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    rtn = RTNConfig(bits=4, group_size=32)
    plain = _export(copy.deepcopy(tiny_llama), byte_tokenizer, [rtn], tmp_path / "plain")
    coded = _export(
        copy.deepcopy(tiny_llama),
        byte_tokenizer,
        [rtn, EntropyCodeConfig(min_numel=1024, chunk=1024)],
        tmp_path / "ec",
    )
    tensors = json.loads((coded / MANIFEST_NAME).read_text())["entropy"]["tensors"]
    qweights = {k: v for k, v in tensors.items() if k.endswith(".qweight")}
    assert len(qweights) == 14  # 7 Linears x 2 layers
    assert all(v["kind"] == "codes" and v["pack_bits"] == 4 for v in qweights.values())
    assert sum(v["stored_bytes"] for v in qweights.values()) < sum(
        v["raw_bytes"] for v in qweights.values()
    )
    with decode_mode("load"):
        a = AutoModelForCausalLM.from_pretrained(str(plain))
        b = AutoModelForCausalLM.from_pretrained(str(coded))
    for name, module in a.named_modules():
        if hasattr(module, "qweight"):
            assert torch.equal(module.qweight, b.get_submodule(name).qweight), name
    assert torch.equal(_logits(coded, "load"), _logits(plain))
    assert torch.equal(_logits(coded, "jit"), _logits(plain))


def test_float32_model_alone_is_refused(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    from compress.lossless.entropy_code import entropy_code
    from compress.registry import PassContext

    with pytest.raises(PassError, match="bfloat16"):
        entropy_code(copy.deepcopy(tiny_llama), EntropyCodeConfig(), PassContext())


def test_tied_embedding_is_coded_once_and_tied_again(byte_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    config = tiny_llama_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    plain = _export(copy.deepcopy(model), byte_tokenizer, [], tmp_path / "plain")
    coded = _export(model, byte_tokenizer, [EntropyCodeConfig(min_numel=1024)], tmp_path / "ec")
    tensors = json.loads((coded / MANIFEST_NAME).read_text())["entropy"]["tensors"]
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    with decode_mode("jit"):
        loaded = AutoModelForCausalLM.from_pretrained(str(coded))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_logits(coded, "jit"), _logits(plain))


def test_corrupt_coded_file_is_refused(bf16_llama, byte_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    coded = _export(
        bf16_llama, byte_tokenizer, [EntropyCodeConfig(min_numel=1024)], tmp_path / "ec"
    )
    manifest_path = coded / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    name = next(iter(manifest["entropy"]["tensors"]))
    manifest["entropy"]["tensors"][name]["checksum"] = "crc32:00000000"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="checksum"):
        AutoModelForCausalLM.from_pretrained(str(coded))
    manifest["entropy"]["version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="codec version"):
        AutoModelForCausalLM.from_pretrained(str(coded))


@pytest.mark.slow
def test_smollm2_bf16_every_tensor_round_trips_and_fits_the_target(smollm2, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from compress.formats.entropy import codec

    model, _ = smollm2
    raw = coded_bytes = bound = 0.0
    for name, tensor in model.state_dict().items():
        values = tensor.to(torch.bfloat16)
        coded = codec.encode_bf16(values)
        out = codec.decode(coded, where=name)
        assert torch.equal(out.view(torch.int16), values.view(torch.int16)), name
        raw += 2 * values.numel()
        coded_bytes += coded.nbytes
        bound += codec.entropy_bits(codec.split_bf16(values)[0]) / 8 + values.numel()
    assert coded_bytes <= 0.70 * raw
    assert coded_bytes <= 1.01 * bound
