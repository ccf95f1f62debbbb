"""The ``kv_cache`` pass: quantize the KV cache that ``generate`` fills (INT4/INT8 blocks of
channels, keys K-sorted; :mod:`compress.utils.kvcache`).

It changes no weight: it records the settings in ``config.json``, and the export loader makes
``generate`` use :class:`~compress.utils.kvcache.QuantizedKVCache`. A teacher-forced evaluation
of the whole window (the pipeline's perplexity and KL) reads no cache, so it does not see this
pass; ``scripts/bench_kvcache.py`` measures it by feeding each window in chunks through the
cache::

    passes:
      - {pass: kv_cache, bits: 4, group_size: 32}
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from compress.errors import PassError
from compress.ir import ConfigPatch, attach, get
from compress.registry import PassConfig, PassContext, PassReport, register_pass
from compress.utils.kvcache import KV_CACHE_KEY

__all__ = ["KVCacheConfig", "kv_cache"]


class KVCacheConfig(PassConfig):
    """Settings of the ``kv_cache`` pass."""

    bits: int = Field(default=4, description="code width of keys and values: 4 or 8")
    group_size: int = Field(
        default=32, gt=0, description="channels of a head sharing one fp16 scale (divides head_dim)"
    )
    ksort: bool = Field(
        default=True,
        description="order each key head's channels by magnitude before cutting blocks "
        "(outlier channels share blocks); storage only",
    )


@register_pass("kv_cache", KVCacheConfig)
def kv_cache(model: nn.Module, config: KVCacheConfig, context: PassContext) -> PassReport:
    """Record the KV cache quantization for the export's ``generate``."""
    if config.bits not in (4, 8):
        raise PassError(f"kv_cache: bits must be 4 or 8, got {config.bits}")
    config_of: Any = getattr(model, "config", None)
    if config_of is None:
        raise PassError("kv_cache: the model has no Hugging Face config")
    text = config_of.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head_dim % config.group_size:
        raise PassError(
            f"kv_cache: group_size {config.group_size} does not divide the head size {head_dim}",
            hint=f"use a divisor of {head_dim}, e.g. {head_dim // 2}",
        )
    spec = {"bits": config.bits, "group_size": config.group_size, "ksort": config.ksort}
    held = get(model, ConfigPatch)
    attach(model, ConfigPatch({**(held.updates if held else {}), KV_CACHE_KEY: spec}))
    setattr(config_of, KV_CACHE_KEY, spec)
    report = PassReport(name="kv_cache")
    bits_per_value = config.bits + 16 / config.group_size
    report.metrics = {"bits_per_value": bits_per_value, "memory_vs_bf16": bits_per_value / 16}
    report.notes.append(
        f"generate of the export stores keys and values at {config.bits} bits "
        f"({bits_per_value:.2f} with scales){', keys K-sorted' if config.ksort else ''}"
    )
    return report
