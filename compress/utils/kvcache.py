"""A quantized KV cache for ``generate``: keys and values stored as INT4/INT8 codes with one
scale per block of channels, the keys' channels K-sorted first.

Storage, per layer, token and key/value head: the ``head_dim`` channels cut into blocks of
``group_size``, one fp16 scale per block (``amax / (2**(bits-1) - 1)``), symmetric codes (two
4-bit codes a byte). **K-sort** (the outlier-rearrangement paper's trick for keys): the first
time a layer's cache is filled, each key head's channels are ordered by their mean magnitude, so
that the few outlier channels share blocks and the other blocks get finer scales; the order is
kept for that cache and undone when the keys are read (storage only: the model computes with
keys in their own order). Values keep their order.

A layer returns what attention needs on every step: the stored tokens dequantized, followed by
the new ones as they came (so a prefill attends to its own keys unrounded, like transformers'
``QuantizedCache``). :meth:`QuantizedKVCache.stored_bytes` counts what is held.

The ``kv_cache`` recipe pass records the settings in ``config.json``
(:data:`KV_CACHE_KEY`); the export loader then makes ``generate`` use this cache unless a cache
is passed (:func:`install_kv_cache`). The cache classes: :mod:`compress.utils.quantized_cache`.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

__all__ = ["KV_CACHE_KEY", "install_kv_cache"]

KV_CACHE_KEY = "compress_kv_cache"
"""``config.json`` key: ``{"bits": 4, "group_size": 32, "ksort": true}``."""


def install_kv_cache(model: nn.Module) -> dict[str, Any] | None:
    """Make ``model.generate`` use a :class:`QuantizedKVCache` with the settings in the model's
    config (:data:`KV_CACHE_KEY`) when the caller passes no cache; the settings, or ``None``."""
    spec = getattr(getattr(model, "config", None), KV_CACHE_KEY, None)
    original: Any = getattr(model, "generate", None)
    if not spec or original is None or getattr(original, "_compress_kv_cache", False):
        return spec or None

    from compress.utils.quantized_cache import QuantizedKVCache  # imports transformers

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        given = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if not given and kwargs.get("use_cache", True):
            kwargs["cache"] = QuantizedKVCache(
                model.config, spec["bits"], spec["group_size"], spec.get("ksort", True)
            )
        return original(*args, **kwargs)

    setattr(generate, "_compress_kv_cache", True)  # noqa: B010
    setattr(model, "generate", generate)  # noqa: B010 (an instance attribute shadows the method)
    return dict(spec)
