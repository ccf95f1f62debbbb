"""What the pruning test modules calibrate and export with: a 3-layer tiny Llama folder, a
calibration text file (one of each per test module), and a tiny Llama whose weight columns have
uneven norms, as a trained model's do."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import save_tiny_llama, write_word_text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-3"), layers=3, seed=1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    return write_word_text(path, lines=40, words=40, vocabulary=15)


@pytest.fixture(scope="module")
def uneven_llama(tiny_llama: LlamaForCausalLM) -> LlamaForCausalLM:
    """``tiny_llama`` with every projection's input columns scaled by factors from 0.2 to 5 (a
    random init has near-equal column norms, which hides what a weighted score changes)."""
    model = copy.deepcopy(tiny_llama)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                factors = torch.logspace(-0.7, 0.7, module.in_features)
                module.weight.mul_(factors[torch.randperm(module.in_features, generator=generator)])
    return model.eval()
