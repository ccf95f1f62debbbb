"""The quantized KV cache's transformers classes (see :mod:`compress.utils.kvcache` for the
storage, K-sort and how the export's ``generate`` uses it). Kept apart from that module because
importing transformers here must not happen while compress registers with transformers."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["QuantizedKVCache", "QuantizedKVLayer"]


def _quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) -> int8 codes (..., D) and fp16 scales (..., D / group), symmetric."""
    blocks = x.to(torch.float32).unflatten(-1, (-1, group))
    qmax = (1 << (bits - 1)) - 1
    scale = (blocks.abs().amax(dim=-1, keepdim=True) / qmax).to(torch.float16)
    safe = scale.to(torch.float32).clamp_min(torch.finfo(torch.float16).tiny)
    codes = torch.round(blocks / safe).clamp_(-qmax, qmax).to(torch.int8)
    return codes.flatten(-2), scale.squeeze(-1)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] -> two a byte (low nibble first)."""
    unsigned = (codes + 8).to(torch.uint8)
    return unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's cache, stored quantized (see the module docstring)."""

    is_croppable = False

    def __init__(self, bits: int = 4, group_size: int = 32, ksort: bool = True) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"KV cache bits must be 4 or 8, got {bits}")
        self.bits, self.group_size, self.ksort = bits, group_size, ksort
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"k": [], "v": []}
        self.order: torch.Tensor | None = None  # (heads, D) key channel order, K-sort
        self.length = 0

    def _store(self, name: str, x: torch.Tensor) -> None:
        if x.shape[-1] % self.group_size:
            raise ValueError(
                f"head_dim {x.shape[-1]} is not a multiple of the KV cache group_size "
                f"{self.group_size}"
            )
        codes, scales = _quantize(x, self.bits, self.group_size)
        self.parts[name].append((_pack4(codes) if self.bits == 4 else codes, scales))

    def _load(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        if not self.parts[name]:
            return None
        pieces = []
        for codes, scales in self.parts[name]:
            values = _unpack4(codes) if self.bits == 4 else codes
            blocks = values.to(torch.float32).unflatten(-1, (-1, self.group_size))
            pieces.append((blocks * scales.to(torch.float32).unsqueeze(-1)).flatten(-2))
        return torch.cat(pieces, dim=-2).to(dtype)

    def _sorted(self, keys: torch.Tensor) -> torch.Tensor:
        if self.order is None:
            return keys
        index = self.order[None, :, None, :].expand(keys.shape[0], -1, keys.shape[2], -1)
        return keys.gather(-1, index)

    def _unsorted(self, keys: torch.Tensor) -> torch.Tensor:
        if self.order is None:
            return keys
        inverse = torch.argsort(self.order, dim=-1)
        index = inverse[None, :, None, :].expand(keys.shape[0], -1, keys.shape[2], -1)
        return keys.gather(-1, index)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, heads, new, D) -> every token's keys and values, the stored ones dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            if self.ksort:  # outlier channels together: by mean |k| over the first tokens
                magnitude = key_states.detach().abs().to(torch.float32).mean(dim=(0, 2))
                self.order = torch.argsort(magnitude, dim=-1, descending=True)
        old_keys = self._load("k", key_states.dtype)
        old_values = self._load("v", value_states.dtype)
        self._store("k", self._sorted(key_states))
        self._store("v", value_states)
        self.length += key_states.shape[-2]
        if old_keys is None or old_values is None:
            return key_states, value_states
        keys = torch.cat((self._unsorted(old_keys), key_states), dim=-2)
        return keys, torch.cat((old_values, value_states), dim=-2)

    def get_seq_length(self) -> int:
        return self.length

    def stored_bytes(self) -> int:
        return sum(
            codes.numel() * codes.element_size() + scales.numel() * scales.element_size()
            for parts in self.parts.values()
            for codes, scales in parts
        )

    def reset(self) -> None:
        super().reset()
        self.parts = {"k": [], "v": []}
        self.order = None
        self.length = 0


class QuantizedKVCache(Cache):
    """A cache of :class:`QuantizedKVLayer` for every decoder layer of ``config``."""

    def __init__(
        self, config: Any, bits: int = 4, group_size: int = 32, ksort: bool = True
    ) -> None:
        text = config.get_text_config(decoder=True)
        layers = [QuantizedKVLayer(bits, group_size, ksort) for _ in range(text.num_hidden_layers)]
        super().__init__(layers=list[Any](layers))
        self.quantized_layers = layers

    def stored_bytes(self) -> int:
        """Bytes the cache holds (codes, scales)."""
        return sum(layer.stored_bytes() for layer in self.quantized_layers)
