"""What the llm-compressor peer scripts share: one ``oneshot`` run on our calibration windows and
the decoder Linear weights it leaves. Runs inside llm-compressor's own venv (see llmc_gptq.py);
nothing here imports ``compress``."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch


def oneshot_on_windows(model_dir: str, calibration: str, recipe: Any) -> tuple[Any, float, float]:
    """``(model, seconds, peak_rss_mb)`` after llm-compressor's ``oneshot`` with ``recipe`` on the
    (samples, seq_len) token windows saved at ``calibration``, in their order."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids: torch.Tensor = torch.load(calibration)
    dataset = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    )
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=ids.shape[1],
        num_calibration_samples=ids.shape[0],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    return model, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decoder_linear_weights(model: Any) -> dict[str, torch.Tensor]:
    """Every decoder-layer Linear's weight as it is now (quantized-dequantized, or pruned)."""
    return {
        f"{name}.weight": module.weight.detach().float().contiguous()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }
