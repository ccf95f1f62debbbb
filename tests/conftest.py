"""Fixtures shared by the whole test suite.

- ``tiny_llama``: a tiny random ``LlamaForCausalLM`` (hidden 64, 2 layers, vocab 256), built from a
  config with a fixed seed; no download. Session-scoped, so treat it as read-only; tests that
  change weights in place take ``tiny_llama_copy``.
- ``byte_tokenizer``: a byte-level tokenizer with exactly 256 tokens, matching ``tiny_llama``.
- ``smollm2``: ``(model, tokenizer)`` of the real builtin ``smollm2-135m`` (fetched once into the
  compress cache). Only for tests marked ``@pytest.mark.slow``; collection enforces it.
- ``wiki_eval_texts``: the evaluation split of ``builtin:wiki`` (a ``datasets.Dataset``).
- ``hub_offline``: make the Hugging Face hub fail at once instead of after network retries.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from compress.utils.native import ISA_LEVELS, cpu_isa

TINY_LLAMA_SEED = 0


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, split the cores between the workers: each worker's torch would
    otherwise start one thread per core, and two workers on two cores would fight."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "smollm2" in fixtures and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(
                f"{item.nodeid} uses the smollm2 fixture but is not marked @pytest.mark.slow"
            )


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    """A random tiny Llama in eval mode, the same weights on every run. Do not modify it."""
    torch.manual_seed(TINY_LLAMA_SEED)
    model = LlamaForCausalLM(tiny_llama_config())
    return model.eval()


@pytest.fixture
def tiny_llama_copy(tiny_llama: LlamaForCausalLM) -> LlamaForCausalLM:
    """A private copy of ``tiny_llama`` that a test may change in place."""
    return copy.deepcopy(tiny_llama)


def save_tiny_llama(folder: Path, *, layers: int, seed: int, **overrides: object) -> Path:
    """A random tiny Llama (hidden 64, 4 heads over 2 key/value heads, vocab 256, untied head)
    and the byte tokenizer, saved in ``folder`` as a Hugging Face model folder."""
    settings: dict[str, object] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }
    settings.update(overrides)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    return folder


_WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "rain",
    "fell",
    "over",
    "quiet",
    "hills",
    "and",
    "rivers",
    "ran",
    "to",
    "the",
    "sea",
    "under",
    "grey",
    "skies",
    "where",
    "ships",
    "sailed",
    "past",
    "old",
    "towers",
]


def write_word_text(path: Path, *, lines: int, words: int, vocabulary: int = len(_WORDS)) -> Path:
    """``lines`` lines of ``words`` words drawn (seeded) from the first ``vocabulary`` words of a
    small word list: calibration or training text for tiny models, the same on every run."""
    generator = torch.Generator().manual_seed(0)
    chosen = _WORDS[:vocabulary]
    text = [
        " ".join(
            chosen[i] for i in torch.randint(len(chosen), (words,), generator=generator).tolist()
        )
        for _ in range(lines)
    ]
    path.write_text("\n".join(text) + "\n")
    return path


NATIVE_TEST_LEVELS = sorted({"avx2", cpu_isa()}, key=ISA_LEVELS.index)
"""The native builds the kernel tests force: AVX2 and this CPU's own (the portable loops run in
them too, for the shapes and tails the vector paths leave)."""


def force_native_build(level: str, monkeypatch: pytest.MonkeyPatch, native: Any, what: str) -> str:
    """Force ``level`` (``COMPRESS_CPU_ISA``) for a test, skipping a level this CPU cannot run;
    ``native()`` must then build, or the test fails naming ``what``."""
    if ISA_LEVELS.index(level) > ISA_LEVELS.index(cpu_isa()):
        pytest.skip(f"this CPU runs the {cpu_isa()} build at most")
    monkeypatch.setenv("COMPRESS_CPU_ISA", level)
    assert native() is not None, f"the {level} build of {what} failed (see the log)"
    return level


def run_passes_on_tiny_model(passes: list[Any], folder: Path, *, seed: int) -> tuple[Any, Any]:
    """A recipe's passes through the Pipeline on a 2-layer tiny Llama (saved under ``folder``,
    calibrated on a word text), exported to ``folder / "export"`` and reloaded: what the shipped
    recipes' tiny-model tests check. Returns ``(pipeline result, reloaded model)``."""
    from transformers import AutoModelForCausalLM

    from compress.pipeline import Pipeline
    from compress.recipe import CalibrationSpec, ModelSpec

    model_dir = save_tiny_llama(folder / "tiny", layers=2, seed=seed)
    text = write_word_text(folder / "calib.txt", lines=30, words=30, vocabulary=15)
    result = Pipeline(
        ModelSpec(name=str(model_dir)),
        list(passes),
        calibration=CalibrationSpec(dataset=str(text), samples=8, seq_len=32),
        export=folder / "export",
    ).run()
    return result, AutoModelForCausalLM.from_pretrained(folder / "export").eval()


def entropy_coded_export_reloads(
    model: Any, tokenizer: Any, folder: Path, rtn_format: str
) -> dict[str, Any]:
    """RTN to ``rtn_format`` and the entropy-coding stage (codes coded from the IR, packed back
    on load) exported to ``folder / "export"``; checks the reloaded export's logits equal the
    pipeline model's bit for bit and that codes were coded. Returns the manifest's entropy
    block for format-specific checks."""
    import json

    from transformers import AutoModelForCausalLM

    from compress.lossless.entropy_code import EntropyCodeConfig
    from compress.pipeline import Pipeline
    from compress.quant.rtn import RTNConfig

    result = Pipeline(
        model=model,
        passes=[RTNConfig(format=rtn_format), EntropyCodeConfig(floats=False, min_numel=1)],
        tokenizer=tokenizer,
        export=folder / "export",
    ).run()
    manifest = json.loads((result.export_dir / "compress_manifest.json").read_text())
    assert manifest["entropy"]["tensors"], f"no {rtn_format} codes were entropy-coded"
    loaded = AutoModelForCausalLM.from_pretrained(result.export_dir).eval()
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)
    return dict(manifest["entropy"])


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level tokenizer with no merges: one token per UTF-8 byte, 256 tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="session")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from compress.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def wiki_eval_texts() -> datasets.Dataset:
    from compress.data import load_texts

    return load_texts("builtin:wiki", "evaluation")


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No hub here: without this, each hub call retries for ~25 s before it fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    yield


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
"""``config.model_type`` of every family with a layout (compress.layouts), tiny in the tests."""


def tiny_family_model(family: str, *, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A random causal LM of ``family`` shaped like ``tiny_llama`` (hidden 64, 2 layers, vocab
    256, 4 heads over 2 key/value heads), in float32 and eval mode; built from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings: dict[str, object] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if family.startswith("gemma"):
        settings.update(query_pre_attn_scalar=16, sliding_window=32)
    if family == "gemma3_text":
        settings["layer_types"] = ["sliding_attention", "full_attention"]
    settings.update(overrides)
    config = AutoConfig.for_model(family, **settings)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
