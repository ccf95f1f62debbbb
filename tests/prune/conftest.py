"""What both pruning test modules calibrate and export with: a 3-layer tiny Llama folder and a
calibration text file (one of each per test module)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import save_tiny_llama, write_word_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-3"), layers=3, seed=1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    return write_word_text(path, lines=40, words=40, vocabulary=15)
