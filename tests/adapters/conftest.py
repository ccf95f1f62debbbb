"""A tiny Llama and text for the adapter tests, and a helper that quantizes + corrects it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import save_tiny_llama, write_word_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("adapters-model"), layers=2, seed=3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_text(tmp_path_factory.mktemp("adapters-text") / "t.txt", lines=48, words=40)


def write_recipe(
    path: Path,
    model_dir: Path,
    text_file: Path,
    passes: list[dict[str, Any]],
    out: Path | None,
    **extra: Any,
) -> Path:
    """A recipe: rtn int2 g32 (large error to correct), then ``passes``; JSON is YAML's flow."""
    lines = [
        f"model: {json.dumps(str(model_dir))}",
        f"calibration: {{dataset: {json.dumps(str(text_file))}, samples: 16, seq_len: 32}}",
        "passes:",
        "  - {pass: rtn, bits: 2, group_size: 32}",
        *(f"  - {json.dumps(p)}" for p in passes),
    ]
    if out is not None:
        lines.append(f"export: {{dir: {json.dumps(str(out))}}}")
    lines += [f"{key}: {json.dumps(value)}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
