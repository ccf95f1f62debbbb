"""Decode speed and peak memory, measured in a process of its own."""

import pytest
import torch

from compress.errors import CompressError
from compress.evaluate.speed import measure_generation
from compress.export.writer import export_model
from compress.quant.rtn import RTNConfig, rtn
from compress.registry import PassContext


def test_measures_an_export_in_its_own_process(tiny_llama_copy, byte_tokenizer, tmp_path):
    rtn(tiny_llama_copy, RTNConfig(bits=4, group_size=32), PassContext())
    folder = export_model(tiny_llama_copy, byte_tokenizer, tmp_path / "export", recipe={})
    speed = measure_generation(folder, new_tokens=8, threads=1)
    assert speed.tokens_per_s > 0
    assert speed.threads == 1
    # a process that imported torch and transformers holds at least that much
    assert 50 * 2**20 < speed.peak_memory_bytes < 8 * 2**30
    assert speed.load_s > 0


def test_peak_memory_is_the_child_s_own(tiny_llama_copy, byte_tokenizer, tmp_path):
    """Linux carries ru_maxrss across exec: a child forked from a 2 GB parent would report the
    parent's 2 GB. The measurement must be the child's own address space."""
    folder = export_model(tiny_llama_copy, byte_tokenizer, tmp_path / "dense", recipe={})
    ballast = torch.ones(2**31, dtype=torch.uint8)  # the parent holds 2 GiB while forking
    try:
        speed = measure_generation(folder, new_tokens=2, threads=1)
    finally:
        del ballast
    assert speed.peak_memory_bytes < 1.5 * 2**30


def test_a_folder_that_does_not_load_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CompressError, match="speed measurement failed") as info:
        measure_generation(tmp_path, new_tokens=2)
    assert "evaluate.speed: false" in (info.value.hint or "")
